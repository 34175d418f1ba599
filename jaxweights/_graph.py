"""The graph layer: weights recorded by name and kept outside the jitted computation.

A `Graph` holds name -> abstract weight (`jax.ShapeDtypeStruct` with its sharding) and, once bound, name ->
`jax.Array`. Functions made with `Graph.function` are jitted with the weights as one dict argument, so
weights never enter HLO as constants, swapping a checkpoint reuses the compiled executable, and a graph
lowers and compiles from the abstract weights before any byte is read.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from . import _weights as _weights_module
from ._devices import DeviceRef, Placement, to_sharding
from ._dtypes import DType, DTypeLike
from ._weights import Weight, Weights, _Store, load_weights
from .errors import StructureMismatchError
from .formats import Checkpoint, PathsLike, WeightsFormat

__all__ = ["Graph", "GraphFunction"]

_current: contextvars.ContextVar[tuple[Graph, ...]] = contextvars.ContextVar("jaxweights_graph", default=())


class _NewWeightsError(Exception):
    """Raised out of a trace when it added weights the traced dict lacked: trace again with them."""


_DISCOVERING: Any = object()


def _reuse_bound(name: str, dtype: DType, sharding: Any) -> jax.Array | None:
    """What `Weights.allocate` asks before reading: inside a graph function's trace, a weight already
    bound with the same dtype and sharding is reused instead of being read again."""
    graph = Graph.current()
    if graph is None or getattr(graph._tracing, "weights", None) is None:
        return None
    with graph._lock:
        existing = graph._declared.get(name)
        array = graph._bound.get(name)
    if existing is None or array is None or existing.dtype is not dtype:
        return None
    return array if array.sharding.is_equivalent_to(sharding, array.ndim) else None


class Graph:
    """Named weights kept outside compiled functions, after MAX's ``Graph``.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"fc.weight": np.eye(3, dtype=np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> graph = jw.Graph("mlp", weights=jw.load_weights(path))
        >>> weights = graph.weights()
        >>> @graph.function
        ... def forward(x):
        ...     return x @ graph.add_weight(weights.fc.weight.allocate()).T
        >>> forward(jnp.ones(3)).tolist()
        [1.0, 1.0, 1.0]
        >>> "dense<" in forward.lower(jnp.ones(3)).as_text()  # no weight baked into the HLO
        False
    """

    def __init__(self, name: str, weights: Weights | PathsLike | None = None) -> None:
        self.name = name
        if weights is None:
            self._source: Weights | None = None
        elif isinstance(weights, Weights):
            self._source = weights
        else:
            self._source = load_weights(weights)
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
        """The innermost graph entered with ``with graph:``, if any."""
        stack = _current.get()
        return stack[-1] if stack else None

    # -- weights ---------------------------------------------------------------------------------
    def weights(self) -> Weights:
        """The hierarchical accessor for this graph's weights.

        With a checkpoint, it is the checkpoint's accessor (`allocate` reads). Without one, `allocate`
        declares: it returns a data-less `Weight` (``dtype=`` and ``shape=`` required) whose array is
        bound later with `bind`.
        """
        if self._source is not None:
            return self._source
        empty = Checkpoint(WeightsFormat.safetensors, {}, [])
        return Weights(_Store(empty, declaring=True))

    @property
    def declared(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Every weight added so far, as abstract values with shardings (the compiled signature)."""
        with self._lock:
            return {name: weight.abstract for name, weight in self._declared.items()}

    @property
    def bound(self) -> dict[str, jax.Array]:
        """The arrays currently bound to the declared names."""
        with self._lock:
            return dict(self._bound)

    def add_weight(
        self, weight: Weight | Weights, *, dtype: DTypeLike | None = None, device: Placement | None = None
    ) -> Any:
        """Records a weight and returns the value to compute with.

        Inside a function made by `function` it returns the traced argument for the weight's name (never
        a constant); outside, the bound `jax.Array` (or, for a weight not bound yet, its
        `jax.ShapeDtypeStruct`). Adding a weight with a name already present returns the same value if it
        has the same dtype, shape and sharding, and raises `ValueError` otherwise.

        ``weight`` may also be an accessor (``weights.fc.weight``): the weight is then declared from the
        checkpoint's catalogue (with ``dtype``/``device`` if given) and read only when first needed.
        """
        if isinstance(weight, Weights):
            weight = self._declare_from(weight, dtype, device)
        with self._lock:
            existing = self._declared.get(weight.name)
            if existing is None:
                self._declared[weight.name] = weight
                if weight.value is not None:
                    self._bound[weight.name] = weight.value
            else:
                if not _same_layout(existing, weight):
                    raise ValueError(
                        f"Weight {weight.name!r} already exists in graph {self.name!r} as "
                        f"{existing.dtype.name}{list(existing.shape)} on {existing.sharding}; the one added now "
                        f"is {weight.dtype.name}{list(weight.shape)} on {weight.sharding}. Give it another name."
                    )
        traced = getattr(self._tracing, "weights", None)
        if traced is _DISCOVERING:  # shape-only pass that finds the weights a function uses
            return jax.numpy.zeros(weight.shape, weight.dtype.to_numpy())
        if traced is not None:
            if weight.name not in traced:  # recorded now: trace again with it in the signature
                raise _NewWeightsError(weight.name)
            return traced[weight.name]
        with self._lock:
            return self._bound.get(weight.name, self._declared[weight.name].abstract)

    def _declare_from(self, accessor: Weights, dtype: DTypeLike | None, device: Placement | None) -> Weight:
        info = accessor.info
        target = DType.from_any(dtype) if dtype is not None else info.dtype
        placement = device if device is not None else DeviceRef.CPU()
        return Weight(
            name=info.name,
            dtype=target,
            shape=info.shape,
            device=placement if isinstance(placement, DeviceRef) else None,
            sharding=to_sharding(placement),
            quantization_encoding=info.encoding,
            original_dtype=info.dtype,
            value=None,
        )

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, source: Weights | PathsLike | Mapping[str, Any]) -> None:
        """Binds data to every declared weight, from a checkpoint (an accessor or paths) or a dict of arrays.

        Names, shapes, dtypes and shardings are checked first and every problem is reported in one
        `StructureMismatchError` (names missing from the source, and shape mismatches; for dicts of arrays
        also dtype and sharding mismatches). From a checkpoint, each weight is read with its declared
        dtype and sharding. Same names and shapes mean compiled functions are reused, not recompiled.
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
                self._source = source if isinstance(source, Weights) else accessor

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
            elif node.info.shape != weight.shape:
                problems.append(
                    f"{name!r}: shape {node.info.shape} in the checkpoint, declared {weight.shape}"
                )
        _raise_problems(self.name, problems)
        return {
            name: accessor[name].allocate(dtype=weight.dtype, device=weight.sharding).array
            for name, weight in declared.items()
        }

    def _arguments(self) -> dict[str, jax.Array]:
        """The bound arrays for every declared weight, reading from the graph's checkpoint what is missing."""
        with self._lock:
            unbound = {name: w for name, w in self._declared.items() if name not in self._bound}
            if unbound and self._source is not None:
                self._bound.update(self._load(unbound, self._source))
                unbound = {}
            if unbound:
                raise ValueError(
                    f"Graph {self.name!r} has declared weights with no data: {', '.join(sorted(unbound))}. "
                    f"Call graph.bind(checkpoint) first."
                )
            return {name: self._bound[name] for name in self._declared}

    # -- compiled functions ----------------------------------------------------------------------
    def function(self, fn: Callable[..., Any] | None = None, **jit_options: Any) -> Any:
        """Decorator: ``fn`` jitted with this graph's weights passed as one dict argument.

        Usable as ``@graph.function`` or ``@graph.function(donate_argnums=...)``-style with `jax.jit`
        options (``static_argnums`` and friends refer to ``fn``'s own arguments).
        """
        if fn is None:
            return lambda f: GraphFunction(self, f, **jit_options)
        return GraphFunction(self, fn, **jit_options)

    def compile(self, fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any) -> Any:
        """Compiles ``fn`` ahead of time against the abstract weights (nothing is read) and example
        inputs (arrays or `jax.ShapeDtypeStruct`s); returns a callable taking ``fn``'s arguments."""
        return GraphFunction(self, fn).compile(*example_args, **example_kwargs)


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


