"""Bytes to `jax.Array`s: the only module that turns checkpoint bytes into device arrays.

For one CPU device, 64-byte aligned tensors are handed to `jax.device_put` as read-only views of the file
map, which XLA aliases (zero-copy). Other tensors are copied once, by both cores, from the file map into
64-byte aligned buffers (faulted in ahead of the copy) that `device_put` then aliases;
the file pages are released behind the copy so resident memory stays near one copy. For a `Sharding`, the
array is built with `jax.make_array_from_callback`, reading each distinct shard index once and only its
bytes. Dtype conversion happens on the host for CPU targets (one pass, no second device buffer) and on
the device otherwise.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding

from ._buffers import ALIGNMENT, HUGE_PAGE, aligned_empty, populate
from ._dtypes import DType
from .errors import DTypeError, ShardingError
from .formats import Checkpoint, TensorInfo

__all__ = ["is_zero_copy", "place", "resolve_dtype"]

_MIN_CHUNK = HUGE_PAGE  # parallel copies split on 2 MiB boundaries
_MAX_CHUNK = 8 * HUGE_PAGE
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="jaxweights-read")
        return _pool


def _run_chunks(total: int, work: Callable[[int, int], None], unit: int = 1) -> None:
    """Runs ``work(begin, end)`` over [0, total) in chunks whose edges are multiples of ``unit``, in
    parallel when there is more than one chunk."""
    workers = _executor()._max_workers
    step = min(max(-(-total // (2 * workers)), _MIN_CHUNK), _MAX_CHUNK)
    step = max(unit, -(-step // _MIN_CHUNK) * _MIN_CHUNK // unit * unit)
    if total <= step:
        work(0, total)
        return
    bounds = [(begin, min(begin + step, total)) for begin in range(0, total, step)]
    for future in [_executor().submit(work, b, e) for b, e in bounds]:
        future.result()


def resolve_dtype(info: TensorInfo, requested: DType | None) -> DType:
    """The dtype an allocation produces: the request, or the stored dtype as JAX would canonicalise it
    (64-bit types become 32-bit unless ``jax_enable_x64`` is on)."""
    if requested is None:
        return _canonical(info.dtype)
    canonical = _canonical(requested)
    if canonical is not requested:
        raise DTypeError(
            f"Tensor {info.name!r} ({info.file}): dtype={requested.name} needs 64-bit support, which is "
            f"off. Enable it with jax.config.update('jax_enable_x64', True), or ask for "
            f"{canonical.name}.",
            file=info.file,
            tensor=info.name,
        )
    return requested


def _canonical(dtype: DType) -> DType:
    """``dtype`` as JAX stores it now (64-bit types narrow unless ``jax_enable_x64`` is on)."""
    return _canonical_cached(dtype, bool(jax.config.read("jax_enable_x64")))


@cache
def _canonical_cached(dtype: DType, x64: bool) -> DType:
    return DType.from_numpy(np.dtype(jax.dtypes.canonicalize_dtype(dtype.to_numpy())))


def check_sharding(info: TensorInfo, sharding: Sharding) -> None:
    """Raises `ShardingError` unless ``sharding`` can lay out a tensor of ``info.shape``; for a
    `NamedSharding` the message names the offending axis and mesh axes."""
    if isinstance(sharding, SingleDeviceSharding):
        return
    where = f"Tensor {info.name!r} of shape {info.shape} ({info.file})"
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
        sharding.shard_shape(info.shape)
    except (ValueError, TypeError, IndexError) as error:
        raise ShardingError(
            f"{where} cannot be laid out with {sharding}: {error}.", file=info.file, tensor=info.name
        ) from error


def is_zero_copy(info: TensorInfo, dtype: DType, sharding: Sharding) -> bool:
    """True when `place` will alias the file map instead of copying (CPU, aligned, same dtype)."""
    return dtype is info.dtype and info.is_aligned() and _all_cpu(sharding)


def _all_cpu(sharding: Sharding) -> bool:
    return all(getattr(d, "platform", None) == "cpu" for d in sharding.addressable_devices)


def place(checkpoint: Checkpoint, info: TensorInfo, dtype: DType, sharding: Sharding) -> jax.Array:
    """Reads one tensor into a `jax.Array` laid out by ``sharding``, converted to ``dtype``."""
    check_sharding(info, sharding)
    on_cpu = _all_cpu(sharding)
    host_dtype = dtype if on_cpu else info.dtype
    if len(sharding.device_set) == 1:
        host = _host_array(checkpoint, info, host_dtype, on_cpu)
        array: jax.Array = jax.device_put(host, sharding)
    else:
        array = _place_sharded(checkpoint, info, host_dtype, sharding, on_cpu)
    if array.dtype != dtype.to_numpy():
        converted: jax.Array = _converter(dtype.value)(array)
        return converted
    return array


def _host_array(checkpoint: Checkpoint, info: TensorInfo, dtype: DType, on_cpu: bool) -> np.ndarray:
    """The whole tensor on the host, as cheaply as the target allows."""
    if info.dtype.is_packed or info.encoding is not None:
        host = checkpoint.read(info)
        return host if dtype is info.dtype else host.astype(dtype.to_numpy())
    if dtype is info.dtype:
        if info.is_aligned() or not on_cpu:
            return checkpoint.view(info)  # CPU: aliased; accelerators: DMA'd straight from the map
        out = aligned_empty(info.shape, dtype.to_numpy())
        _read_parallel(checkpoint, info, out)
        return out
    return _convert_from_map(checkpoint, info, dtype)


def _read_parallel(checkpoint: Checkpoint, info: TensorInfo, out: np.ndarray, offset: int = 0) -> None:
    """Fills ``out`` with the tensor's bytes from ``offset`` on, in parallel chunks: each chunk's
    destination pages are faulted in with one call, copied from the file map, and the map's pages are
    released behind the copy so resident memory stays near one copy of the data.

    Measured on a 2-core VM with jax loaded, this runs 3-6x faster than `preadv` into the same buffers.
    """
    flat = out.reshape(-1).view(np.uint8)

    def work(begin: int, end: int) -> None:
        populate(flat, begin, end)
        checkpoint.copy_into(info, flat[begin:end], offset + begin)

    _run_chunks(flat.nbytes, work)


def _convert_from_map(checkpoint: Checkpoint, info: TensorInfo, dtype: DType) -> np.ndarray:
    """One pass from the file map into an aligned buffer of ``dtype``, releasing pages behind it."""
    source = checkpoint.view(info).reshape(-1)
    out = aligned_empty(info.shape, dtype.to_numpy())
    flat = out.reshape(-1)
    itemsize = info.dtype.size_in_bytes

    def convert(begin: int, end: int) -> None:
        lo, hi = begin // itemsize, end // itemsize
        populate(flat, lo * flat.itemsize, hi * flat.itemsize)
        np.copyto(flat[lo:hi], source[lo:hi], casting="unsafe")
        checkpoint.release(info, begin, end - begin)

    _run_chunks(info.nbytes, convert, unit=itemsize)
    return out


# ---------------------------------------------------------------------------------------------
# Sharded placement
# ---------------------------------------------------------------------------------------------


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=False)) + tuple(
        (0, n) for n in shape[len(index) :]
    )


def _place_sharded(
    checkpoint: Checkpoint, info: TensorInfo, dtype: DType, sharding: Sharding, on_cpu: bool
) -> jax.Array:
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
    lock = threading.Lock()

    def callback(index: tuple[slice, ...] | None) -> np.ndarray:
        key = _index_key(index or (), info.shape)
        with lock:
            if key not in cache:
                cache[key] = _read_block(checkpoint, info, key, dtype, on_cpu)
            return cache[key]

    return jax.make_array_from_callback(info.shape, sharding, callback)


def _read_block(
    checkpoint: Checkpoint,
    info: TensorInfo,
    key: tuple[tuple[int, int], ...],
    dtype: DType,
    on_cpu: bool,
) -> np.ndarray:
    """The block ``key`` of a tensor on the host, reading only its bytes."""
    block_shape = tuple(stop - start for start, stop in key)
    if info.dtype.is_packed or info.encoding is not None:
        whole = checkpoint.read(info)
        return np.ascontiguousarray(whole[tuple(slice(a, b) for a, b in key)]).astype(dtype.to_numpy())
    itemsize = info.dtype.size_in_bytes
    contiguous = _is_contiguous(key, info.shape)
    if contiguous and dtype is info.dtype:
        offset = _flat_offset(key, info.shape) * itemsize
        nbytes = math.prod(block_shape) * itemsize
        if on_cpu and (info.start + offset) % ALIGNMENT == 0:
            return (
                checkpoint.view(info)
                .reshape(-1)
                .view(np.uint8)[offset : offset + nbytes]
                .view(info.dtype.to_numpy())
                .reshape(block_shape)
            )
        out = aligned_empty(block_shape, dtype.to_numpy())
        _read_parallel(checkpoint, info, out, offset)
        return out
    source = checkpoint.view(info)[tuple(slice(a, b) for a, b in key)]
    out = aligned_empty(block_shape, dtype.to_numpy())
    np.copyto(out, source, casting="unsafe")
    checkpoint.release(info)
    return out


def _is_contiguous(key: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> bool:
    """True when a block is one byte run: dimensions after the last split one are whole, and those
    before it have extent 1."""
    for axis in reversed(range(len(shape))):
        if key[axis] != (0, shape[axis]):
            return all(stop - start == 1 for start, stop in key[:axis])
    return True


def _flat_offset(key: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> int:
    offset = 0
    for (start, _), dim in zip(key, shape, strict=True):
        offset = offset * dim + start
    return offset


@cache
def _converter(dtype_name: str) -> Callable[[Any], Any]:
    target = DType(dtype_name).to_numpy()
    return jax.jit(lambda x: x.astype(target))
