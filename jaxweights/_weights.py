"""The hierarchical accessor (`Weights`), what it returns (`WeightData`, `Weight`), and `load_weights`.

``weights.a.layers[0].b`` and ``weights["a.layers"][0]["b"]`` both name ``a.layers.0.b``. An accessor is a
name plus a shared store (the catalogue and the ``allocated_weights`` dict); it never parses bytes and
never reads any until `data` or `allocate` is called.
"""

from __future__ import annotations

import bisect
import difflib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from . import _display
from ._devices import DeviceRef, Placement, to_sharding
from ._dtypes import DType, DTypeLike
from ._keymap import KeyMap
from ._loader import DEFAULT_BUDGET, Job, load_all
from ._multihost import catalogue_digest, check_same_checkpoint
from ._placement import place, resolve_dtype
from ._pytree import nest
from ._quantization import QuantizationEncoding
from ._restore import restore as restore_tree
from ._rules import Rules, resolve_shardings
from .errors import (
    DTypeError,
    QuantizationError,
    ShapeMismatchError,
    WeightNotFoundError,
)
from .formats import Checkpoint, PathsLike, TensorInfo, open_checkpoint

__all__ = ["Weight", "WeightData", "Weights", "load_weights", "restore"]


# ---------------------------------------------------------------------------------------------
# WeightData
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class WeightData:
    """A tensor's data on the host with its metadata, as `Weights.data` returns it.

    Attributes:
        data: the values, usually a read-only zero-copy view of the file.
        name: full dotted name.
        dtype: element type of ``data``.
        shape: shape of ``data``.
        quantization_encoding: the block encoding of quantized tensors, else None.

    Example:
        >>> import numpy as np
        >>> from jaxweights import DType, WeightData
        >>> wd = WeightData.from_numpy(np.arange(4, dtype=np.float32), "w")
        >>> wd.astype(DType.float32) is wd, wd.astype("float16").dtype
        (True, <DType.float16>)
    """

    data: np.ndarray
    name: str
    dtype: DType
    shape: tuple[int, ...]
    quantization_encoding: QuantizationEncoding | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray, name: str) -> WeightData:
        """Wraps a numpy array (not copied)."""
        array = np.asarray(array)
        return cls(array, name, DType.from_numpy(array.dtype), tuple(array.shape))

    def astype(self, dtype: DTypeLike) -> WeightData:
        """This data converted to ``dtype`` (a new host copy), or ``self`` when it already is.

        Raises:
            DTypeError: the data is quantized; dequantize it instead.
        """
        target = DType.from_any(dtype)
        if target is self.dtype:
            return self
        if self.quantization_encoding is not None:
            raise DTypeError(
                f"Tensor {self.name!r} holds {self.quantization_encoding.name} blocks; converting their "
                f"raw bytes to {target.name} would be meaningless. Dequantize instead.",
                tensor=self.name,
            )
        return replace(self, data=self.data.astype(target.to_numpy()), dtype=target)

    def view(self, dtype: DTypeLike) -> WeightData:
        """The same bytes reinterpreted as ``dtype`` (the last dimension scales by the size ratio)."""
        target = DType.from_any(dtype)
        data = self.data.view(target.to_numpy())
        return replace(self, data=data, dtype=target, shape=tuple(data.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by ``data``."""
        return int(self.data.nbytes)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        return self.data if dtype is None else self.data.astype(dtype)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.data.__dlpack_device__()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        encoding = f", {self.quantization_encoding.name}" if self.quantization_encoding else ""
        return f"WeightData({self.name!r}, {self.dtype.name}{list(self.shape)}{encoding})"


# ---------------------------------------------------------------------------------------------
# Weight
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class Weight:
    """An allocated weight: its name and layout, and ``array``, a placed `jax.Array`.

    A `Weight` is a pytree whose one leaf is ``array``, so it passes through `jax.jit` and
    `jax.tree.map`; it converts with ``np.asarray``/``jnp.asarray`` and supports the arithmetic operators.
    Pass ``weight.array`` where a function insists on a `jax.Array`.

    Attributes:
        name: full dotted name.
        dtype: element type of ``array``.
        shape: shape of ``array``.
        device: the `DeviceRef` of a single-device array, None for a multi-device sharding.
        sharding: the array's `jax.sharding.Sharding`.
        quantization_encoding: block encoding of quantized weights, else None.
        original_dtype: the dtype stored in the file.
        value: the placed `jax.Array`, or None for a weight declared on a `Graph` (see `array`).

    Example:
        >>> import tempfile, jax, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.eye(2, dtype=np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weight = jw.load_weights(path).w.allocate(dtype="bfloat16")
        >>> weight, weight.original_dtype
        (Weight('w', bfloat16[2, 2], cpu:0), <DType.float32>)
        >>> (weight @ np.ones(2, np.float32)).tolist(), jax.jit(lambda w: w.array.sum())(weight).item()
        ([1.0, 1.0], 2.0)
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    device: DeviceRef | None
    sharding: Sharding
    quantization_encoding: QuantizationEncoding | None
    original_dtype: DType
    value: jax.Array | None = field(repr=False)

    @property
    def array(self) -> jax.Array:
        """The placed `jax.Array`.

        Raises:
            ValueError: the weight was declared on a `Graph` without data (bind the graph first).
        """
        return self._value()

    @property
    def declared(self) -> bool:
        """True for a weight declared on a `Graph` without data (its array is bound later)."""
        return self.value is None

    @property
    def abstract(self) -> jax.ShapeDtypeStruct:
        """The weight as a `jax.ShapeDtypeStruct` with its sharding (what a graph compiles against)."""
        return jax.ShapeDtypeStruct(self.shape, self.dtype.to_numpy(), sharding=self.sharding)

    def _value(self) -> jax.Array:
        if self.value is None:
            raise ValueError(
                f"Weight {self.name!r} is declared ({self.dtype.name}{list(self.shape)}) but has no data yet; "
                f"bind its graph to a checkpoint (graph.bind(...)) and use graph.add_weight(weight)."
            )
        return self.value

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
        return (self.value,), (
            self.name,
            self.dtype,
            self.shape,
            self.device,
            self.sharding,
            self.quantization_encoding,
            self.original_dtype,
        )

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Weight:
        name, dtype, shape, device, sharding, encoding, original = aux
        return cls(name, dtype, shape, device, sharding, encoding, original, value=children[0])

    def __jax_array__(self) -> jax.Array:
        return self._value()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = np.asarray(self._value())
        return host if dtype is None else host.astype(dtype)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def T(self) -> Any:  # noqa: N802 - array API name
        """The transposed array."""
        return self._value().T

    def __getitem__(self, index: Any) -> Any:
        return self._value()[index]

    def __matmul__(self, other: Any) -> Any:
        return self._value() @ other

    def __rmatmul__(self, other: Any) -> Any:
        return other @ self._value()

    def __add__(self, other: Any) -> Any:
        return self._value() + other

    def __radd__(self, other: Any) -> Any:
        return other + self._value()

    def __sub__(self, other: Any) -> Any:
        return self._value() - other

    def __rsub__(self, other: Any) -> Any:
        return other - self._value()

    def __mul__(self, other: Any) -> Any:
        return self._value() * other

    def __rmul__(self, other: Any) -> Any:
        return other * self._value()

    def __truediv__(self, other: Any) -> Any:
        return self._value() / other

    def __rtruediv__(self, other: Any) -> Any:
        return other / self._value()

    def __neg__(self) -> Any:
        return -self._value()

    def __repr__(self) -> str:
        where = str(self.device) if self.device is not None else repr(self.sharding)
        declared = ", declared" if self.value is None else ""
        return f"Weight({self.name!r}, {self.dtype.name}{list(self.shape)}, {where}{declared})"


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


_graph_reuse: Any = None  # set by jaxweights._graph: inside a graph's trace, reuse an already-bound weight


class _Store:
    """What every accessor of one tree shares: the catalogue, its sorted names, allocated arrays."""

    def __init__(self, checkpoint: Checkpoint, *, declaring: bool = False) -> None:
        self.checkpoint = checkpoint
        self.declaring = declaring  # a graph's weights() without a checkpoint: allocate() declares
        self.names = sorted(checkpoint)
        self.allocated: dict[str, jax.Array] = {}
        self.lock = threading.Lock()

    def under(self, prefix: str) -> tuple[int, int]:
        """Index range in ``names`` of the tensors strictly under ``prefix`` (whole segments)."""
        if not prefix:
            return 0, len(self.names)
        lead = prefix + "."
        low = bisect.bisect_left(self.names, lead)
        high = bisect.bisect_left(self.names, prefix + "/")  # "/" sorts right after "."
        return low, high

    def children(self, prefix: str) -> list[str]:
        """The distinct next segments under ``prefix``, in natural order (2 before 10)."""
        low, high = self.under(prefix)
        skip = len(prefix) + 1 if prefix else 0
        seen: dict[str, None] = {}
        for name in self.names[low:high]:
            seen.setdefault(name[skip:].split(".", 1)[0], None)
        return sorted(seen, key=_natural_key)


def _natural_key(segment: str) -> tuple[int, int, str]:
    return (0, int(segment), "") if segment.isdigit() else (1, 0, segment)


def _join(prefix: str, segment: str) -> str:
    return f"{prefix}.{segment}" if prefix else segment


class Weights:
    """Hierarchical access to the tensors of a checkpoint, following MAX's ``Weights`` protocol.

    Attribute and index access build a dotted name without reading anything; `data` and `allocate`
    read. Every accessor of one tree shares `allocated_weights`.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file(
        ...     {"layers.0.w": np.ones((2, 2), np.float32), "layers.1.w": np.zeros(3, np.float16)},
        ...     f"{tempfile.mkdtemp()}/model.safetensors",
        ... )
        >>> weights = jw.load_weights(path)
        >>> weights.layers[0].w.name
        'layers.0.w'
        >>> [name for name, _ in weights.layers.items()]
        ['0.w', '1.w']
        >>> weights.layers[1].w.allocate(dtype=jw.DType.float32).array
        Array([0., 0., 0.], dtype=float32)
        >>> list(weights.allocated_weights)
        ['layers.1.w']
    """

    __slots__ = ("_prefix", "_store")

    def __init__(self, store: _Store, prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix

    # -- naming ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The full dotted name this accessor stands for (``""`` at the root)."""
        return self._prefix

    def __getattr__(self, attr: str) -> Weights:
        if attr.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__!r} has no attribute {attr!r} (private and dunder names are "
                f"never weight names; use weights[{attr!r}] for a tensor named like that)."
            )
        return Weights(self._store, _join(self._prefix, attr))

    def __getitem__(self, key: int | np.integer[Any] | str) -> Weights:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key)
            if index < 0:
                numeric = [c for c in self._store.children(self._prefix) if c.isdigit()]
                if -index > len(numeric):
                    raise IndexError(
                        f"Index {index} is out of range for {self._prefix or 'the root'!r}, which has "
                        f"{len(numeric)} numbered children."
                    )
                return Weights(self._store, _join(self._prefix, numeric[index]))
            return Weights(self._store, _join(self._prefix, str(index)))
        if isinstance(key, str):
            if not key or key.startswith(".") or key.endswith("."):
                raise KeyError(f"{key!r} is not a weight name segment: names are dot-separated, non-empty.")
            return Weights(self._store, _join(self._prefix, key))
        raise TypeError(f"Weights are indexed by int or str, not {type(key).__name__}.")

    def __dir__(self) -> list[str]:
        public = [n for n in dir(type(self)) if not n.startswith("_")]
        segments = [c for c in self._store.children(self._prefix) if c.isidentifier()]
        return sorted(set(public) | set(segments))

    def _ipython_key_completions_(self) -> list[str]:
        return self._store.children(self._prefix)

    def __iter__(self) -> Iterator[Weights]:
        """The accessors one level down, in natural order (``layers[0]``, ``layers[1]``, ...)."""
        for segment in self._store.children(self._prefix):
            yield Weights(self._store, _join(self._prefix, segment))

    def __len__(self) -> int:
        return len(self._store.children(self._prefix))

    def __bool__(self) -> bool:
        return self.exists() or self._count() > 0

    def __contains__(self, key: object) -> bool:
        if isinstance(key, (int, str)) and not isinstance(key, bool):
            child = _join(self._prefix, str(key))
            return (
                child in self._store.checkpoint or self._store.under(child)[0] != self._store.under(child)[1]
            )
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weights) and other._store is self._store and other._prefix == self._prefix

    def __hash__(self) -> int:
        return hash((id(self._store), self._prefix))

    def __copy__(self) -> Weights:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Weights:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self._store.checkpoint.sources, self._prefix))

    # -- the protocol --------------------------------------------------------------------------
    def exists(self) -> bool:
        """True only if a tensor has exactly this name."""
        return self._prefix in self._store.checkpoint

    def items(self) -> Iterator[tuple[str, Weights]]:
        """Every tensor at or under this name, sorted, as (name relative to this one, accessor).

        Prefixes match whole segments: ``layers.1`` does not match ``layers.10``. A tensor named exactly
        like this accessor comes first, with the relative name ``""``.
        """
        store = self._store
        if self.exists():
            yield "", self
        low, high = store.under(self._prefix)
        skip = len(self._prefix) + 1 if self._prefix else 0
        for name in store.names[low:high]:
            yield name[skip:], Weights(store, name)

    def keys(self) -> list[str]:
        """The relative names `items` yields."""
        return [name for name, _ in self.items()]

    @property
    def info(self) -> TensorInfo:
        """Where this tensor's bytes are and what they are, without reading them.

        Raises:
            WeightNotFoundError: no tensor has exactly this name.
        """
        try:
            return self._store.checkpoint[self._prefix]
        except KeyError:
            raise self._not_found() from None

    def data(self) -> WeightData:
        """The tensor's values and metadata; ``data`` is a read-only view of the file (zero-copy).

        Raises:
            WeightNotFoundError: no tensor has exactly this name (a KeyError, with close matches).
        """
        info = self.info
        view = self._store.checkpoint.view(info)
        return WeightData(view, info.name, info.dtype, tuple(view.shape), info.encoding)

    def allocate(
        self,
        dtype: DTypeLike | None = None,
        shape: Iterable[int] | None = None,
        quantization_encoding: QuantizationEncoding | str | None = None,
        device: Placement = DeviceRef.CPU(),  # noqa: B008 - an immutable default, as in MAX
    ) -> Weight:
        """Reads the tensor into a placed `jax.Array` and records it in `allocated_weights`.

        Args:
            dtype: the element type to produce; a different one from the stored type converts (on the
                host for CPU, on the device otherwise). None keeps the stored type (64-bit types follow
                ``jax_enable_x64``).
            shape: the shape the caller expects; it must equal the stored shape.
            quantization_encoding: the encoding the caller expects; it must match the stored one.
            device: a `DeviceRef`, a `jax.Device` or any `jax.sharding.Sharding`. With a sharding, each
                device's block is read on its own, never the whole tensor.

        Raises:
            WeightNotFoundError: no tensor has this name.
            ShapeMismatchError: ``shape`` differs from the stored shape.
            QuantizationError: ``quantization_encoding`` differs from the stored encoding.
            DTypeError, DeviceError, ShardingError: the dtype, device or sharding cannot be used.
        """
        if self._store.declaring and not self.exists():
            return self._declare(dtype, shape, quantization_encoding, device)
        info = self.info
        if shape is not None:
            wanted = _as_shape(shape, info)
            if wanted != info.shape:
                raise ShapeMismatchError(
                    f"Tensor {info.name!r} in {info.file} has shape {info.shape}, but allocate() was "
                    f"asked for {wanted}. Pass shape={info.shape} (or omit it) and reshape the array "
                    f"afterwards if you need another layout.",
                    file=info.file,
                    tensor=info.name,
                )
        encoding = QuantizationEncoding.from_any(quantization_encoding) if quantization_encoding else None
        if encoding is not None and encoding != info.encoding:
            stored = info.encoding.name if info.encoding else "no quantization"
            raise QuantizationError(
                f"Tensor {info.name!r} in {info.file} has {stored}, but allocate() was asked for "
                f"{encoding.name}. jaxweights does not re-quantize; omit quantization_encoding.",
                file=info.file,
                tensor=info.name,
            )
        if info.encoding is not None and dtype is not None and DType.from_any(dtype) is not info.dtype:
            raise DTypeError(
                f"Tensor {info.name!r} in {info.file} holds {info.encoding.name} blocks; dtype= cannot "
                f"convert them. Omit dtype, and dequantize the blocks instead.",
                file=info.file,
                tensor=info.name,
            )
        target = resolve_dtype(info, DType.from_any(dtype) if dtype is not None else None)
        sharding = to_sharding(device)
        reused = _graph_reuse(info.name, target, sharding) if _graph_reuse is not None else None
        array = reused if reused is not None else place(self._store.checkpoint, info, target, sharding)
        with self._store.lock:
            self._store.allocated[info.name] = array
        return Weight(
            name=info.name,
            dtype=target,
            shape=tuple(array.shape),
            device=device if isinstance(device, DeviceRef) else _device_ref(array),
            sharding=array.sharding,
            quantization_encoding=info.encoding,
            original_dtype=info.dtype,
            value=array,
        )

    def _declare(
        self,
        dtype: DTypeLike | None,
        shape: Iterable[int] | None,
        quantization_encoding: QuantizationEncoding | str | None,
        device: Placement,
    ) -> Weight:
        """A weight with no data, for a `Graph` whose checkpoint is bound later."""
        if dtype is None or shape is None:
            raise ValueError(
                f"Weight {self._prefix!r} has no checkpoint behind it, so allocate() declares it and needs "
                f"both dtype= and shape= (got dtype={dtype!r}, shape={shape!r})."
            )
        dims = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise ShapeMismatchError(
                f"Weight {self._prefix!r}: shape {dims} must hold non-negative integers."
            )
        target = DType.from_any(dtype)
        sharding = to_sharding(device)
        return Weight(
            name=self._prefix,
            dtype=target,
            shape=tuple(int(d) for d in dims),
            device=device if isinstance(device, DeviceRef) else None,
            sharding=sharding,
            quantization_encoding=QuantizationEncoding.from_any(quantization_encoding)
            if quantization_encoding
            else None,
            original_dtype=target,
            value=None,
        )

    def _jobs(
        self,
        mesh: Mesh | None,
        rules: Rules | None,
        device: Placement,
        dtype: DTypeLike | None,
        strict: bool,
        first_match: bool,
        *,
        check_processes: bool,
    ) -> tuple[list[tuple[str, Weights]], list[Job]]:
        """The tensors under this name and how each is to be placed, every check done, nothing read."""
        entries = list(self.items())
        if not entries:
            raise self._not_found()
        infos = [accessor.info for _, accessor in entries]
        if check_processes:  # first: a process that fails a later check must not strand the others
            check_same_checkpoint(catalogue_digest(infos))
        default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else to_sharding(device)
        shardings = resolve_shardings(
            infos, mesh=mesh, rules=rules, default=default, strict=strict, first_match=first_match
        )
        wanted = DType.from_any(dtype) if dtype is not None else None
        jobs = [
            Job(
                info,
                resolve_dtype(
                    info, wanted if wanted and info.dtype.is_float() and not info.encoding else None
                ),
                shardings[info.name],
            )
            for info in infos
        ]
        return entries, jobs

    def allocate_all(
        self,
        *,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
        device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
        dtype: DTypeLike | None = None,
        strict: bool = False,
        first_match: bool = False,
        progress: bool | None = None,
        max_inflight_bytes: int = DEFAULT_BUDGET,
    ) -> dict[str, jax.Array]:
        r"""Allocates every tensor at or under this name, in parallel, sharded by rules.

        Every sharding, dtype and (in a multi-process job) the agreement of all processes on the
        checkpoint is checked before any byte is read; each process then reads only the blocks its
        devices hold, each distinct block once.

        Args:
            mesh: the mesh that rules' `PartitionSpec`s refer to. Unmatched tensors are replicated over it.
            rules: ``[(regex, PartitionSpec), ...]`` (or a dict) matched with `re.search` against full
                names, or a callable ``(name, TensorInfo) -> Sharding | PartitionSpec | None``.
            device: the placement of every tensor when no mesh is given.
            dtype: converts the floating-point tensors; integer and bool tensors keep their type.
            strict: raise for tensors no rule matches instead of replicating them.
            first_match: when several patterns match a name, the first in table order wins (otherwise
                patterns that disagree are an error).
            progress: show a progress bar on stderr; None shows one for large loads on a terminal.
            max_inflight_bytes: bytes being read at once (bounds host staging memory).

        Returns:
            ``{name relative to this accessor: jax.Array}`` in `items` order; every array is also
            recorded in `allocated_weights` under its full name.

        Raises:
            WeightNotFoundError: nothing lives at or under this name.
            ShardingError: one error listing every tensor that cannot be sharded as asked.
            CheckpointError: another process of the job loads a different checkpoint.

        Example:
            >>> import tempfile, jax, numpy as np, jaxweights as jw
            >>> from jax.sharding import Mesh, PartitionSpec as P
            >>> path = jw.save_file(
            ...     {"mlp.w": np.ones((8, 4), np.float32), "mlp.b": np.zeros(4, np.float32)},
            ...     f"{tempfile.mkdtemp()}/m.safetensors",
            ... )
            >>> mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
            >>> arrays = jw.load_weights(path).mlp.allocate_all(mesh=mesh, rules=[(r"\.w$", P("x"))])
            >>> {name: a.sharding.spec for name, a in arrays.items()}
            {'b': P(), 'w': P('x',)}
        """
        entries, jobs = self._jobs(mesh, rules, device, dtype, strict, first_match, check_processes=True)
        arrays = load_all(
            self._store.checkpoint, jobs, max_inflight_bytes=max_inflight_bytes, progress=progress
        )
        with self._store.lock:
            self._store.allocated.update(arrays)
        return {relative: arrays[accessor.name] for relative, accessor in entries}

    def to_pytree(
        self,
        *,
        lists: bool = True,
        shapes_only: bool = False,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
        device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
        dtype: DTypeLike | None = None,
        strict: bool = False,
        first_match: bool = False,
        progress: bool | None = None,
    ) -> Any:
        """The tensors at or under this name as a nested pytree of placed arrays.

        Names relative to this accessor become nested dicts; numbered children that run 0..n-1 become
        lists (``lists=False`` keeps them as dicts with string keys). Placement, sharding rules and
        ``dtype`` work as in `allocate_all`. With ``shapes_only`` the leaves are `jax.ShapeDtypeStruct`s
        carrying their shardings, and nothing is read.

        Raises:
            StructureMismatchError: a name is both a tensor and a prefix of others (``a``, ``a.b``).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file(
            ...     {"enc.layer.0.w": np.ones(2, np.float32), "enc.layer.1.w": np.zeros(2, np.float32)},
            ...     f"{tempfile.mkdtemp()}/m.safetensors",
            ... )
            >>> tree = jw.load_weights(path).enc.to_pytree()
            >>> type(tree["layer"]).__name__, tree["layer"][1]["w"].tolist()
            ('list', [0.0, 0.0])
            >>> jw.load_weights(path).enc.to_pytree(shapes_only=True)["layer"][0]["w"]
            ShapeDtypeStruct(shape=(2,), dtype=float32, sharding=...)
        """
        if shapes_only:
            entries, jobs = self._jobs(mesh, rules, device, dtype, strict, first_match, check_processes=False)
            leaves = [
                (relative, jax.ShapeDtypeStruct(job.info.shape, job.dtype.to_numpy(), sharding=job.sharding))
                for (relative, _), job in zip(entries, jobs, strict=True)
            ]
            return nest(leaves, lists=lists)
        arrays = self.allocate_all(
            mesh=mesh,
            rules=rules,
            device=device,
            dtype=dtype,
            strict=strict,
            first_match=first_match,
            progress=progress,
        )
        return nest(arrays.items(), lists=lists)

    def restore(
        self,
        target: Any,
        *,
        keymap: KeyMap | None = None,
        strict: bool = True,
        cast: bool = False,
        device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
        progress: bool | None = None,
        max_inflight_bytes: int = DEFAULT_BUDGET,
    ) -> Any:
        """Fills a target pytree from the tensors at or under this name; returns a new tree.

        The target gives the structure, shapes, dtypes and shardings: a pytree of `jax.Array`s, numpy
        arrays or `jax.ShapeDtypeStruct`s (abstract, e.g. from `jax.eval_shape`, with or without
        shardings), a Flax NNX `State` or module (a new module is returned), an Equinox module, an optax
        state, or any mix. Leaf key paths joined by dots name the tensors, relative to this accessor;
        ``keymap`` renames them and transforms tensors (`TORCH_TO_FLAX` for PyTorch layouts). Python
        scalars (a step counter) come from the metadata `jaxweights.save` wrote; functions and other
        static leaves are kept. Nothing in ``target`` is modified.

        Every difference is checked before any tensor is read and reported in one
        `StructureMismatchError`, sorted, with close matches: names the target needs but the checkpoint
        lacks, tensors the checkpoint has but the target does not (under ``strict``), and shape or dtype
        mismatches (``cast=True`` converts dtypes instead).

        Args:
            target: the tree to fill.
            keymap: renames and transforms from target names to checkpoint names.
            strict: report checkpoint tensors the target does not use (and scalar leaves without a saved
                value) as errors; with ``strict=False`` they are ignored (scalars keep their values).
            cast: convert stored dtypes to the target's instead of reporting them.
            device: placement for target leaves that carry no sharding.
            progress: progress bar on stderr (None: on for large loads on a terminal).
            max_inflight_bytes: bytes being read at once.

        Example:
            >>> import tempfile, jax, jax.numpy as jnp, jaxweights as jw
            >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
            >>> folder = jw.save(params, f"{tempfile.mkdtemp()}/ckpt")
            >>> abstract = jax.eval_shape(lambda: params)
            >>> jw.load_weights(folder).restore(abstract)["dense"]["kernel"].shape
            (3, 2)
        """
        result, arrays = restore_tree(
            self._store.checkpoint,
            self._prefix,
            target,
            keymap=keymap,
            strict=strict,
            cast=cast,
            device=device,
            progress=progress,
            max_inflight_bytes=max_inflight_bytes,
        )
        with self._store.lock:
            self._store.allocated.update(arrays)
        return result

    @property
    def allocated_weights(self) -> dict[str, jax.Array]:
        """Every weight allocated through this tree so far, by full name (shared by all accessors)."""
        return self._store.allocated

    # -- extras ----------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        """The underlying catalogue (files, metadata, `TensorInfo`s)."""
        return self._store.checkpoint

    @property
    def metadata(self) -> dict[str, Any]:
        """The checkpoint's metadata (safetensors ``__metadata__``, merged over files and index)."""
        return dict(self._store.checkpoint.metadata)

    def summary(self, *, collapse: bool = True, max_lines: int | None = None) -> str:
        """A text tree of the tensors under this name with dtypes, shapes and sizes.

        With ``collapse``, numbered siblings with identical contents (repeated layers) print once.
        """
        return _display.tree_text(
            self._store.checkpoint, self._prefix, collapse=collapse, max_lines=max_lines
        )

    def _count(self) -> int:
        low, high = self._store.under(self._prefix)
        return high - low

    def __repr__(self) -> str:
        count = self._count() + (1 if self.exists() else 0)
        return f"<Weights {self._prefix or '(root)'!r}: {count} tensor{'s' if count != 1 else ''}>"

    def _repr_html_(self) -> str:
        return _display.tree_html(self._store.checkpoint, self._prefix)

    def _not_found(self) -> WeightNotFoundError:
        name = self._prefix
        store = self._store
        files = ", ".join(str(f) for f in store.checkpoint.files[:3])
        if store.under(name)[0] != store.under(name)[1]:
            children = ", ".join(store.children(name)[:8])
            return WeightNotFoundError(
                f"{name!r} is a prefix, not a tensor (in {files}); it holds: {children}. Index further, "
                f"or use .items() to list its tensors.",
                file=store.checkpoint.files[0] if store.checkpoint.files else None,
                tensor=name,
            )
        hints = _close_matches(name, store)
        hint = f" Did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        return WeightNotFoundError(
            f"No tensor named {name!r} in {files} ({len(store.names)} tensors).{hint}",
            file=store.checkpoint.files[0] if store.checkpoint.files else None,
            tensor=name,
        )


