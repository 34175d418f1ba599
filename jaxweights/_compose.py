"""Composite tensors: stacked layers, concatenations and windows of checkpoint tensors, placed in one pass.

A `Composite` is a virtual tensor made of `Piece`s of real tensors: each piece says where a source
tensor's elements land (a box of the composite) and which source element sits at the box's corner.
`stack`, `concat` and `window` only rewrite those boxes (pure, no I/O), so they nest freely: a stack of
fused ``qkv`` concats is still one flat list of pieces. `place_composite` then fills, for each distinct
device block this process holds, only the bytes of each piece that the block contains, straight into
the block's host buffer: contiguous runs with `preadv`, strided parts with `Checkpoint.copy_block`
(converting dtype on the way for CPU targets). It must never build the whole composite, or a whole
source tensor, on the host, except for the one source at a time that cannot be read by ranges (packed,
strided views, swapped byte order).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from ._buffers import ALIGNMENT, aligned_empty
from ._devices import is_cpu_only
from ._dtypes import DType
from ._names import is_under, join, natural_key
from ._placement import (
    _DEQUANTIZED,
    _band_tasks_for,
    _converter,
    _dequantizer,
    _narrowed,
    _narrows_integers,
    _run_parallel,
    _run_tasks_for,
    blocks_of,
    check_sharding,
)
from ._plan import BlockKey, block_key
from ._shapes import c_strides, element_count
from .errors import ArgumentError, DTypeError, ShapeMismatchError, StructureMismatchError
from .formats import NATIVE_ORDER, Checkpoint, TensorInfo

__all__ = [
    "Composite",
    "Piece",
    "as_composite",
    "concat",
    "layer_groups",
    "place_composite",
    "split_bounds",
    "stack",
    "stack_layers",
    "window",
]


class Piece(NamedTuple):
    """Where part of one source tensor lands in a composite.

    Attributes:
        source: the checkpoint tensor read.
        region: ``(start, stop)`` per composite dimension: the box this piece fills.
        origin: the source index (one per source dimension) of the box's first element.
        dims: per composite dimension, the source dimension it walks, or None (an inserted axis of
            extent 1).
    """

    source: TensorInfo
    region: BlockKey
    origin: tuple[int, ...]
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class Composite:
    """A virtual tensor assembled from pieces of checkpoint tensors.

    Attributes:
        info: a synthetic `TensorInfo` (name, common dtype and encoding, composite shape) that sharding
            checks and planners read like any tensor's.
        pieces: the pieces, which tile the composite exactly.
    """

    info: TensorInfo
    pieces: tuple[Piece, ...]

    @property
    def sources(self) -> tuple[TensorInfo, ...]:
        """The distinct source tensors, in order of first use."""
        return tuple(dict.fromkeys(piece.source for piece in self.pieces))


def _composite(name: str, template: TensorInfo, shape: tuple[int, ...], pieces: list[Piece]) -> Composite:
    encoding, dtype = template.encoding, template.dtype
    if encoding is not None:
        nbytes = encoding.bytes_for_shape(shape)
    else:
        nbytes = -(-element_count(shape) * dtype.size_in_bits // 8)
    info = TensorInfo(name, dtype, shape, template.file, 0, nbytes, encoding, NATIVE_ORDER)
    return Composite(info, tuple(pieces))


def as_composite(item: TensorInfo | Composite) -> Composite:
    """A plain tensor as a one-piece composite (a composite is returned as it is).

    Example:
        >>> from pathlib import Path
        >>> w = TensorInfo("w", DType.float32, (2, 3), Path("m.safetensors"), 0, 24)
        >>> as_composite(w).pieces[0].region, as_composite(w).info.shape
        (((0, 2), (0, 3)), (2, 3))
    """
    if isinstance(item, Composite):
        return item
    region = tuple((0, size) for size in item.shape)
    piece = Piece(item, region, (0,) * len(item.shape), tuple(range(len(item.shape))))
    return _composite(item.name, item, item.shape, [piece])


def _check_alike(name: str, items: Sequence[Composite], what: str, skip: int | None = None) -> None:
    """Raises unless every item has item 0's dtype, encoding and shape (except along axis ``skip``)."""
    first = items[0].info
    for item in items[1:]:
        info = item.info
        if info.dtype is not first.dtype or info.encoding != first.encoding:
            kinds = [
                f"{i.dtype.name}{'' if i.encoding is None else f' ({i.encoding.name})'}"
                for i in (first, info)
            ]
            raise DTypeError(
                f"cannot {what} {name!r}: {info.name!r} is {kinds[1]} but {first.name!r} is {kinds[0]}. "
                f"Every part must share one stored dtype; convert after placing instead.",
                tensor=name,
            )
        same = len(info.shape) == len(first.shape) and all(
            a == b for axis, (a, b) in enumerate(zip(info.shape, first.shape, strict=True)) if axis != skip
        )
        if not same:
            rule = "the same shape" if skip is None else f"equal dimensions except axis {skip}"
            raise ShapeMismatchError(
                f"cannot {what} {name!r}: {info.name!r} has shape {info.shape} but {first.name!r} has "
                f"shape {first.shape}; the parts need {rule}.",
                tensor=name,
            )


