"""Bytes to `jax.Array`s: the only module that turns checkpoint bytes into device arrays.

For one CPU device, 64-byte aligned tensors are handed to `jax.device_put` as read-only views of the file
map, which XLA aliases (zero-copy). Other tensors are read once, by every usable core, with `preadv` into
64-byte aligned buffers (faulted in ahead of the read) that `device_put` then aliases: no file page is
mapped, and a file truncated meanwhile is an error, never a SIGBUS. Bulk loads (`place_many`) hand
unaligned views to one `device_put` per chunk instead, which XLA copies on its own threads, overlapping
the tensors of a chunk; each chunk is waited for and its file pages released before the call goes on.
For a `Sharding`, the array is built with `jax.make_array_from_callback`, reading each distinct shard
index once and only its bytes. Dtype conversion happens on the host for CPU
targets (one pass, no second device buffer) and on the device otherwise. Integers narrowed to a smaller
type (int64 with ``jax_enable_x64`` off) are range-checked on the host first: values never wrap silently.
Measured figures live in docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding

from ._buffers import ALIGNMENT, HUGE_PAGE, aligned_empty, populate
from ._compat import put_on_device
from ._devices import is_cpu_only, usable_cores
from ._dtypes import DType
from ._plan import BlockKey, BlockRead, ReadPlan, block_key, plan_reads
from ._quantization import QuantizationEncoding
from ._shapes import element_count
from .errors import DTypeError, ShardingError
from .formats import NATIVE_ORDER, Checkpoint, TensorInfo

__all__ = [
    "blocks_of",
    "canonical_dtype",
    "check_sharding",
    "place",
    "place_many",
    "plan_for",
    "read_blocks",
    "resolve_dtype",
]

_MIN_CHUNK = HUGE_PAGE  # parallel copies split on 2 MiB boundaries
_MAX_CHUNK = 8 * HUGE_PAGE


@cache
def _executor() -> ThreadPoolExecutor:
    """The copy pool: one thread per usable core (at least two, so a copy overlaps a page-fault stall)."""
    return ThreadPoolExecutor(_copy_workers(), thread_name_prefix="jaxweights-read")


@cache
def _copy_workers() -> int:
    return max(2, usable_cores())


def resolve_dtype(info: TensorInfo, requested: DType | None) -> DType:
    """The dtype an allocation produces: the request, or the stored dtype as JAX would canonicalise it
    (64-bit types become 32-bit unless ``jax_enable_x64`` is on)."""
    if requested is None:
        return canonical_dtype(info.dtype)
    canonical = canonical_dtype(requested)
    if canonical is not requested:
        raise DTypeError(
            f"Tensor {info.name!r} ({info.file}): dtype={requested.name} needs 64-bit support, which is "
            f"off. Enable it with jax.config.update('jax_enable_x64', True), or ask for "
            f"{canonical.name}.",
            file=info.file,
            tensor=info.name,
        )
    return requested


def canonical_dtype(dtype: DType) -> DType:
    """``dtype`` as JAX stores it now (64-bit types narrow unless ``jax_enable_x64`` is on)."""
    x64 = np.dtype(jax.dtypes.canonicalize_dtype(np.int64)) == np.int64
    return _canonical_cached(dtype, bool(x64))


@cache
def _canonical_cached(dtype: DType, x64: bool) -> DType:
    return DType.from_numpy(np.dtype(jax.dtypes.canonicalize_dtype(dtype.to_numpy())))


def check_sharding(info: TensorInfo, sharding: Sharding) -> None:
    """Raises `ShardingError` unless ``sharding`` can lay out a tensor of ``info.shape``; for a
    `NamedSharding` the message names the offending axis and mesh axes."""
    if isinstance(sharding, SingleDeviceSharding):
        return
    where = f"Tensor {info.name!r} of shape {info.shape} ({info.file})"
    if not sharding.addressable_devices:
        raise ShardingError(
            f"{where}: {sharding} holds none of process {jax.process_index()}'s devices, so this process "
            f"could hold no part of it. Build meshes from jax.devices() on every process.",
            file=info.file,
            tensor=info.name,
        )
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if len(spec) > len(info.shape):
            raise ShardingError(
                f"{where} has {len(info.shape)} dimension(s), but {sharding.spec} names {len(spec)}. "
                f"Use a PartitionSpec with at most {len(info.shape)} entries.",
                file=info.file,
                tensor=info.name,
            )
        mesh_shape = dict(sharding.mesh.shape)
        for axis, entry in enumerate(spec):
            names = () if entry is None else tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
            parts = math.prod(mesh_shape[n] for n in names)
            if info.shape[axis] % parts:
                raise ShardingError(
                    f"{where}: dimension {axis} (size {info.shape[axis]}) does not divide evenly over mesh "
                    f"axes {names} ({parts} devices) of mesh {mesh_shape}. Replicate that dimension "
                    f"(None in the PartitionSpec) or choose a mesh axis whose size divides it.",
                    file=info.file,
                    tensor=info.name,
                )
    try:
        shard = sharding.shard_shape(info.shape)
    except (ValueError, TypeError, IndexError) as error:
        raise ShardingError(
            f"{where} cannot be laid out with {sharding}: {error}.", file=info.file, tensor=info.name
        ) from error
    if info.encoding is not None and shard and shard[-1] % info.encoding.elements_per_block:
        per_block = info.encoding.elements_per_block
        raise ShardingError(
            f"{where} holds {info.encoding.name} blocks of {per_block} values along its last dimension; "
            f"{sharding} would give each device {shard[-1]} of them, splitting a block. Shard the rows "
            f"instead, or so that each device's part is a multiple of {per_block}.",
            file=info.file,
            tensor=info.name,
        )


def place(
    checkpoint: Checkpoint, info: TensorInfo, dtype: DType, sharding: Sharding, *, checked: bool = False
) -> jax.Array:
    """Reads one tensor into a `jax.Array` laid out by ``sharding``, converted to ``dtype``.

    Only the blocks this process's devices hold are read, each distinct block once. ``checked`` skips
    `check_sharding` when the caller already ran it. Called inside a trace (a plain accessor's
    `allocate` in a jitted function), it still returns a concrete array; a graph function that closes
    over one is refused when it lowers (graph functions allocate through their graph instead).
    """
    with jax.ensure_compile_time_eval():
        return _place(checkpoint, info, dtype, sharding, checked=checked)


def _place(
    checkpoint: Checkpoint, info: TensorInfo, dtype: DType, sharding: Sharding, *, checked: bool
) -> jax.Array:
    if not checked:
        check_sharding(info, sharding)
    if info.encoding is not None:
        return _place_quantized(checkpoint, info, dtype, sharding)
    on_cpu = is_cpu_only(sharding)
    narrowing = _narrows_integers(info.dtype, dtype)
    single = len(sharding.device_set) == 1
    # convert on the host for CPU targets, unless values must be checked or swapped first
    host_dtype = dtype if on_cpu and not narrowing and not info.swapped else info.dtype
    indices = sharding.addressable_devices_indices_map(info.shape)
    if info.dtype.is_packed or not info.contiguous:
        buffers = _whole_then_slice(checkpoint, info, host_dtype, indices)
    elif info.swapped:  # big-endian elements: read the bytes as they are, then swap them
        native = info._replace(byteorder=NATIVE_ORDER)
        raw = read_blocks(checkpoint, plan_for(native, sharding), host_dtype, on_cpu)
        buffers = {key: block.byteswap() for key, block in raw.items()}
    else:
        buffers = read_blocks(checkpoint, plan_for(info, sharding), host_dtype, on_cpu)
    if narrowing:
        buffers = _narrowed(info, buffers, dtype, convert=on_cpu)
    array: jax.Array
    if single:
        (host,) = buffers.values()
        array = jax.device_put(host, sharding)
    else:
        # make_array_from_callback batches the per-device transfers (7x faster than device_put lists)
        by_index = {_raw(index): buffers[block_key(index, info.shape)] for index in indices.values()}

        def lookup(index: tuple[slice, ...] | None) -> np.ndarray:
            found = by_index.get(_raw(index))
            return found if found is not None else buffers[block_key(index, info.shape)]

        array = jax.make_array_from_callback(info.shape, sharding, lookup)
    if array.dtype != dtype.to_numpy():
        converted: jax.Array = _converter(dtype.value)(array)
        return converted
    return array


def place_many(
    checkpoint: Checkpoint,
    requests: Sequence[tuple[TensorInfo, DType, Sharding]],
    *,
    chunk_bytes: int = 256 << 20,
) -> list[jax.Array]:
    """`place` for many tensors at once, in order, their shardings already checked; every array is ready
    when it returns.

    Plain tensors kept in their stored dtype on one CPU device (the bulk of most checkpoints) are handed
    to one `jax.device_put` per device and per ``chunk_bytes`` of data: views of the file that XLA aliases
    (64-byte aligned) or copies on its own threads, asynchronously, so the copies of a chunk overlap each
    other and the Python work between them. The chunk is waited for and the file pages behind its
    copies released before the next one starts, so no more than ``chunk_bytes`` of file pages are mapped
    at once and nothing reads the file after the call. Every other tensor goes through `place`.
    """
    arrays: list[jax.Array | None] = [None] * len(requests)
    batches: dict[Sharding, list[int]] = {}
    for position, (info, dtype, sharding) in enumerate(requests):
        if _batchable(info, dtype, sharding):
            batches.setdefault(sharding, []).append(position)
        else:
            arrays[position] = place(checkpoint, info, dtype, sharding, checked=True)
    for sharding, positions in batches.items():
        for chunk in _chunks([requests[p][0] for p in positions], positions, chunk_bytes):
            infos = [info for info, _ in chunk]
            placed = put_on_device(checkpoint.views(infos), sharding)
            jax.block_until_ready(placed)
            for (info, position), array in zip(chunk, placed, strict=True):
                arrays[position] = array
                if not info.is_aligned():  # XLA copied it: its file pages are no longer needed
                    checkpoint.note_copied(info.nbytes)
                    checkpoint.release(info)
    return [array for array in arrays if array is not None]


def _chunks(
    infos: list[TensorInfo], positions: list[int], limit: int
) -> Iterator[list[tuple[TensorInfo, int]]]:
    """Consecutive runs of tensors whose copied bytes stay within ``limit`` (a larger one runs alone)."""
    chunk: list[tuple[TensorInfo, int]] = []
    size = 0
    for info, position in zip(infos, positions, strict=True):
        cost = 0 if info.is_aligned() else info.nbytes
        if chunk and size + cost > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append((info, position))
        size += cost
    if chunk:
        yield chunk


def _batchable(info: TensorInfo, dtype: DType, sharding: Sharding) -> bool:
    return (
        dtype is info.dtype
        and info.encoding is None
        and not info.dtype.is_packed
        and not info.swapped
        and info.contiguous
        and _one_cpu(sharding)
    )


@lru_cache(maxsize=256)
def _one_cpu(sharding: Sharding) -> bool:
    return len(sharding.device_set) == 1 and is_cpu_only(sharding)


def blocks_of(info: TensorInfo) -> TensorInfo:
    """A quantized tensor's raw blocks as a plain uint8 tensor of its byte shape (`stored_shape`): what is
    read and placed, row blocks and all, before any dequantization."""
    return info._replace(dtype=DType.uint8, shape=info.stored_shape, encoding=None)


def _place_quantized(checkpoint: Checkpoint, info: TensorInfo, dtype: DType, sharding: Sharding) -> jax.Array:
    """Places the blocks (each device reads only its rows), then, for a float ``dtype``, dequantizes them
    on the device with the same sharding (MAX stops at the blocks)."""
    assert info.encoding is not None
    if dtype is not DType.uint8 and dtype not in _DEQUANTIZED:
        raise DTypeError(
            f"Tensor {info.name!r} ({info.file}) holds {info.encoding.name} blocks: allocate them as uint8 "
            f"blocks (no dtype) or dequantized as {', '.join(d.name for d in _DEQUANTIZED)}, not "
            f"{dtype.name}.",
            file=info.file,
            tensor=info.name,
        )
    blocks = _place(checkpoint, blocks_of(info), DType.uint8, sharding, checked=True)
    if dtype is DType.uint8:
        return blocks
    expand: jax.Array = _dequantizer(info.encoding, info.shape, dtype, sharding)(blocks)
    return expand


_DEQUANTIZED = (DType.float32, DType.bfloat16, DType.float16)


@lru_cache(maxsize=256)
def _dequantizer(
    encoding: QuantizationEncoding, shape: tuple[int, ...], dtype: DType, sharding: Sharding
) -> Callable[[jax.Array], jax.Array]:
    from ._dequant import dequantize

    def expand(blocks: jax.Array) -> jax.Array:
        return dequantize(blocks, encoding, shape, dtype)

    return jax.jit(expand, out_shardings=sharding)


def plan_for(info: TensorInfo, sharding: Sharding) -> ReadPlan:
    """`plan_reads` for this process's devices under ``sharding``; layers that share a shape, dtype and
    sharding share one cached plan (block offsets are relative to the tensor)."""
    return ReadPlan(info, _blocks(info.shape, info.dtype, sharding))


@lru_cache(maxsize=4096)
def _blocks(shape: tuple[int, ...], dtype: DType, sharding: Sharding) -> tuple[BlockRead, ...]:
    probe = TensorInfo("", dtype, shape, Path(), 0, element_count(shape) * dtype.size_in_bytes)
    return plan_reads(probe, sharding.addressable_devices_indices_map(shape)).blocks


def _raw(index: tuple[slice, ...] | None) -> tuple[tuple[object, object], ...]:
    return tuple((part.start, part.stop) for part in index) if index else ()


def read_blocks(
    checkpoint: Checkpoint, plan: ReadPlan, dtype: DType, on_cpu: bool
) -> dict[BlockKey, np.ndarray]:
    """Host arrays for every block of a plan, as ``dtype``.

    A block that is one contiguous run in the stored dtype is a view of the file map when XLA can alias
    it (CPU, 64-byte aligned) or copy from it directly (accelerators). The other blocks share one
    64-byte aligned arena, laid out in file order, so that adjacent row blocks (a process's share of a
    row-sharded tensor) are filled by one parallel copy; strided blocks (column shards) are gathered
    band by band across all blocks.
    """
    info = plan.tensor
    buffers: dict[BlockKey, np.ndarray] = {}
    copied: list[BlockRead] = []
    whole = checkpoint.raw_view(info) if checkpoint.mapped else None  # unmapped: every block is read
    for block in plan.blocks:
        runs_in_place = dtype is info.dtype and block.num_runs <= 1
        if (
            whole is not None
            and runs_in_place
            and (not on_cpu or (info.start + block.offset) % ALIGNMENT == 0)
        ):
            buffers[block.key] = (
                whole[block.offset : block.offset + block.nbytes].view(dtype.to_numpy()).reshape(block.shape)
            )
        else:
            copied.append(block)
    if not copied:
        return buffers
    copied.sort(key=lambda block: block.offset)
    itemsize = dtype.size_in_bytes
    sizes = [element_count(block.shape) * itemsize for block in copied]
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + -(-size // ALIGNMENT) * ALIGNMENT)
    arena = aligned_empty((starts[-1] + sizes[-1],), np.dtype(np.uint8))
    tasks: list[Callable[[], None]] = []
    gathered: list[tuple[BlockKey, np.ndarray]] = []
    spans: list[list[int]] = []  # [offset in tensor, offset in arena, length]: adjacent runs merged
    for block, start, size in zip(copied, starts, sizes, strict=True):
        out = arena[start : start + size].view(dtype.to_numpy()).reshape(block.shape)
        buffers[block.key] = out
        if dtype is info.dtype and block.num_runs <= 1:
            if spans and spans[-1][0] + spans[-1][2] == block.offset and spans[-1][1] + spans[-1][2] == start:
                spans[-1][2] += size
            else:
                spans.append([block.offset, start, size])
        else:
            gathered.append((block.key, out))
    for offset, start, size in spans:
        tasks += _run_tasks_for(checkpoint, info, arena, start, offset, size)
    if gathered:
        tasks += _band_tasks_for(checkpoint, info, gathered, arena)
    _run_parallel(tasks)
    return buffers


def _chunk_bytes(total: int) -> int:
    """Bytes per parallel chunk: about two chunks per worker, 2-16 MiB, on 2 MiB boundaries."""
    workers = _copy_workers()
    step = min(max(-(-total // (2 * workers)), _MIN_CHUNK), _MAX_CHUNK)
    return -(-step // _MIN_CHUNK) * _MIN_CHUNK


def _run_tasks_for(
    checkpoint: Checkpoint, info: TensorInfo, arena: np.ndarray, start: int, offset: int, size: int
) -> list[Callable[[], None]]:
    """Tasks copying ``size`` bytes from ``offset`` into the tensor to ``arena[start:]``: each faults its
    destination in with one call, then reads into it with `preadv` (no file pages mapped), so resident
    memory grows by the destination alone (docs/performance.md compares this with copying from the map)."""
    step = _chunk_bytes(size)

    def task(begin: int, end: int) -> Callable[[], None]:
        def run() -> None:
            populate(arena, start + begin, start + end)
            checkpoint.copy_into(info, arena[start + begin : start + end], offset + begin)

        return run

    return [task(b, min(b + step, size)) for b in range(0, max(size, 1), step)]


def _band_tasks_for(
    checkpoint: Checkpoint, info: TensorInfo, blocks: list[tuple[BlockKey, np.ndarray]], arena: np.ndarray
) -> list[Callable[[], None]]:
    """Tasks gathering strided (or converted) blocks, one per band of the tensor's leading axis.

    Each task copies every block's part of its band, then releases the band's file pages: the pages
    are touched once and released once, however many blocks (column shards) share them.
    """
    if not info.shape or info.size == 0:

        def whole() -> None:
            for key, out in blocks:
                checkpoint.copy_block(info, out, key)

        return [whole]
    rows = info.shape[0]
    row_bytes = max(1, info.nbytes // rows)
    band = max(1, _chunk_bytes(info.nbytes) // row_bytes)
    base = arena.ctypes.data

    def task(r0: int, r1: int) -> Callable[[], None]:
        def run() -> None:
            for key, out in blocks:
                (first, last), rest = key[0], key[1:]
                lo, hi = max(first, r0), min(last, r1)
                if lo >= hi:
                    continue
                part = out[lo - first : hi - first]
                at = part.ctypes.data - base
                populate(arena, at, at + part.nbytes)
                checkpoint.copy_block(info, part, ((lo, hi), *rest), release=False)
            checkpoint.release(info, r0 * row_bytes, (r1 - r0) * row_bytes)

        return run

    return [task(r, min(r + band, rows)) for r in range(0, rows, band)]


def _run_parallel(tasks: list[Callable[[], None]]) -> None:
    """Runs tasks on the copy pool (inline when there is only one); re-raises the first failure."""
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    futures = [_executor().submit(task) for task in tasks]
    for future in futures:
        future.result()


def _whole_then_slice(
    checkpoint: Checkpoint, info: TensorInfo, dtype: DType, indices: Mapping[Any, tuple[slice, ...] | None]
) -> dict[BlockKey, np.ndarray]:
    """Packed (float4) tensors are not byte-addressable per element, and strided views (a transposed
    PyTorch tensor) are gathered on the host: read whole, slice."""
    whole = checkpoint.read(info)
    if dtype is not info.dtype:
        whole = whole.astype(dtype.to_numpy())
    buffers: dict[BlockKey, np.ndarray] = {}
    for index in indices.values():
        key = block_key(index, tuple(whole.shape))
        if key not in buffers:
            buffers[key] = np.ascontiguousarray(whole[tuple(slice(a, b) for a, b in key)])
    return buffers


def _narrows_integers(stored: DType, target: DType) -> bool:
    """True when integers are converted to a type that cannot hold every stored value."""
    if not (stored.is_integral() and target.is_integral()) or stored is target:
        return False
    wide, narrow = np.iinfo(stored.to_numpy()), np.iinfo(target.to_numpy())
    return bool(wide.min < narrow.min or wide.max > narrow.max)


def _narrowed(
    info: TensorInfo, buffers: dict[BlockKey, np.ndarray], dtype: DType, *, convert: bool
) -> dict[BlockKey, np.ndarray]:
    """Checks every value of the blocks fits ``dtype`` (raising `DTypeError` naming the tensor and the
    first value that does not), and converts them on the host when ``convert``."""
    limits = np.iinfo(dtype.to_numpy())
    for block in buffers.values():
        if block.size == 0:
            continue
        low, high = block.min(), block.max()
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            x64 = (
                ""
                if canonical_dtype(info.dtype) is info.dtype
                else (" JAX holds 64-bit integers only with jax.config.update('jax_enable_x64', True).")
            )
            raise DTypeError(
                f"Tensor {info.name!r} ({info.file}) holds {info.dtype.name} value {int(bad)}, which "
                f"{dtype.name} cannot represent (range {limits.min}..{limits.max}); converting would "
                f"change it silently.{x64} Fix: enable x64, or pass a dtype= that holds the values.",
                file=info.file,
                tensor=info.name,
            )
    if not convert:
        return buffers
    return {key: block.astype(dtype.to_numpy()) for key, block in buffers.items()}


@cache
def _converter(dtype_name: str) -> Callable[[Any], Any]:
    target = DType(dtype_name).to_numpy()
    return jax.jit(lambda x: x.astype(target))
