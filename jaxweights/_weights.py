"""The hierarchical accessor (`Weights`), what it returns (`WeightData`, `Weight`), and `load_weights`.

``weights.a.layers[0].b`` and ``weights["a.layers"][0]["b"]`` both name ``a.layers.0.b``. An accessor is a
name plus a shared store (the catalogue and the ``allocated_weights`` dict); it never parses bytes and
never reads any until `data` or `allocate` is called.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from . import _display
from ._devices import DeviceRef, Placement, to_sharding
from ._dtypes import DType, DTypeLike
from ._hub import is_repo_id, resolve_repo
from ._loader import DEFAULT_BUDGET
from ._names import NameIndex, join
from ._placement import place, resolve_dtype
from ._quantization import QuantizationEncoding
from ._rules import Rules
from .errors import (
    AccessorError,
    ArgumentError,
    DTypeError,
    GraphError,
    IndexOutOfRangeError,
    NotATensorError,
    QuantizationError,
    ShapeMismatchError,
    WeightNotFoundError,
)
from .formats import Checkpoint, PathsLike, TensorInfo, open_checkpoint

if TYPE_CHECKING:
    from ._compose import Composite
    from ._keymap import KeyMap

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

    __module__ = "jaxweights"

    data: np.ndarray
    name: str
    dtype: DType
    shape: tuple[int, ...]
    quantization_encoding: QuantizationEncoding | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray, name: str) -> WeightData:
        """Wraps a numpy array (not copied).

        Example:
            >>> import numpy as np
            >>> from jaxweights import WeightData
            >>> data = WeightData.from_numpy(np.ones((2, 3), np.float16), "w")
            >>> data.name, data.dtype, data.shape
            ('w', <DType.float16>, (2, 3))
        """
        array = np.asarray(array)
        return cls(array, name, DType.from_numpy(array.dtype), tuple(array.shape))

    def astype(self, dtype: DTypeLike) -> WeightData:
        """This data converted to ``dtype`` (a new host copy), or ``self`` when it already is.

        Raises:
            DTypeError: the data is quantized; dequantize it instead.

        Example:
            >>> import numpy as np
            >>> from jaxweights import WeightData
            >>> WeightData.from_numpy(np.arange(3, dtype=np.int32), "w").astype("float32").data.tolist()
            [0.0, 1.0, 2.0]
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
        """The same bytes reinterpreted as ``dtype`` (the last dimension scales by the size ratio).

        Example:
            >>> import numpy as np
            >>> from jaxweights import WeightData
            >>> viewed = WeightData.from_numpy(np.zeros((2, 4), np.float32), "w").view("uint8")
            >>> viewed.dtype, viewed.shape
            (<DType.uint8>, (2, 16))
        """
        target = DType.from_any(dtype)
        data = self.data.view(target.to_numpy())
        return replace(self, data=data, dtype=target, shape=tuple(data.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by ``data``.

        Example:
            >>> import numpy as np
            >>> from jaxweights import WeightData
            >>> WeightData.from_numpy(np.zeros((2, 4), np.float32), "w").nbytes
            32
        """
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

    __module__ = "jaxweights"

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
            GraphError: the weight was declared on a `Graph` without data (bind the graph first).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weight = jw.load_weights(path).w.allocate()
            >>> type(weight.array).__name__ in ("Array", "ArrayImpl"), weight.array.sum().item()
            (True, 15.0)
        """
        return self._value()

    @property
    def declared(self) -> bool:
        """True for a weight declared on a `Graph` without data (its array is bound later).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weight = jw.load_weights(path).w.allocate()
            >>> graph = jw.Graph("g")
            >>> weight.declared, graph.weights().w.allocate(dtype="float32", shape=(2,)).declared
            (False, True)
        """
        return self.value is None

    @property
    def abstract(self) -> jax.ShapeDtypeStruct:
        """The weight as a `jax.ShapeDtypeStruct` with its sharding (what a graph compiles against).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weight = jw.load_weights(path).w.allocate()
            >>> weight.abstract
            ShapeDtypeStruct(shape=(2, 3), dtype=float32, sharding=...)
        """
        return jax.ShapeDtypeStruct(self.shape, self.dtype.to_numpy(), sharding=self.sharding)

    def _value(self) -> jax.Array:
        if self.value is None:
            raise GraphError(
                f"Weight {self.name!r} is declared ({self.dtype.name}{list(self.shape)}) but has no data yet; "
                f"bind its graph to a checkpoint (graph.bind(...)) and use graph.add_weight(weight).",
                tensor=self.name,
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
        """Number of dimensions.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weight = jw.load_weights(path).w.allocate()
            >>> weight.ndim
            2
        """
        return len(self.shape)

    @property
    def T(self) -> Any:  # noqa: N802 - array API name
        """The transposed array.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weight = jw.load_weights(path).w.allocate()
            >>> weight.T.shape, weight.T[2].tolist()
            ((3, 2), [2.0, 5.0])
        """
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


@dataclass(frozen=True)
class AllocationRequest:
    """What `Weights.allocate` was asked for, after its checks, as handed to an `Allocator`.

    Attributes:
        name: full dotted name.
        info: the stored tensor, or None when the checkpoint has no tensor of this name.
        dtype: the dtype the weight gets: the request resolved against the stored type when the tensor
            exists, else the requested dtype (None if none was given).
        shape: the requested shape (equal to the stored one when the tensor exists), or None.
        quantization_encoding: the requested encoding, or None.
        device: the placement as given (a `DeviceRef`, a `jax.Device` or a `jax.sharding.Sharding`).
        sharding: ``device`` as a `jax.sharding.Sharding`.
    """

    name: str
    info: TensorInfo | None
    dtype: DType | None
    shape: tuple[int, ...] | None
    quantization_encoding: QuantizationEncoding | None
    device: Placement
    sharding: Sharding


Allocator = Callable[[AllocationRequest, Callable[[], Weight]], Weight]
"""A hook a higher layer (a `Graph`) hands to a store: it receives the request and ``load``, the default
read (which raises `WeightNotFoundError` for a name the checkpoint lacks), and returns the `Weight`."""


_ambient: contextvars.ContextVar[Allocator | None] = contextvars.ContextVar(
    "jaxweights_allocator", default=None
)


@contextlib.contextmanager
def allocating_with(allocator: Allocator) -> Iterator[None]:
    """Inside the block, `Weights.allocate` on every accessor whose store has no allocator of its own goes
    through ``allocator``. A graph function's trace uses it, so that an accessor of the user's own
    (not ``graph.weights()``) allocating inside the function still gets the traced argument, as MAX adds
    any weight allocated inside a graph to it."""
    token = _ambient.set(allocator)
    try:
        yield
    finally:
        _ambient.reset(token)


class _Store:
    """What every accessor of one tree shares: the catalogue, its names in natural order, allocated arrays."""

    def __init__(self, checkpoint: Checkpoint, *, allocator: Allocator | None = None) -> None:
        self.checkpoint = checkpoint
        self.allocator = allocator  # handed in by a Graph: decides what allocate() returns
        self.index = NameIndex(checkpoint)
        self.allocated: dict[str, jax.Array] = {}
        self.lock = threading.Lock()

    def record(self, arrays: Mapping[str, jax.Array]) -> None:
        """Adds placed arrays to ``allocated_weights`` (what bulk loads hand back up)."""
        with self.lock:
            self.allocated.update(arrays)


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

    __module__ = "jaxweights"

    __slots__ = ("_prefix", "_store")

    def __init__(self, store: _Store, prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix

    # -- naming ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The full dotted name this accessor stands for (``""`` at the root).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.layers[0].w.name, weights.name
            ('layers.0.w', '')
        """
        return self._prefix

    def __getattr__(self, attr: str) -> Weights:
        if attr in ("shape", "dtype"):  # the property raised NotATensorError, an AttributeError
            self._tensor_meta(attr)
        if attr.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__!r} has no attribute {attr!r} (private and dunder names are "
                f"never weight names; use weights[{attr!r}] for a tensor named like that)."
            )
        return Weights(self._store, join(self._prefix, attr))

    def __getitem__(self, key: int | np.integer[Any] | str) -> Weights:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key)
            if index < 0:
                numeric = [c for c in self._store.index.children(self._prefix) if c.isascii() and c.isdigit()]
                if -index > len(numeric):
                    raise IndexOutOfRangeError(
                        f"Index {index} is out of range for {self._prefix or 'the root'!r}, which has "
                        f"{len(numeric)} numbered children.",
                        tensor=self._prefix,
                    )
                return Weights(self._store, join(self._prefix, numeric[index]))
            return Weights(self._store, join(self._prefix, str(index)))
        if isinstance(key, str):
            if not key or key.startswith(".") or key.endswith("."):
                raise WeightNotFoundError(
                    f"{key!r} is not a weight name segment: names are dot-separated, non-empty.",
                    tensor=self._prefix,
                )
            return Weights(self._store, join(self._prefix, key))
        raise ArgumentError(
            f"Weights are indexed by int or str, not {type(key).__name__} (for {self._prefix or 'the root'!r})."
        )

    def __dir__(self) -> list[str]:
        public = [n for n in dir(type(self)) if not n.startswith("_")]
        segments = [c for c in self._store.index.children(self._prefix) if c.isidentifier()]
        return sorted(set(public) | set(segments))

    def _ipython_key_completions_(self) -> list[str]:
        """What ``weights["<TAB>`` offers: the children, then every dotted name below them, tensors and
        prefixes alike (``"encoder.la<TAB>"`` completes to ``"encoder.layer"``, ``"encoder.layer.0"``, ...)."""
        skip = len(self._prefix) + 1 if self._prefix else 0
        found: dict[str, None] = dict.fromkeys(self._store.index.children(self._prefix))
        for name in self._store.index.under(self._prefix):
            segments = name[skip:].split(".")
            for end in range(2, len(segments) + 1):
                found.setdefault(".".join(segments[:end]), None)
        return list(found)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's terminal display: the collapsed tree (`summary`), not the one-line repr."""
        printer.text(repr(self) if cycle else str(self.summary(max_lines=200)))

    def __iter__(self) -> Iterator[Weights]:
        """The accessors one level down, in natural order (``layers[0]``, ``layers[1]``, ...)."""
        for segment in self._store.index.children(self._prefix):
            yield Weights(self._store, join(self._prefix, segment))

    def __len__(self) -> int:
        return len(self._store.index.children(self._prefix))

    def __bool__(self) -> bool:
        return self.exists() or self._count() > 0

    def __contains__(self, key: object) -> bool:
        if isinstance(key, (int, str)) and not isinstance(key, bool):
            if isinstance(key, int) and not -(10**18) < key < 10**18:
                return False  # no checkpoint numbers a child past 10**18 (and str() of 5000 digits fails)
            child = join(self._prefix, str(key))
            return child in self._store.checkpoint or self._store.index.count_under(child) > 0
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weights) and other._store is self._store and other._prefix == self._prefix

    def __hash__(self) -> int:
        return hash((id(self._store), self._prefix))

    def __copy__(self) -> Weights:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Weights:
        return self

    # -- nothing silent: an accessor names tensors, it holds no data ----------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        raise self._holds_no_data("Converting to an array (np.asarray, jnp.asarray, ...)")

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise self._holds_no_data("A DLPack conversion (torch.as_tensor, np.from_dlpack)")

    def __dlpack_device__(self) -> tuple[int, int]:
        raise self._holds_no_data("A DLPack conversion (torch.as_tensor, np.from_dlpack)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        head, _, last = self._prefix.rpartition(".")
        methods = _public_methods()
        close = difflib.get_close_matches(last, methods, n=1, cutoff=0.6)
        hint = f" Did you mean .{close[0]}()?" if close else ""
        where = f"weights.{head}" if head else "weights"
        raise AccessorError(
            f"{where}.{last}(...) calls an accessor: {last!r} is not a method of Weights, so "
            f"{self._prefix!r} was taken as a tensor name.{hint} Methods: {', '.join(methods)}.",
            tensor=self._prefix,
        )

    def _holds_no_data(self, what: str) -> AccessorError:
        return AccessorError(
            f"{what} was given the accessor {self._prefix or '(root)'!r}, which names tensors but holds "
            f"no data. Read it with .data() (a host view) or .allocate() (a placed jax.Array; use "
            f".allocate().array), or a subtree with .to_pytree().",
            tensor=self._prefix,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored (logical) shape of the tensor with exactly this name, read from the header.

        Raises:
            NotATensorError: no tensor has this name (also an `AttributeError`); a checkpoint segment
                named ``shape`` is reached with ``weights["shape"]``.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.layers[0].w.shape
            (2, 3)
        """
        return self._tensor_meta("shape").shape

    @property
    def dtype(self) -> DType:
        """The stored `DType` of the tensor with exactly this name (uint8 blocks for quantized ones).

        Raises:
            NotATensorError: no tensor has this name (also an `AttributeError`); a checkpoint segment
                named ``dtype`` is reached with ``weights["dtype"]``.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.layers[0].w.dtype
            <DType.float32>
        """
        return self._tensor_meta("dtype").dtype

    def _tensor_meta(self, attribute: str) -> TensorInfo:
        info = self._store.checkpoint.get(self._prefix)
        if info is not None:
            return info
        found = self._not_found()
        child = join(self._prefix, attribute)
        also = (
            f" A tensor is named {child!r}: reach it with weights[{attribute!r}]."
            if child in self._store.checkpoint or self._store.index.count_under(child)
            else ""
        )
        raise NotATensorError(
            f".{attribute} is the metadata of one tensor. {found.message}{also}",
            file=found.file,
            tensor=self._prefix,
        )

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the checkpoint's files (for every accessor of this tree).

        Arrays already allocated stay valid; reading through the tree afterwards raises
        `CheckpointError`.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weight = weights.layers[0].w.allocate()
            >>> weights.close()
            >>> weight.shape  # allocated arrays stay valid
            (2, 3)
        """
        self._store.checkpoint.close()

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        checkpoint = self._store.checkpoint
        return (_reopen, (checkpoint.sources, self._prefix, checkpoint.mapped))

    # -- the protocol --------------------------------------------------------------------------
    def exists(self) -> bool:
        """True only if a tensor has exactly this name.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.layers[0].w.exists(), weights.layers[0].exists()
            (True, False)
        """
        return self._prefix in self._store.checkpoint

    def items(self) -> Iterator[tuple[str, Weights]]:
        """Every tensor at or under this name, sorted, as (name relative to this one, accessor).

        Prefixes match whole segments: ``layers.1`` does not match ``layers.10``. A tensor named exactly
        like this accessor comes first, with the relative name ``""``.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> [(name, accessor.shape) for name, accessor in weights.layers.items()]
            [('0.w', (2, 3))]
        """
        store = self._store
        if self.exists():
            yield "", self
        skip = len(self._prefix) + 1 if self._prefix else 0
        for name in store.index.under(self._prefix):
            yield name[skip:], Weights(store, name)

    def keys(self) -> list[str]:
        """The relative names `items` yields.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.keys(), weights.layers[0].keys()
            (['layers.0.w'], ['w'])
        """
        return [name for name, _ in self.items()]

    @property
    def info(self) -> TensorInfo:
        """Where this tensor's bytes are and what they are, without reading them.

        Raises:
            WeightNotFoundError: no tensor has exactly this name.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> info = weights.layers[0].w.info
            >>> info.name, info.shape, info.nbytes
            ('layers.0.w', (2, 3), 24)
        """
        try:
            return self._store.checkpoint[self._prefix]
        except KeyError:
            raise self._not_found() from None

    def data(self) -> WeightData:
        """The tensor's values and metadata; ``data`` is a read-only view of the file (zero-copy).

        Raises:
            WeightNotFoundError: no tensor has exactly this name (a KeyError, with close matches).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> data = weights.layers[0].w.data()
            >>> data.data[1].tolist(), data.data.flags.writeable
            ([3.0, 4.0, 5.0], False)
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
                ``jax_enable_x64``). A quantized (GGUF) tensor gives its uint8 blocks in their byte shape
                without ``dtype``, as MAX does; with float32, bfloat16 or float16 its blocks are placed
                and dequantized on the device (beyond MAX).
            shape: the shape the caller expects; it must equal the stored (logical) shape.
            quantization_encoding: the encoding the caller expects; it must match the stored one.
            device: a `DeviceRef`, a `jax.Device` or any `jax.sharding.Sharding`. With a sharding, each
                device's block is read on its own, never the whole tensor.

        Raises:
            WeightNotFoundError: no tensor has this name.
            ShapeMismatchError: ``shape`` differs from the stored shape.
            QuantizationError: ``quantization_encoding`` differs from the stored encoding.
            DTypeError, DeviceError, ShardingError: the dtype, device or sharding cannot be used.

        An accessor from `Graph.weights` hands the checked request to its graph, which declares the
        weight, or inside a graph function returns the traced argument for it, instead of reading.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weight = weights.layers[0].w.allocate(dtype="bfloat16", device=jw.DeviceRef.CPU())
            >>> weight.dtype, weight.shape, str(weight.device)
            (<DType.bfloat16>, (2, 3), 'cpu:0')
        """
        store = self._store
        info = self.info if store.allocator is None or self.exists() else None
        requested = DType.from_any(dtype) if dtype is not None else None
        encoding = QuantizationEncoding.from_any(quantization_encoding) if quantization_encoding else None
        wanted: tuple[int, ...] | None = None
        if info is None and shape is not None:  # for the store's allocator, which checks the entries
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
                raise ShapeMismatchError(
                    f"Weight {self._prefix!r}: shape={shape!r} is not a sequence of dimensions; pass a "
                    f"tuple of ints.",
                    tensor=self._prefix,
                )
            wanted = tuple(shape)
        if info is not None:
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
            if encoding is not None and encoding != info.encoding:
                stored = info.encoding.name if info.encoding else "no quantization"
                raise QuantizationError(
                    f"Tensor {info.name!r} in {info.file} has {stored}, but allocate() was asked for "
                    f"{encoding.name}. jaxweights does not re-quantize; omit quantization_encoding.",
                    file=info.file,
                    tensor=info.name,
                )
            if info.encoding is not None and requested not in (None, info.dtype, *_DEQUANTIZED):
                raise DTypeError(
                    f"Tensor {info.name!r} in {info.file} holds {info.encoding.name} blocks: allocate them "
                    f"as blocks (omit dtype) or dequantized, with dtype= one of "
                    f"{', '.join(d.name for d in _DEQUANTIZED)}; found {requested.name}.",
                    file=info.file,
                    tensor=info.name,
                )
            requested = resolve_dtype(info, requested)
        sharding = to_sharding(device)

        def load() -> Weight:
            if info is None or requested is None:
                raise self._not_found()
            array = place(store.checkpoint, info, requested, sharding)
            store.record({info.name: array})
            return Weight(
                name=info.name,
                dtype=requested,
                shape=tuple(array.shape),
                device=device if isinstance(device, DeviceRef) else _device_ref(array),
                sharding=array.sharding,
                quantization_encoding=info.encoding,
                original_dtype=info.dtype,
                value=array,
            )

        allocator = store.allocator or _ambient.get()
        if allocator is None:
            return load()
        request = AllocationRequest(self._prefix, info, requested, wanted, encoding, device, sharding)
        return allocator(request, load)

    def _tensor_infos(self) -> list[TensorInfo]:
        infos = [accessor.info for _, accessor in self.items()]
        if not infos:
            raise self._not_found()
        return infos

    def _relative(self, name: str) -> str:
        if name == self._prefix:
            return ""
        return name[len(self._prefix) + 1 :] if self._prefix else name

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

        The dtype rule (the same for `to_pytree`): ``dtype`` converts the floating-point tensors;
        integer, bool and quantized tensors keep their stored type. Without ``dtype``, 64-bit types
        follow ``jax_enable_x64``: with it off they become 32-bit, and integers that do not fit raise
        `DTypeError` instead of wrapping.

        Args:
            mesh: the mesh that rules' `PartitionSpec`s refer to. Unmatched tensors are replicated over it.
            rules: ``[(regex, PartitionSpec), ...]`` (or a dict) matched with `re.search` against full
                names, or a callable ``(name, TensorInfo) -> Sharding | PartitionSpec | None``.
            device: the placement of every tensor when no mesh is given.
            dtype: converts the floating-point tensors (see the dtype rule above).
            strict: raise for tensors no rule matches instead of replicating them.
            first_match: when several patterns match a name, the first in table order wins (otherwise
                patterns that disagree are an error).
            progress: show a progress bar on stderr; None shows one for large loads on a terminal.
            max_inflight_bytes: bytes being read at once (bounds host staging memory).

        Returns:
            ``{name relative to this accessor: jax.Array}`` in `items` order (natural: ``2`` before
            ``10``); every array is also recorded in `allocated_weights` under its full name.

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
        from ._bulk import load

        arrays = load(
            self._store.checkpoint,
            self._tensor_infos(),
            mesh=mesh,
            rules=rules,
            device=device,
            dtype=dtype,
            strict=strict,
            first_match=first_match,
            record=self._store.record,
            progress=progress,
            max_inflight_bytes=max_inflight_bytes,
        )
        return {self._relative(name): array for name, array in arrays.items()}

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
        stack: bool | str | Sequence[str] = False,
    ) -> Any:
        """The tensors at or under this name as a nested pytree of placed arrays.

        Names relative to this accessor become nested dicts; numbered children that run 0..n-1 become
        lists (``lists=False`` keeps them as dicts with string keys). Placement, sharding rules and
        ``dtype`` work as in `allocate_all` (the same dtype rule). With ``shapes_only`` the leaves are
        `jax.ShapeDtypeStruct`s carrying their shardings, and nothing is read.

        ``stack`` makes scan-ready trees (for `jax.lax.scan`, ``nnx.scan``, ``eqx.filter_vmap``): the
        numbered children ``0 .. L-1`` of a subtree, all of one layout, become one subtree whose leaves
        have a leading layer axis (shape ``(L, ...)``). ``stack=True`` stacks this accessor's own
        children (``weights.model.layers.to_pytree(stack=True)``); a prefix or list of prefixes relative
        to it stacks those subtrees (``weights.to_pytree(stack="model.layers")``). Rules match the stacked
        name, which drops the layer number (``model.layers.mlp.up_proj.weight``), and their partition
        specs describe the stacked shape: ``P(None, "model")`` shards every layer's rows,
        ``P("stage")`` the layer axis. Each device reads only its rows of each layer's tensor, straight
        into its block of the stacked array: no stacked copy on the host, no per-layer arrays.

        Raises:
            StructureMismatchError: a name is both a tensor and a prefix of others (``a``, ``a.b``); a
                stacked subtree has a gap in its numbering, a child that is not a number, or layers that
                differ in their names, shapes or dtypes (the first difference is named).

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
            >>> jw.load_weights(path).enc.layer.to_pytree(stack=True)["w"].tolist()
            [[1.0, 1.0], [0.0, 0.0]]
        """
        from ._pytree import nest

        infos = self._tensor_infos()
        composites = self._stacked(infos, stack)
        if composites:
            sources = {source.name for composite in composites.values() for source in composite.sources}
            infos = [info for info in infos if info.name not in sources]
            infos += [composite.info for composite in composites.values()]
        if shapes_only:
            from ._bulk import plan_jobs

            jobs = plan_jobs(
                infos,
                mesh=mesh,
                rules=rules,
                device=device,
                dtype=dtype,
                strict=strict,
                first_match=first_match,
            )
            leaves = [
                (
                    self._relative(job.info.name),
                    jax.ShapeDtypeStruct(job.info.shape, job.dtype.to_numpy(), sharding=job.sharding),
                )
                for job in jobs
            ]
            return nest(leaves, lists=lists)
        if not composites:
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
        from ._bulk import load

        placed = load(
            self._store.checkpoint,
            infos,
            mesh=mesh,
            rules=rules,
            device=device,
            dtype=dtype,
            strict=strict,
            first_match=first_match,
            record=self._store.record,
            progress=progress,
            composites=composites,
        )
        return nest(((self._relative(name), array) for name, array in placed.items()), lists=lists)

    def _stacked(self, infos: list[TensorInfo], stack: bool | str | Sequence[str]) -> dict[str, Composite]:
        """The stacked leaves ``to_pytree(stack=...)`` asks for, by stacked full name."""
        from ._compose import stack_layers

        if stack is False:
            return {}
        if stack is True:
            prefixes = [self._prefix]
        elif isinstance(stack, str) and stack:
            prefixes = [join(self._prefix, stack)]
        elif (
            not isinstance(stack, str)
            and isinstance(stack, Sequence)
            and all(e and isinstance(e, str) for e in stack)
        ):
            prefixes = [join(self._prefix, entry) for entry in stack]
        else:
            raise ArgumentError(
                f"stack= takes True (stack this accessor's numbered children), a prefix such as "
                f"'model.layers', or a list of prefixes; found {stack!r}."
            )
        by_name = {info.name: info for info in infos}
        composites: dict[str, Composite] = {}
        for prefix in prefixes:
            composites.update(stack_layers(by_name, prefix))
        return composites

    def restore(
        self,
        target: Any,
        *,
        keymap: KeyMap | None = None,
        strict: bool = True,
        cast: bool = False,
        ignore_mismatched_sizes: bool = False,
        report: bool = False,
        stack: str | Sequence[str] = (),
        device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
        progress: bool | None = None,
        max_inflight_bytes: int = DEFAULT_BUDGET,
    ) -> Any:
        """Fills a target pytree from the tensors at or under this name; returns a new tree, or
        ``(tree, RestoreReport)`` with ``report=True``.

        The target gives the structure, shapes, dtypes and shardings: a pytree of `jax.Array`s, numpy
        arrays or `jax.ShapeDtypeStruct`s (abstract, e.g. from `jax.eval_shape`, with or without
        shardings), a Flax NNX `State` or module (a new module is returned), an Equinox module, an optax
        state, or any mix. Leaf key paths joined by dots name the tensors, relative to this accessor;
        ``keymap`` renames them and transforms tensors (`TORCH_TO_FLAX` for PyTorch layouts). Python
        scalars (a step counter) come from the metadata `jaxweights.save` wrote; functions and other
        static leaves are kept. Nothing in ``target`` is modified.

        Every difference is checked before any tensor is read and reported in one
        `StructureMismatchError`, sorted, with close matches: names the target needs but the checkpoint
        lacks, tensors the checkpoint has but the target does not (under ``strict``; with ``strict=False``
        concrete leaves the checkpoint lacks keep their values), and shape or dtype
        mismatches (``cast=True`` converts dtypes instead). Tensors are then read by the same bulk
        planner as `allocate_all`, each as its target leaf's dtype and sharding.

        Args:
            target: the tree to fill.
            keymap: renames and transforms from target names to checkpoint names.
            strict: report names the target needs but the checkpoint lacks, and checkpoint tensors the
                target does not use, as errors; with ``strict=False`` a concrete leaf (array, scalar) the
                checkpoint lacks keeps its value and unused tensors are ignored, while an abstract leaf
                (`jax.ShapeDtypeStruct`) with no tensor is still an error. Loading a pretrained encoder
                under a fresh head is one call.
            cast: convert stored dtypes to the target's instead of reporting them.
            ignore_mismatched_sizes: keep a concrete leaf's value where the checkpoint's tensor has
                another shape (otherwise an error, also under ``strict=False``).
            report: also return a `RestoreReport`: names missing (kept from the target), unused,
                converted and mismatched. The report is logged to the ``jaxweights`` logger either way
                (kept leaves at WARNING, unused and converted tensors at INFO).
            stack: target name prefixes (``"model.layers"``) whose leaves carry a leading layer axis, as
                in models whose layers run under `jax.lax.scan`, ``nnx.scan`` or ``eqx.filter_vmap``: the
                leaf ``model.layers.mlp.kernel`` of shape ``(L, ...)`` is filled from ``model.layers.0.mlp.
                kernel`` ... ``model.layers.{L-1}.mlp.kernel`` (names after ``keymap`` renames, its
                transforms applied to every layer), each device reading only its rows of each layer. A
                missing layer, a gap, more layers in the checkpoint than the leading axis holds, and layers
                of different shapes are reported with the rest.
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
        from ._restore import restore

        return restore(
            self._store.checkpoint,
            self._prefix,
            target,
            keymap=keymap,
            strict=strict,
            cast=cast,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            report=report,
            stack=stack,
            device=device,
            record=self._store.record,
            progress=progress,
            max_inflight_bytes=max_inflight_bytes,
        )

    @property
    def allocated_weights(self) -> dict[str, jax.Array]:
        """Every weight allocated through this tree so far, by full name (shared by all accessors).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> _ = weights.layers[0].w.allocate()
            >>> list(weights.allocated_weights)
            ['layers.0.w']
        """
        return self._store.allocated

    # -- extras ----------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        """The underlying catalogue (files, metadata, `TensorInfo`s).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> weights = jw.load_weights(path)
            >>> weights.checkpoint.format, list(weights.checkpoint)
            (<WeightsFormat.safetensors: 'safetensors'>, ['layers.0.w'])
        """
        return self._store.checkpoint

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The checkpoint's metadata, read-only: safetensors ``__metadata__`` (merged over files and
        index), or GGUF key-values, whose arrays (a vocabulary) are decoded only when read.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> folder = tempfile.mkdtemp()
            >>> path = jw.save_file({"w": np.ones(2)}, f"{folder}/m.safetensors", metadata={"format": "pt"})
            >>> dict(jw.load_weights(path).metadata)
            {'format': 'pt'}
        """
        metadata = self._store.checkpoint.metadata
        return MappingProxyType(metadata) if isinstance(metadata, dict) else metadata

    def summary(self, *, collapse: bool = True, max_lines: int | None = None) -> _display.Summary:
        """The tensors under this name: counts, bytes and a tree of dtypes, shapes and sizes.

        Returns a `Summary`: ``print`` it for the text tree, read ``tensors``, ``parameters``, ``nbytes``,
        ``by_dtype`` and ``by_prefix`` from a program, or show it in a notebook as a foldable tree. With
        ``collapse``, numbered siblings with identical contents (repeated layers) show once;
        ``max_lines`` cuts the text tree. Reads only the catalogue, never tensor data.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file(
            ...     {f"layers.{i}.w": np.ones(3, np.float32) for i in range(4)},
            ...     f"{tempfile.mkdtemp()}/model.safetensors",
            ... )
            >>> summary = jw.load_weights(path).summary()
            >>> summary.tensors, summary.parameters, summary.nbytes
            (4, 12, 48)
            >>> print(summary)
            model.safetensors: 4 tensors, 12 parameters, 48 B (float32 x4)
            └── layers  [4 tensors, 48 B]
                └── 0.w                                              float32[3]  12 B  (x4: 0..3 share this layout)
        """
        return _display.summarize(
            self._store.checkpoint, self._prefix, collapse=collapse, max_lines=max_lines
        )

    def _count(self) -> int:
        return self._store.index.count_under(self._prefix)

    def __repr__(self) -> str:
        count = self._count() + (1 if self.exists() else 0)
        return f"<Weights {self._prefix or '(root)'!r}: {count} tensor{'s' if count != 1 else ''}>"

    def _repr_html_(self) -> str:
        """Notebook display: the foldable tree of `summary` (repeated layers folded, names escaped)."""
        return _display.tree_html(self._store.checkpoint, self._prefix)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        """treescope's display hook: the same foldable tree (`NotImplemented` without treescope)."""
        return _display.tree_treescope(self._store.checkpoint, self._prefix, repr(self), path)

    def _not_found(self) -> WeightNotFoundError:
        name = self._prefix
        store = self._store
        files = ", ".join(str(f) for f in store.checkpoint.files[:3])
        if store.index.count_under(name):
            children = ", ".join(store.index.children(name)[:8])
            return WeightNotFoundError(
                f"{name!r} is a prefix, not a tensor (in {files}); it holds: {children}. Index further, "
                f"or use .items() to list its tensors.",
                file=store.checkpoint.files[0] if store.checkpoint.files else None,
                tensor=name,
            )
        hints = _close_matches(name, store)
        hint = f" Did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        return WeightNotFoundError(
            f"No tensor named {name!r} in {files} ({len(store.index)} tensors).{hint}",
            file=store.checkpoint.files[0] if store.checkpoint.files else None,
            tensor=name,
        )


_DEQUANTIZED = (DType.float32, DType.bfloat16, DType.float16)


@cache
def _public_methods() -> list[str]:
    return sorted(
        name
        for name, value in vars(Weights).items()
        if not name.startswith("_") and callable(value) and not isinstance(value, property)
    )


def _close_matches(name: str, store: _Store) -> list[str]:
    """Close names, looking first under the deepest prefix of ``name`` that exists."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        names = store.index.under(prefix)
        if names and len(names) <= 5000:
            return difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return []


def _as_shape(shape: Any, info: TensorInfo) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or a `ShapeMismatchError` naming the tensor."""
    fix = f"pass shape={info.shape} (a tuple of ints) or omit it"
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise ShapeMismatchError(
            f"Tensor {info.name!r} in {info.file}: shape={shape!r} is not a sequence of dimensions; {fix}.",
            file=info.file,
            tensor=info.name,
        )
    dims = []
    for dim in shape:
        if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
            dims.append(int(dim))
        else:
            raise ShapeMismatchError(
                f"Tensor {info.name!r} in {info.file}: shape entries must be integers, found {dim!r}. "
                f"Symbolic dimensions do not apply to stored weights; {fix}.",
                file=info.file,
                tensor=info.name,
            )
    return tuple(dims)


def _device_ref(array: jax.Array) -> DeviceRef | None:
    devices = array.sharding.device_set
    if len(devices) != 1:
        return None
    return DeviceRef.from_jax(next(iter(devices)))


def _reopen(sources: tuple[os.PathLike[str], ...], prefix: str, mapped: bool = True) -> Weights:
    root = load_weights(list(sources), mmap=mapped)
    return root[prefix] if prefix else root


def load_weights(paths: PathsLike, *, revision: str | None = None, mmap: bool = True) -> Weights:
    """Opens a checkpoint and returns the root accessor.

    Args:
        paths: a file, a folder (its ``model.safetensors.index.json`` if present, else its
            ``model.safetensors``, else every ``*.safetensors``), an index file, or a list of these; or a
            Hugging Face repository id (``"sentence-transformers/all-MiniLM-L6-v2"``), read from the local
            cache when ``HF_HUB_OFFLINE=1`` and otherwise downloaded (weight files only; safetensors
            preferred, then PyTorch, then GGUF) with the optional `huggingface_hub`. A path that exists
            always wins over an id. The format is sniffed from magic bytes.
        revision: the branch, tag or commit of a repository id (default: ``main``).
        mmap: True (the default) maps the files: `Weights.data` is a zero-copy view and CPU arrays of
            64-byte aligned tensors alias the file's pages. Files replaced by `save` or by a rename never
            affect them, but a program writing *into* the file (``cp other.safetensors model.safetensors``,
            a truncation) changes them or kills the process on access (SIGBUS), as with any mapped file.
            False never maps a page: every read is a copy into memory jaxweights owns, for network
            filesystems and for files that may be rewritten in place.

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
    if is_repo_id(paths):
        assert isinstance(paths, str)
        paths = resolve_repo(paths, revision)
    elif revision is not None:
        raise ArgumentError(
            f"revision={revision!r} applies to Hugging Face repository ids; {paths!r} is a local path "
            f"(or names none that exists). Drop revision, or pass the repository id."
        )
    return Weights(_Store(open_checkpoint(paths, mmap=mmap)))


def restore(
    paths: PathsLike, target: Any, *, revision: str | None = None, mmap: bool = True, **options: Any
) -> Any:
    """`load_weights(paths).restore(target, **options)`: a checkpoint into a target pytree in one call.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> folder = jw.save({"w": jnp.arange(3.0)}, f"{tempfile.mkdtemp()}/ckpt")
        >>> jw.restore(folder, {"w": jnp.zeros(3)})["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    return load_weights(paths, revision=revision, mmap=mmap).restore(target, **options)
