"""The graph layer: weights recorded by name and kept outside the jitted computation.

A `Graph` holds name -> abstract weight (`jax.ShapeDtypeStruct` with its sharding) and, once bound, name ->
`jax.Array`. Functions made with `Graph.function` are jitted with the weights as one dict argument, so
weights never enter HLO as constants, swapping a checkpoint reuses the compiled executable, and a graph
lowers and compiles from the abstract weights before any byte is read.

The graph owns declaring and reusing weights: it hands its accessor's store an `Allocator`, so that
inside a graph function ``allocate()`` returns the traced argument. Each new signature of a graph function
is traced once with `jax.jit(...).trace` and its program checked for large constants (closed-over arrays)
before anything compiles. This module never sets another module's attributes.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Literal

import jax
import numpy as np

from . import _compat
from ._devices import DeviceRef, Placement, to_sharding
from ._display import format_bytes
from ._dtypes import DType, DTypeLike
from ._placement import resolve_dtype
from ._weights import AllocationRequest, Weight, Weights, _Store, allocating_with, load_weights
from .errors import GraphError, ShapeMismatchError, StructureMismatchError
from .formats import Checkpoint, PathsLike, TensorInfo, WeightsFormat

__all__ = ["CONSTANT_LIMIT", "Graph", "GraphConstantWarning", "GraphFunction"]

CONSTANT_LIMIT = 64 * 1024
"""Bytes (64 KiB) above which a constant in a graph function's program is an error, or with
``Graph(..., constants="warn")`` a `GraphConstantWarning`. Scalars and small tables stay below it; a
384 x 384 float32 matrix (576 KiB) does not."""

_current: contextvars.ContextVar[tuple[Graph, ...]] = contextvars.ContextVar("jaxweights_graph", default=())


class GraphConstantWarning(UserWarning):
    """A graph function's program holds a large constant (see ``Graph(..., constants="warn")``).

    Example:
        >>> import warnings, numpy as np, jax.numpy as jnp, jaxweights as jw
        >>> graph, table = jw.Graph("g", constants="warn"), np.ones((400, 400), np.float32)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = graph.function(lambda x: x @ table)(jnp.ones(400))  # closes over 640 kB
        >>> [warning.category.__name__ for warning in caught]
        ['GraphConstantWarning']
    """

    __module__ = "jaxweights"


class _NewWeightsError(Exception):
    """Raised out of a trace when it added weights the traced dict lacked: trace again with them."""


class _UncheckedTraceError(Exception):
    """Raised at the start of a trace `jax.jit` began on its own: the signature is new, so it is traced
    first with ``trace()`` and its constants checked, before anything compiles."""


class _Discovery(dict[str, Any]):
    """The weights of a shape-only pass that finds the weights a function uses: placeholders by name."""


class Graph:
    """Named weights kept outside compiled functions, after MAX's ``Graph``.

    Args:
        name: the graph's name, used in messages.
        weights: the checkpoint (an accessor or paths) the graph reads its weights from; None declares
            weights (``allocate(dtype=, shape=)``) and binds them later with `bind`.
        constants: what a graph function whose program holds a constant larger than `CONSTANT_LIMIT`
            does: ``"error"`` raises `GraphError` before compiling, ``"warn"`` emits a
            `GraphConstantWarning` and compiles it.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"fc.weight": np.eye(3, dtype=np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> graph = jw.Graph("mlp", weights=jw.load_weights(path))
        >>> weights = graph.weights()
        >>> @graph.function
        ... def forward(x):
        ...     return x @ weights.fc.weight.allocate().T  # inside: the traced argument, never a constant
        >>> forward(jnp.ones(3)).tolist()
        [1.0, 1.0, 1.0]
        >>> graph.declared
        {'fc.weight': ShapeDtypeStruct(shape=(3, 3), dtype=float32, sharding=...)}
    """

    __module__ = "jaxweights"

    def __init__(
        self,
        name: str,
        weights: Weights | PathsLike | None = None,
        *,
        constants: Literal["error", "warn"] = "error",
    ) -> None:
        if constants not in ("error", "warn"):
            raise GraphError(f"Graph {name!r}: constants={constants!r}; use 'error' (the default) or 'warn'.")
        self.name = name
        self.constants = constants
        self._declares = weights is None
        if weights is None:
            checkpoint, prefix = Checkpoint(WeightsFormat.safetensors, {}, []), ""
        else:
            given = weights if isinstance(weights, Weights) else load_weights(weights)
            checkpoint, prefix = given.checkpoint, given.name
        root = Weights(_Store(checkpoint, allocator=self._allocate))
        self._weights = root[prefix] if prefix else root
        self._source: Weights | None = None if weights is None else root
        self._declared: dict[str, Weight] = {}
        self._bound: dict[str, jax.Array] = {}
        self._lock = threading.RLock()
        self._tracing = threading.local()

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self._declared)} weights, {len(self._bound)} bound>"

    # -- the current graph ------------------------------------------------------------------------
    def __enter__(self) -> Graph:
        _current.set((*_current.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _current.get()
        _current.set(stack[:-1])

    @staticmethod
    def current() -> Graph | None:
        """The innermost graph entered with ``with graph:``, if any.

        Example:
            >>> import jaxweights as jw
            >>> graph = jw.Graph("g")
            >>> with graph:
            ...     jw.Graph.current() is graph
            True
            >>> jw.Graph.current() is None
            True
        """
        stack = _current.get()
        return stack[-1] if stack else None

    # -- weights ---------------------------------------------------------------------------------
    def weights(self) -> Weights:
        """The hierarchical accessor for this graph's weights (the same object on every call).

        Inside a function made by `function`, ``allocate()`` returns a `Weight` whose value is the traced
        argument for its name and records the weight on the graph (as MAX adds allocated weights), so
        bound data is used and nothing is read or baked in. Outside, with a checkpoint, ``allocate()``
        reads like any accessor (into this accessor's `allocated_weights`, not the one passed in);
        without a checkpoint it declares a data-less `Weight` (``dtype=`` and ``shape=`` required),
        bound later with `bind`.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> weights = graph.weights()
            >>> weights is graph.weights(), weights.w.allocate().shape
            (True, (2,))
        """
        return self._weights

    def _allocate(self, request: AllocationRequest, load: Callable[[], Weight]) -> Weight:
        """The `Allocator` of the graph's accessor: declare, trace or read (``load``)."""
        tracing = getattr(self._tracing, "weights", None) is not None
        if request.info is None:
            if not self._declares:
                return load()  # raises WeightNotFoundError, with close matches
            weight = _declared(request)
        elif not tracing:
            return load()
        else:
            weight = _from_catalogue(request.info, request.dtype, request.device)
        if not tracing:
            return weight
        return replace(weight, value=self.add_weight(weight))

    @property
    def declared(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Every weight added so far, as abstract values with shardings (the compiled signature).

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
            >>> _ = scale(jnp.ones(2))
            >>> graph.declared
            {'w': ShapeDtypeStruct(shape=(2,), dtype=float32, sharding=...)}
        """
        with self._lock:
            return {name: weight.abstract for name, weight in self._declared.items()}

    @property
    def bound(self) -> dict[str, jax.Array]:
        """The arrays currently bound to the declared names.

        Example:
            >>> import jax.numpy as jnp, jaxweights as jw
            >>> graph = jw.Graph("g")
            >>> _ = graph.add_weight(graph.weights().w.allocate(dtype="float32", shape=(2,)))
            >>> graph.bind({"w": jnp.ones(2)})
            >>> graph.bound
            {'w': Array([1., 1.], dtype=float32)}
        """
        with self._lock:
            return dict(self._bound)

    def add_weight(
        self, weight: Weight | Weights, *, dtype: DTypeLike | None = None, device: Placement | None = None
    ) -> Any:
        """Records a weight and returns the value to compute with.

        Inside a function made by `function` it returns the traced argument for the weight's name (never
        a constant); outside, the bound `jax.Array` (or, for a weight not bound yet, its
        `jax.ShapeDtypeStruct`). Adding a weight with a name already present returns the same value if it
        has the same dtype, shape and sharding, and raises `GraphError` otherwise.

        ``weight`` may also be an accessor (``weights.fc.weight``): the weight is then declared from the
        checkpoint's catalogue (with ``dtype``/``device`` if given) and read only when first needed.

        Example:
            >>> import jaxweights as jw
            >>> graph = jw.Graph("g")
            >>> graph.add_weight(graph.weights().w.allocate(dtype="bfloat16", shape=(4,)))
            ShapeDtypeStruct(shape=(4,), dtype=bfloat16, sharding=...)
        """
        if isinstance(weight, Weights):
            target = DType.from_any(dtype) if dtype is not None else None
            weight = _from_catalogue(weight.info, target, device if device is not None else DeviceRef.CPU())
        with self._lock:
            existing = self._declared.get(weight.name)
            if existing is None:
                self._declared[weight.name] = weight
                if weight.value is not None and not isinstance(weight.value, jax.core.Tracer):
                    self._bound[weight.name] = weight.value
            elif not _same_layout(existing, weight):
                raise GraphError(
                    f"Weight {weight.name!r} already exists in graph {self.name!r} as "
                    f"{existing.dtype.name}{list(existing.shape)} on {existing.sharding}; the one added now "
                    f"is {weight.dtype.name}{list(weight.shape)} on {weight.sharding}. Give it another name.",
                    tensor=weight.name,
                )
        traced = getattr(self._tracing, "weights", None)
        if isinstance(traced, _Discovery):  # shape-only pass that finds the weights a function uses
            if weight.name not in traced:
                traced[weight.name] = jax.numpy.zeros(weight.shape, weight.dtype.to_numpy())
            return traced[weight.name]
        if traced is not None:
            if weight.name not in traced:  # recorded now: trace again with it in the signature
                raise _NewWeightsError(weight.name)
            return traced[weight.name]
        with self._lock:
            return self._bound.get(weight.name, self._declared[weight.name].abstract)

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, source: Weights | PathsLike | Mapping[str, Any]) -> None:
        """Binds data to every declared weight, from a checkpoint (an accessor or paths) or a dict of arrays.

        Names, shapes, dtypes and shardings are checked first and every problem is reported in one
        `StructureMismatchError` (names missing from the source, and shape mismatches; for dicts of arrays
        also dtype and sharding mismatches). From a checkpoint, each weight is read with its declared
        dtype and sharding. Same names and shapes mean compiled functions are reused, not recompiled,
        and compute with the new values, including those that ``allocate()`` inside the function.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g")
            >>> _ = graph.add_weight(graph.weights().w.allocate(dtype="float32", shape=(2,)))
            >>> graph.bind(path)
            >>> graph.bound["w"].tolist()
            [3.0, 3.0]
        """
        with self._lock:
            declared = dict(self._declared)
        if isinstance(source, Mapping):
            arrays = self._check_arrays(declared, source)
        else:
            accessor = source if isinstance(source, Weights) else load_weights(source)
            arrays = self._load(declared, accessor)
        with self._lock:
            self._bound.update(arrays)
            if not isinstance(source, Mapping):
                self._source = accessor

    def _check_arrays(self, declared: dict[str, Weight], source: Mapping[str, Any]) -> dict[str, jax.Array]:
        problems = [f"missing: {name!r}" for name in declared if name not in source]
        arrays: dict[str, jax.Array] = {}
        for name, weight in declared.items():
            if name not in source:
                continue
            value = source[name]
            shape, dtype = (
                tuple(np.shape(value)),
                DType.from_any(np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)),
            )
            if shape != weight.shape:
                problems.append(f"{name!r}: shape {shape}, declared {weight.shape}")
            elif dtype is not weight.dtype:
                problems.append(
                    f"{name!r}: dtype {dtype.name}, declared {weight.dtype.name} (bytes are never reinterpreted)"
                )
            elif isinstance(value, jax.Array) and not value.sharding.is_equivalent_to(
                weight.sharding, len(shape)
            ):
                problems.append(f"{name!r}: sharding {value.sharding}, declared {weight.sharding}")
            else:
                arrays[name] = (
                    value if isinstance(value, jax.Array) else jax.device_put(value, weight.sharding)
                )
        _raise_problems(self.name, problems)
        return arrays

    def _load(self, declared: dict[str, Weight], accessor: Weights) -> dict[str, jax.Array]:
        problems = []
        for name, weight in declared.items():
            node = accessor[name]
            if not node.exists():
                problems.append(f"missing: {name!r}")
            elif _placed_shape(node.info, weight.dtype) != weight.shape:
                problems.append(
                    f"{name!r}: shape {_placed_shape(node.info, weight.dtype)} in the checkpoint, declared "
                    f"{weight.shape}"
                )
        _raise_problems(self.name, problems)
        with self._outside_trace():  # reads, even when called from inside a graph function
            return {
                name: accessor[name].allocate(dtype=weight.dtype, device=weight.sharding).array
                for name, weight in declared.items()
            }

    @contextlib.contextmanager
    def _outside_trace(self) -> Iterator[None]:
        previous = getattr(self._tracing, "weights", None)
        self._tracing.weights = None
        try:
            yield
        finally:
            self._tracing.weights = previous

    def _arguments(self) -> dict[str, jax.Array]:
        """The bound arrays for every declared weight, reading from the graph's checkpoint what is missing."""
        with self._lock:
            unbound = {name: w for name, w in self._declared.items() if name not in self._bound}
            if unbound and self._source is not None:
                self._bound.update(self._load(unbound, self._source))
                unbound = {}
            if unbound:
                raise GraphError(
                    f"Graph {self.name!r} has declared weights with no data: {', '.join(sorted(unbound))}. "
                    f"Call graph.bind(checkpoint) first."
                )
            return {name: self._bound[name] for name in self._declared}

    # -- compiled functions ----------------------------------------------------------------------
    def function(self, fn: Callable[..., Any] | None = None, **jit_options: Any) -> Any:
        """Decorator: ``fn`` jitted with this graph's weights passed as one dict argument.

        Usable as ``@graph.function`` or ``@graph.function(donate_argnums=...)``-style with `jax.jit`
        options (``static_argnums`` and friends refer to ``fn``'s own arguments).

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> @graph.function
            ... def scale(x):
            ...     return x * graph.weights().w.allocate()
            >>> scale(jnp.ones(2)).tolist()
            [3.0, 3.0]
        """
        if fn is None:
            return lambda f: GraphFunction(self, f, **jit_options)
        return GraphFunction(self, fn, **jit_options)

    def compile(self, fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any) -> Any:
        """Compiles ``fn`` ahead of time against the abstract weights (nothing is read) and example
        inputs (arrays or `jax.ShapeDtypeStruct`s); returns a callable taking ``fn``'s arguments.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> import jax
            >>> shift = graph.compile(lambda x: x + graph.weights().w.allocate(), jax.ShapeDtypeStruct((2,), jnp.float32))
            >>> shift(jnp.ones(2)).tolist()
            [4.0, 4.0]
        """
        return GraphFunction(self, fn).compile(*example_args, **example_kwargs)


def _from_catalogue(info: TensorInfo, dtype: DType | None, placement: Placement) -> Weight:
    """A data-less weight laid out as the checkpoint stores it, read later as ``dtype`` on ``placement``
    (a quantized tensor: its blocks in their byte shape, or dequantized to its logical shape)."""
    target = resolve_dtype(info, dtype)
    return Weight(
        name=info.name,
        dtype=target,
        shape=_placed_shape(info, target),
        device=placement if isinstance(placement, DeviceRef) else None,
        sharding=to_sharding(placement),
        quantization_encoding=info.encoding,
        original_dtype=info.dtype,
        value=None,
    )


def _placed_shape(info: TensorInfo, dtype: DType) -> tuple[int, ...]:
    """The shape of ``info`` placed as ``dtype``: a quantized tensor's blocks keep their byte shape."""
    return info.stored_shape if info.encoding is not None and not dtype.is_float() else info.shape


def _declared(request: AllocationRequest) -> Weight:
    """A weight with no data, for a graph without a checkpoint (bound later)."""
    if request.dtype is None or request.shape is None:
        raise GraphError(
            f"Weight {request.name!r} has no checkpoint behind it, so allocate() declares it and needs "
            f"both dtype= and shape= (got dtype={request.dtype!r}, shape={request.shape!r}).",
            tensor=request.name,
        )
    dims = request.shape
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ShapeMismatchError(
            f"Weight {request.name!r}: shape {dims} must hold non-negative integers.", tensor=request.name
        )
    return Weight(
        name=request.name,
        dtype=request.dtype,
        shape=tuple(int(d) for d in dims),
        device=request.device if isinstance(request.device, DeviceRef) else None,
        sharding=request.sharding,
        quantization_encoding=request.quantization_encoding,
        original_dtype=request.dtype,
        value=None,
    )


def _same_layout(a: Weight, b: Weight) -> bool:
    return (
        a.dtype is b.dtype
        and a.shape == b.shape
        and a.quantization_encoding == b.quantization_encoding
        and a.sharding.is_equivalent_to(b.sharding, len(a.shape))
    )


def _raise_problems(graph: str, problems: list[str]) -> None:
    if problems:
        listing = "".join(f"  {line}\n" for line in sorted(problems))
        raise StructureMismatchError(
            f"Cannot bind graph {graph!r}: {len(problems)} problem(s):\n{listing}"
            f"Fix: bind a checkpoint with the same names and shapes as the declared weights."
        )


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0) or 0)