class GraphFunction:
    """A function of a `Graph`, jitted with the graph's weights as one dict argument."""

    def __init__(self, graph: Graph, fn: Callable[..., Any], **jit_options: Any) -> None:
        self.graph = graph
        self.fn = fn
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "graph_function")
        self.__doc__ = getattr(fn, "__doc__", None)
        statics = jit_options.pop("static_argnums", ())
        self._statics = frozenset((statics,) if isinstance(statics, int) else statics)
        self._jitted = jax.jit(
            self._traced, static_argnums=tuple(i + 1 for i in self._statics), **jit_options
        )
        self._discovered = False

    def _discover(self, *args: Any, **kwargs: Any) -> None:
        """Runs ``fn`` once, shapes only, so that every weight it adds is recorded (and read) before the
        real trace: that trace then sees all weights in its signature and is the only one cached."""
        statics = self._statics
        dynamic = [a for i, a in enumerate(args) if i not in statics]

        def shaped(*values: Any) -> Any:
            iterator = iter(values)
            full = [args[i] if i in statics else next(iterator) for i in range(len(args))]
            return self._traced(_DISCOVERING, *full, **kwargs)

        jax.eval_shape(shaped, *dynamic)

    def _traced(self, weights: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        local = self.graph._tracing
        previous = getattr(local, "weights", None)
        local.weights = weights
        try:
            with self.graph:
                return self.fn(*args, **kwargs)
        finally:
            local.weights = previous

    def _retrying(self, call: Callable[[], Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._discovered:
            self._discover(*args, **kwargs)
            self._discovered = True
        try:
            return call()
        except _NewWeightsError:  # a new trace (new static arguments, shapes) added weights
            self._discover(*args, **kwargs)
            return call()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(lambda: self._jitted(self.graph._arguments(), *args, **kwargs), args, kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).lower` with the weights as abstract values: no weight is read or embedded."""
        return self._retrying(lambda: self._jitted.lower(self.graph.declared, *args, **kwargs), args, kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        """Compiles ahead of time; the result is called with ``fn``'s arguments and binds the weights."""
        compiled = self.lower(*args, **kwargs).compile()
        graph = self.graph

        def run(*call_args: Any, **call_kwargs: Any) -> Any:
            return compiled(graph._arguments(), *call_args, **call_kwargs)

        run.compiled = compiled  # type: ignore[attr-defined]
        return run

    def cache_size(self) -> int:
        """Entries in the underlying jit cache (1 after swapping checkpoints of the same layout)."""
        return int(self._jitted._cache_size())  # type: ignore[attr-defined]


_weights_module._graph_reuse = _reuse_bound