def stack(name: str, items: Sequence[TensorInfo | Composite]) -> Composite:
    """Stacks equal tensors (or composites) along a new leading axis, as `numpy.stack` does.

    Example:
        >>> from pathlib import Path
        >>> layers = [TensorInfo(f"l.{i}.w", DType.float32, (4,), Path("m"), 16 * i, 16 * i + 16) for i in range(3)]
        >>> stacked = stack("l.w", layers)
        >>> stacked.info.shape, [piece.region for piece in stacked.pieces][2]
        ((3, 4), ((2, 3), (0, 4)))

    Raises:
        ArgumentError: ``items`` is empty.
        ShapeMismatchError, DTypeError: an item differs from item 0 (both are named).
    """
    if not items:
        raise ArgumentError(f"cannot stack {name!r}: no tensors given; pass at least one.", tensor=name)
    parts = [as_composite(item) for item in items]
    _check_alike(name, parts, "stack")
    pieces = [
        Piece(p.source, ((layer, layer + 1), *p.region), p.origin, (None, *p.dims))
        for layer, part in enumerate(parts)
        for p in part.pieces
    ]
    return _composite(name, parts[0].info, (len(parts), *parts[0].info.shape), pieces)


def _axis(axis: int, ndim: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeMismatchError(
            f"axis {axis} is out of range for {name!r}, which has {ndim} dimension(s).", tensor=name
        )
    return axis % ndim


def concat(name: str, items: Sequence[TensorInfo | Composite], axis: int) -> Composite:
    """Concatenates tensors (or composites) along ``axis``, as `numpy.concatenate` does (fused qkv).

    Quantized tensors concatenate along their last axis too: whole rows of blocks stay whole.

    Example:
        >>> from pathlib import Path
        >>> q, k = (TensorInfo(n, DType.float32, (4, 2), Path("m"), 0, 32) for n in ("q", "k"))
        >>> concat("qk", [q, k], axis=-1).info.shape, concat("qk", [q, k], axis=0).info.shape
        ((4, 4), (8, 2))

    Raises:
        ArgumentError: ``items`` is empty.
        ShapeMismatchError: the other dimensions differ, or ``axis`` is out of range.
        DTypeError: the dtypes or encodings differ.
    """
    if not items:
        raise ArgumentError(f"cannot concatenate {name!r}: no tensors given.", tensor=name)
    parts = [as_composite(item) for item in items]
    axis = _axis(axis, len(parts[0].info.shape), name)
    _check_alike(name, parts, "concatenate", skip=axis)
    pieces: list[Piece] = []
    offset = 0
    for part in parts:
        for p in part.pieces:
            region = list(p.region)
            region[axis] = (region[axis][0] + offset, region[axis][1] + offset)
            pieces.append(p._replace(region=tuple(region)))
        offset += part.info.shape[axis]
    shape = list(parts[0].info.shape)
    shape[axis] = offset
    return _composite(name, parts[0].info, tuple(shape), pieces)


def window(name: str, item: TensorInfo | Composite, axis: int, start: int, stop: int) -> Composite:
    """``item[..., start:stop, ...]`` along ``axis``: one part of a split (GPT-2's ``c_attn`` into q, k, v).

    Example:
        >>> from pathlib import Path
        >>> c_attn = TensorInfo("c_attn", DType.float32, (4, 6), Path("m"), 0, 96)
        >>> k = window("k", c_attn, -1, 2, 4)
        >>> k.info.shape, k.pieces[0].origin
        ((4, 2), (0, 2))

    Raises:
        ShapeMismatchError: the bounds fall outside the axis, ``axis`` is out of range, or a quantized
            tensor's window cuts through a block.
    """
    part = as_composite(item)
    shape = part.info.shape
    axis = _axis(axis, len(shape), name)
    if not 0 <= start <= stop <= shape[axis]:
        raise ShapeMismatchError(
            f"window {name!r} of {part.info.name!r} (shape {shape}): bounds [{start}, {stop}) on axis {axis} "
            f"must satisfy 0 <= start <= stop <= {shape[axis]}.",
            tensor=name,
        )
    encoding = part.info.encoding
    if (
        encoding is not None
        and axis == len(shape) - 1
        and (start % encoding.elements_per_block or stop % encoding.elements_per_block)
    ):
        raise ShapeMismatchError(
            f"window {name!r} of {part.info.name!r}: {encoding.name} packs {encoding.elements_per_block} "
            f"values per block, so bounds [{start}, {stop}) on the last axis must be multiples of it.",
            tensor=name,
        )
    pieces: list[Piece] = []
    for p in part.pieces:
        (first, last), dim = p.region[axis], p.dims[axis]
        low, high = max(first, start), min(last, stop)
        if low >= high:
            continue
        region = list(p.region)
        region[axis] = (low - start, high - start)
        origin = list(p.origin)
        if dim is not None:
            origin[dim] += low - first
        pieces.append(Piece(p.source, tuple(region), tuple(origin), p.dims))
    return _composite(name, part.info, (*shape[:axis], stop - start, *shape[axis + 1 :]), pieces)


def split_bounds(length: int, sections: int | Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each part: ``sections`` equal parts, or parts of the given sizes.

    Example:
        >>> split_bounds(6, 3), split_bounds(6, [4, 1, 1])
        ([(0, 2), (2, 4), (4, 6)], [(0, 4), (4, 5), (5, 6)])

    Raises:
        ShapeMismatchError: equal sections do not divide ``length``, or the sizes do not sum to it.
    """
    if isinstance(sections, int):
        if sections <= 0 or length % sections:
            raise ShapeMismatchError(
                f"cannot split a dimension of {length} into {sections} equal parts; pass a count that "
                f"divides {length}, or the sizes of the parts."
            )
        sizes = [length // sections] * sections
    else:
        sizes = [int(size) for size in sections]
        if any(size < 0 for size in sizes) or sum(sizes) != length:
            raise ShapeMismatchError(
                f"split sizes {sizes} must be non-negative and sum to the dimension's {length} "
                f"(they sum to {sum(sizes)})."
            )
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


# -- layer groups --------------------------------------------------------------------------------


def layer_groups(
    names_and_infos: Mapping[str, TensorInfo], prefix: str
) -> tuple[int, dict[str, list[TensorInfo]]]:
    """Groups the tensors ``prefix.{i}.rest`` by ``rest``: ``(L, {rest: [layer 0's info, ..., layer L-1's]})``.

    Example:
        >>> from pathlib import Path
        >>> infos = {f"h.{i}.{n}": TensorInfo(f"h.{i}.{n}", DType.float32, (2,), Path("m"), 0, 8)
        ...          for i in range(2) for n in ("w", "b")}
        >>> count, groups = layer_groups(infos, "h")
        >>> count, {rest: [info.name for info in group] for rest, group in groups.items()}
        (2, {'b': ['h.0.b', 'h.1.b'], 'w': ['h.0.w', 'h.1.w']})

    Raises:
        StructureMismatchError: nothing lies under ``prefix``, a child is not a decimal index, a layer
            is missing, or a layer lacks or adds a name that layer 0 has or lacks.
    """
    layers: dict[int, dict[str, TensorInfo]] = {}
    skip = len(prefix) + 1 if prefix else 0  # the root's children are the names' first segments
    for name, info in names_and_infos.items():
        if not is_under(name, prefix):
            continue
        index, _, rest = name[skip:].partition(".")
        if not (index.isascii() and index.isdigit()) or str(int(index)) != index:
            raise StructureMismatchError(
                f"cannot stack {prefix!r}: tensor {name!r} sits under child {index!r}, which is not a layer "
                f"index (0, 1, 2, ... without leading zeros). Stack a prefix whose children are all layers.",
                tensor=name,
            )
        layers.setdefault(int(index), {})[rest] = info
    if not layers:
        parents = {name.rsplit(".", k)[0] for name in names_and_infos for k in range(1, name.count(".") + 1)}
        starting = sorted((p for p in parents if p.startswith(prefix)), key=len)
        closest = list(dict.fromkeys([*starting, *difflib.get_close_matches(prefix, sorted(parents))]))[:3]
        hint = f"; closest: {', '.join(map(repr, closest))}" if closest else ""
        raise StructureMismatchError(f"stack prefix {prefix!r} matches no tensor{hint}.", tensor=prefix)
    count = len(layers)
    missing = next((i for i in range(count) if i not in layers), None)
    if missing is not None:
        numbers = sorted(layers)
        found = ", ".join(str(i) for i in numbers[:12]) + (
            f", ... ({len(numbers)} in all)" if len(numbers) > 12 else ""
        )
        raise StructureMismatchError(
            f"{prefix} has layers {found}: layer {missing} is missing. Stacked layers are numbered 0..L-1 "
            f"without gaps.",
            tensor=f"{prefix}.{missing}",
        )
    rests = sorted(layers[0], key=natural_key)
    for i in range(1, count):
        if layers[i].keys() == layers[0].keys():
            continue
        lacks = [rest for rest in rests if rest not in layers[i]]
        adds = sorted((rest for rest in layers[i] if rest not in layers[0]), key=natural_key)
        name = _full(prefix, i, lacks[0] if lacks else adds[0])
        what = f"lacks {name!r}, which layer 0 has" if lacks else f"has {name!r}, which layer 0 lacks"
        raise StructureMismatchError(
            f"cannot stack {prefix!r}: layer {i} {what}. Every layer must hold the same names.", tensor=name
        )
    return count, {rest: [layers[i][rest] for i in range(count)] for rest in rests}


def _full(prefix: str, layer: int, rest: str | None) -> str:
    return join(join(prefix, str(layer)), rest) if rest else join(prefix, str(layer))


def stack_layers(checkpoint_infos: Mapping[str, TensorInfo], prefix: str) -> dict[str, Composite]:
    """One stacked composite per name under ``prefix.{i}``, named ``prefix.rest``, layer axis first.

    Example:
        >>> from pathlib import Path
        >>> infos = {f"h.{i}.w": TensorInfo(f"h.{i}.w", DType.float32, (2, 3), Path("m"), 24 * i, 24 * i + 24)
        ...          for i in range(4)}
        >>> {name: c.info.shape for name, c in stack_layers(infos, "h").items()}
        {'h.w': (4, 2, 3)}

    Raises:
        StructureMismatchError: as `layer_groups`.
        ShapeMismatchError, DTypeError: a layer's tensor differs from layer 0's.
    """
    _, groups = layer_groups(checkpoint_infos, prefix)
    names = {rest: join(prefix, rest) if rest else prefix for rest in groups}
    return {names[rest]: stack(names[rest], infos) for rest, infos in groups.items()}


# -- placement -----------------------------------------------------------------------------------


def place_composite(
    checkpoint: Checkpoint,
    composite: Composite,
    dtype: DType,
    sharding: Sharding,
    *,
    checked: bool = False,
    max_host_bytes: int = 1 << 30,
) -> jax.Array:
    """Reads a composite into a `jax.Array` laid out by ``sharding``, converted to ``dtype``.

    Each distinct device block this process holds is filled from the pieces it intersects, reading only
    those bytes (counted in `Checkpoint.bytes_copied`). ``checked`` skips `check_sharding`. Quantized
    composites are assembled as raw blocks, then dequantized on the device for a float ``dtype``.

    On CPU devices the host buffers become the array (XLA aliases them). On accelerators each block moves
    in runs of its leading (layer) axis of at most ``max_host_bytes``, each sent to the block's devices
    and freed before the next is read, and joined there: the host never holds a whole stacked leaf.

    Example:
        >>> import tempfile, pathlib, numpy as np, safetensors.numpy
        >>> from jax.sharding import SingleDeviceSharding
        >>> from jaxweights.formats import open_checkpoint
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> safetensors.numpy.save_file({f"h.{i}.w": np.full(2, i, np.float32) for i in range(3)}, str(path))
        >>> with open_checkpoint(path) as checkpoint:
        ...     stacked = stack_layers(checkpoint, "h")["h.w"]
        ...     place_composite(checkpoint, stacked, DType.float32, SingleDeviceSharding(jax.devices()[0]))
        Array([[0., 0.],
               [1., 1.],
               [2., 2.]], dtype=float32)
    """
    with jax.ensure_compile_time_eval():
        info = composite.info
        if not checked:
            check_sharding(info, sharding)
        encoding = info.encoding
        if encoding is None:
            return _place_plain(checkpoint, composite, dtype, sharding, max_host_bytes)
        if dtype is not DType.uint8 and dtype not in _DEQUANTIZED:
            raise DTypeError(
                f"Composite {info.name!r} holds {encoding.name} blocks: place it as uint8 blocks or "
                f"dequantized as one of {', '.join(d.name for d in _DEQUANTIZED)}, not {dtype.name}.",
                file=info.file,
                tensor=info.name,
            )
        blocks = _place_plain(checkpoint, _as_bytes(composite), DType.uint8, sharding, max_host_bytes)
        if dtype is DType.uint8:
            return blocks
        expanded: jax.Array = _dequantizer(encoding, info.shape, dtype, sharding)(blocks)
        return expanded


def _as_bytes(composite: Composite) -> Composite:
    """A quantized composite as its raw uint8 blocks: every last dimension counted in bytes."""
    encoding = composite.info.encoding
    assert encoding is not None

    def scaled(n: int) -> int:
        return n // encoding.elements_per_block * encoding.block_size

    pieces = []
    for p in composite.pieces:
        (first, last), source_dim = p.region[-1], p.dims[-1]
        origin = list(p.origin)
        if source_dim is not None:
            origin[source_dim] = scaled(origin[source_dim])
        region = (*p.region[:-1], (scaled(first), scaled(last)))
        pieces.append(Piece(blocks_of(p.source), region, tuple(origin), p.dims))
    info = blocks_of(composite.info)
    return Composite(info, tuple(pieces))


def _place_plain(
    checkpoint: Checkpoint, composite: Composite, dtype: DType, sharding: Sharding, max_host_bytes: int
) -> jax.Array:
    info = composite.info
    on_cpu = is_cpu_only(sharding)
    if not on_cpu:
        return _place_streamed(checkpoint, composite, dtype, sharding, max_host_bytes)
    narrowing = _narrows_integers(info.dtype, dtype)
    host_dtype = dtype if on_cpu and not narrowing else info.dtype
    indices = sharding.addressable_devices_indices_map(info.shape)
    buffers = _fill_blocks(
        checkpoint, composite, host_dtype, {block_key(i, info.shape) for i in indices.values()}
    )
    if narrowing:
        buffers = _narrowed(info, buffers, dtype, convert=on_cpu)
    array: jax.Array
    if len(sharding.device_set) == 1:
        (host,) = buffers.values()
        array = jax.device_put(host, sharding)
    else:
        array = jax.make_array_from_callback(
            info.shape, sharding, lambda index: buffers[block_key(index, info.shape)]
        )
    if array.dtype != dtype.to_numpy():
        converted: jax.Array = _converter(dtype.value)(array)
        return converted
    return array


def _runs(key: BlockKey, itemsize: int, limit: int) -> list[BlockKey]:
    """``key`` cut along its leading axis into runs of at most ``limit`` bytes (one row at least).

    Example:
        >>> _runs(((0, 6), (0, 4)), 4, 40)
        [((0, 2), (0, 4)), ((2, 4), (0, 4)), ((4, 6), (0, 4))]
    """
    if not key or key[0][1] - key[0][0] <= 1:
        return [key]
    (first, last), rest = key[0], key[1:]
    row = element_count(stop - start for start, stop in rest) * itemsize
    step = max(1, limit // max(1, row))
    return [((start, min(start + step, last)), *rest) for start in range(first, last, step)]


def _place_streamed(
    checkpoint: Checkpoint, composite: Composite, dtype: DType, sharding: Sharding, max_host_bytes: int
) -> jax.Array:
    """Accelerator targets: each block in runs of its leading axis, read in the stored dtype, sent to the
    block's devices and released before the next run; runs joined and converted on the devices."""
    info = composite.info
    indices = sharding.addressable_devices_indices_map(info.shape)
    holders: dict[BlockKey, list[Any]] = {}
    for device, index in indices.items():
        holders.setdefault(block_key(index, info.shape), []).append(device)
    narrowing = _narrows_integers(info.dtype, dtype)
    parts: dict[Any, jax.Array] = {}
    for key, devices in holders.items():
        runs: dict[Any, list[jax.Array]] = {device: [] for device in devices}
        for run in _runs(key, info.dtype.size_in_bytes, max(1, max_host_bytes)):
            buffers = _fill_blocks(checkpoint, composite, info.dtype, {run})
            if narrowing:  # values that do not fit are refused before anything moves
                _narrowed(info, buffers, dtype, convert=False)
            (host,) = buffers.values()
            placed = jax.device_put([host] * len(devices), [SingleDeviceSharding(d) for d in devices])
            for device, array in zip(devices, jax.block_until_ready(placed), strict=True):
                runs[device].append(array)
            del buffers, host  # the run's host memory goes before the next is read
        for device, pieces in runs.items():
            parts[device] = pieces[0] if len(pieces) == 1 else _join_runs(pieces)
    array = jax.make_array_from_single_device_arrays(info.shape, sharding, [parts[d] for d in indices])
    if array.dtype != dtype.to_numpy():
        converted: jax.Array = _converter(dtype.value)(array)
        return converted
    return array


@jax.jit
def _join_runs(runs: list[jax.Array]) -> jax.Array:
    return jax.numpy.concatenate(runs, axis=0)


def _readable_by_ranges(source: TensorInfo) -> bool:
    return source.contiguous and not source.dtype.is_packed and not source.swapped


def _fill_blocks(
    checkpoint: Checkpoint, composite: Composite, dtype: DType, keys: set[BlockKey]
) -> dict[BlockKey, np.ndarray]:
    """Host buffers of ``dtype`` for each block key, sharing one 64-byte aligned arena, filled from the
    pieces: contiguous same-dtype runs by parallel `preadv`, the rest banded through `copy_block`, and
    sources not readable by ranges read whole, one at a time."""
    ordered = sorted(keys)
    itemsize = dtype.size_in_bytes
    sizes = [element_count(stop - start for start, stop in key) * itemsize for key in ordered]
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + -(-size // ALIGNMENT) * ALIGNMENT)
    arena = aligned_empty((starts[-1] + sizes[-1],), np.dtype(np.uint8))
    buffers = {
        key: arena[start : start + size].view(dtype.to_numpy()).reshape(tuple(b - a for a, b in key))
        for key, start, size in zip(ordered, starts, sizes, strict=True)
    }
    tasks: list[Callable[[], None]] = []
    gathered: dict[TensorInfo, list[tuple[BlockKey, np.ndarray]]] = {}
    whole: dict[TensorInfo, list[tuple[BlockKey, np.ndarray]]] = {}
    for key, out in buffers.items():
        for piece in composite.pieces:
            part = _intersect(piece, key, out)
            if part is None:
                continue
            source_key, target = part
            source = piece.source
            if not _readable_by_ranges(source):
                whole.setdefault(source, []).append((source_key, target))
                continue
            offset = _run_offset(source, source_key)
            if offset is not None and dtype is source.dtype and target.flags.c_contiguous:
                start = target.ctypes.data - arena.ctypes.data
                tasks += _run_tasks_for(checkpoint, source, arena, start, offset, target.nbytes)
            else:
                gathered.setdefault(source, []).append((source_key, target))
    for source, parts in gathered.items():
        tasks += _band_tasks_for(checkpoint, source, parts, arena)
    _run_parallel(tasks)
    for source, parts in whole.items():  # bounded: one whole source on the host at a time
        values = checkpoint.read(source)
        for source_key, target in parts:
            np.copyto(target, values[tuple(slice(a, b) for a, b in source_key)], casting="unsafe")
        del values
    return buffers


def _intersect(piece: Piece, key: BlockKey, out: np.ndarray) -> tuple[BlockKey, np.ndarray] | None:
    """The source box a piece contributes to block ``key``, and the view of ``out`` it fills (in the
    source's shape, inserted axes dropped); None when they do not meet or the part is empty."""
    bounds = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(piece.region, key, strict=True)]
    if any(low >= high for low, high in bounds):
        return None
    target = out[tuple(slice(low - c, high - c) for (low, high), (c, _) in zip(bounds, key, strict=True))]
    source_key = [(0, 0)] * len(piece.origin)
    for (low, high), (first, _), dim in zip(bounds, piece.region, piece.dims, strict=True):
        if dim is not None:
            begin = piece.origin[dim] + low - first
            source_key[dim] = (begin, begin + high - low)
    inserted = tuple(axis for axis, dim in enumerate(piece.dims) if dim is None)
    return tuple(source_key), np.squeeze(target, axis=inserted) if inserted else target


def _run_offset(source: TensorInfo, key: BlockKey) -> int | None:
    """Byte offset of ``source[key]`` when it is one contiguous run of the stored bytes, else None.

    Example:
        >>> from pathlib import Path
        >>> t = TensorInfo("t", DType.float32, (4, 3), Path("m"), 0, 48)
        >>> _run_offset(t, ((1, 3), (0, 3))), _run_offset(t, ((1, 3), (0, 2))), _run_offset(t, ((2, 3), (1, 2)))
        (12, None, 28)
    """
    shape = source.shape
    outer = next((axis for axis, (a, b) in enumerate(key) if b - a != 1), len(shape))
    if any(key[axis] != (0, shape[axis]) for axis in range(outer + 1, len(shape))):
        return None
    strides = c_strides(shape, source.dtype.size_in_bytes)
    return sum(start * stride for (start, _), stride in zip(key, strides, strict=True))