def _check_constants(program: Any, function: GraphFunction) -> None:
    """Raises `GraphError` (or warns) when ``program`` holds constants larger than `CONSTANT_LIMIT`."""
    large = sorted(
        (c for c in _compat.program_constants(program) if _nbytes(c) > CONSTANT_LIMIT),
        key=_nbytes,
        reverse=True,
    )
    if not large:
        return
    graph = function.graph
    shown = ", ".join(f"{c.dtype}{list(np.shape(c))} ({format_bytes(_nbytes(c))})" for c in large[:4])
    more = f" and {len(large) - 4} more" if len(large) > 4 else ""
    message = (
        f"Graph {graph.name!r}, function {function.__name__!r}: the program holds {len(large)} constant(s) "
        f"over {CONSTANT_LIMIT} bytes: {shown}{more}. An array the function closes over (or reads "
        f"without graph.weights()) is baked into the compiled program, and bind() never replaces it. "
        f"Pass it through graph.add_weight(weight), or allocate it from graph.weights() inside the function"
    )
    if graph.constants == "warn":
        warnings.warn(f"{message}.", GraphConstantWarning, stacklevel=5)
    else:
        raise GraphError(f"{message}; Graph(..., constants='warn') makes this a warning.")


class GraphFunction:
    """A function of a `Graph`, jitted with the graph's weights as one dict argument.

    Each new signature (shapes, static arguments) is traced once and its program checked for large
    constants before it compiles (see `CONSTANT_LIMIT`).

    Example:
        >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> graph = jw.Graph("g", weights=path)
        >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
        >>> type(scale).__name__, scale(jnp.ones(2)).tolist()
        ('GraphFunction', [3.0, 3.0])
    """

    __module__ = "jaxweights"

    def __init__(self, graph: Graph, fn: Callable[..., Any], **jit_options: Any) -> None:
        self.graph = graph
        self.fn = fn
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "graph_function")
        self.__doc__ = getattr(fn, "__doc__", None)
        statics = jit_options.pop("static_argnums", ())
        self._statics = frozenset((statics,) if isinstance(statics, int) else statics)
        self._jit_options = {**jit_options, "static_argnums": tuple(i + 1 for i in self._statics)}
        self._jitted = self._jit()
        self._discovered = False
        self._checking = threading.local()

    def _jit(self) -> Any:
        """A fresh `jax.jit` of `_traced` with caches of its own (dropping it drops a rejected trace)."""

        def entry(*args: Any, **kwargs: Any) -> Any:
            return self._traced(*args, **kwargs)

        entry.__name__ = entry.__qualname__ = self.__name__
        self._signatures = 0
        return jax.jit(entry, **self._jit_options)

    def _discover(self, *args: Any, **kwargs: Any) -> None:
        """Runs ``fn`` once, shapes only, so that every weight it adds is recorded before the real
        trace: that trace then sees all weights in its signature and is the only one cached."""
        statics = self._statics
        dynamic = [a for i, a in enumerate(args) if i not in statics]

        def shaped(*values: Any) -> Any:
            iterator = iter(values)
            full = [args[i] if i in statics else next(iterator) for i in range(len(args))]
            return self._traced(_Discovery(), *full, **kwargs)

        jax.eval_shape(shaped, *dynamic)

    def _traced(self, weights: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(weights, _Discovery) and not getattr(self._checking, "active", False):
            raise _UncheckedTraceError
        local = self.graph._tracing
        previous = getattr(local, "weights", None)
        local.weights = weights
        try:
            with self.graph, allocating_with(self.graph._allocate):
                return self.fn(*args, **kwargs)
        finally:
            local.weights = previous

    def _checked(
        self, run: Callable[..., Any], weights: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``run(weights, *args, **kwargs)``; a new signature is first traced and its constants checked."""
        try:
            return run(weights, *args, **kwargs)
        except _UncheckedTraceError:
            pass
        previous = getattr(self._checking, "active", False)
        self._checking.active = True
        try:
            program = self._jitted.trace(weights, *args, **kwargs).jaxpr
            self._signatures += 1
            try:
                _check_constants(program, self)
            except GraphError:
                self._jitted = self._jit()  # forget the rejected trace: the next call checks it again
                raise
            return run(weights, *args, **kwargs)
        finally:
            self._checking.active = previous

    def _retrying(
        self,
        run: Callable[..., Any],
        weights: Callable[[], dict[str, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not self._discovered:
            self._discover(*args, **kwargs)
            self._discovered = True
        try:
            return self._checked(run, weights(), args, kwargs)
        except _NewWeightsError:  # a new trace (new static arguments, shapes) added weights
            self._discover(*args, **kwargs)
            return self._checked(run, weights(), args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(self._jitted, self.graph._arguments, args, kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).trace` with the weights as abstract values: its ``jaxpr`` is the program that
        compiles, with the weights among its inputs and its ``consts`` what is baked in.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
            >>> traced = scale.trace(jnp.ones(2))
            >>> len(traced.jaxpr.in_avals), traced.jaxpr.consts  # x and w are inputs; nothing is baked in
            (2, [])
        """
        return self._retrying(self._jitted.trace, lambda: self.graph.declared, args, kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).lower` with the weights as abstract values: no weight is read or embedded.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
            >>> lowered = scale.lower(jnp.ones(2))
            >>> "stablehlo.constant" in lowered.as_text(), graph.bound  # w is an argument; nothing read
            (False, {})
        """
        return self._retrying(self._jitted.lower, lambda: self.graph.declared, args, kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        """Compiles ahead of time; the result is called with ``fn``'s arguments and binds the weights.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
            >>> compiled = scale.compile(jnp.ones(2))
            >>> compiled(jnp.ones(2)).tolist()
            [3.0, 3.0]
        """
        compiled = self.lower(*args, **kwargs).compile()
        graph = self.graph

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            return compiled(graph._arguments(), *call_args, **call_kwargs)

        run.compiled = compiled  # type: ignore[attr-defined]
        return run

    def cache_size(self) -> int:
        """Entries in the underlying jit cache (1 after swapping checkpoints of the same layout); where
        JAX does not expose that count, the number of signatures traced.

        Example:
            >>> import tempfile, jax.numpy as jnp, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.full(2, 3, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> graph = jw.Graph("g", weights=path)
            >>> scale = graph.function(lambda x: x * graph.weights().w.allocate())
            >>> _ = scale(jnp.ones(2)), scale(jnp.zeros(2))
            >>> scale.cache_size()
            1
        """
        size = _compat.jit_cache_size(self._jitted)
        return size if size is not None else self._signatures