def _close_matches(name: str, store: _Store) -> list[str]:
    """Close names, looking first under the deepest prefix of ``name`` that exists."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        low, high = store.under(prefix)
        if high > low and high - low <= 5000:
            return difflib.get_close_matches(name, store.names[low:high], n=3, cutoff=0.6)
    return []


def _as_shape(shape: Iterable[Any], info: TensorInfo) -> tuple[int, ...]:
    dims = []
    for dim in shape:
        if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
            dims.append(int(dim))
        else:
            raise ShapeMismatchError(
                f"Tensor {info.name!r} in {info.file}: shape entries must be integers, found {dim!r}. "
                f"Symbolic dimensions do not apply to stored weights; pass shape={info.shape}.",
                file=info.file,
                tensor=info.name,
            )
    return tuple(dims)


def _device_ref(array: jax.Array) -> DeviceRef | None:
    devices = array.sharding.device_set
    if len(devices) != 1:
        return None
    return DeviceRef.from_jax(next(iter(devices)))


def _reopen(sources: tuple[os.PathLike[str], ...], prefix: str) -> Weights:
    root = load_weights(list(sources))
    return root[prefix] if prefix else root


def load_weights(paths: PathsLike) -> Weights:
    """Opens a checkpoint and returns the root accessor.

    Args:
        paths: a file, a folder (its ``model.safetensors.index.json`` if present, else every
            ``*.safetensors``), an index file, or a list of these. The format is sniffed from magic bytes.

    Raises:
        CheckpointNotFoundError: a path does not exist, or the list is empty.
        CheckpointError: a header is malformed (validated before any data is read).
        DuplicateTensorError: two files hold one name and no index says which to use.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> folder = tempfile.mkdtemp()
        >>> _ = jw.save_file({"a.w": np.ones(2, np.float32)}, f"{folder}/model-1.safetensors")
        >>> _ = jw.save_file({"b.w": np.ones(3, np.float32)}, f"{folder}/model-2.safetensors")
        >>> sorted(name for name, _ in jw.load_weights(folder).items())
        ['a.w', 'b.w']
    """
    return Weights(_Store(open_checkpoint(paths)))


def restore(paths: PathsLike, target: Any, **options: Any) -> Any:
    """`load_weights(paths).restore(target, **options)`: a checkpoint into a target pytree in one call.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> folder = jw.save({"w": jnp.arange(3.0)}, f"{tempfile.mkdtemp()}/ckpt")
        >>> jw.restore(folder, {"w": jnp.zeros(3)})["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    return load_weights(paths).restore(target, **options)
