"""The accelerator load path: file bytes -> reusable host staging buffers -> device, under a byte budget.

A `StagingPool` is a fixed set of 64-byte aligned host buffers (`aligned_empty`) totalling at most the
budget. The main thread leases a buffer for each *piece* (one device block, or a run of its rows); a reader
thread fills it with `Checkpoint.copy_into` (``preadv``: no file page mapped) or, for strided blocks
(column shards), `Checkpoint.copy_block`; hands it to `jax.device_put` for every device that holds the
block; waits for those transfers (``block_until_ready``); and only then returns the buffer to the pool, so
no buffer is overwritten while a DMA may still read it. While one buffer is in transfer, the others are
being read: the device does not wait on the disk, and the host holds no more than the pool.

Decisions (issue 15):

* **Page-locked memory by ``cudaHostRegister``, not JAX's ``pinned_host`` memory kind.** A
  ``jax.device_put(numpy_array, SingleDeviceSharding(dev, memory_kind="pinned_host"))`` copies the numpy
  bytes into a buffer XLA allocates, and a second ``device_put`` moves that to the device: one extra host
  copy per tensor, which is what this module exists to avoid. The pool's own buffers are instead
  registered with the CUDA runtime (``cudaHostRegister``, portable), only when a GPU backend is present
  and ``libcudart`` is found (the ``nvidia.cuda_runtime`` wheel that ``jax[cuda]`` installs, else
  ``ctypes.util.find_library``); any failure falls back silently to pageable memory. Whether XLA's
  transfer then skips its own staging copy is measured by ``benchmarks/device_check.py``.
* **Blocks larger than one staging buffer are split into runs of whole rows**, each put to the device on
  its own and joined there by one jitted ``concatenate`` (device memory is briefly twice that tensor; the
  device copy costs little against the host link). A block whose single row exceeds a buffer (or a 0-d
  block) runs alone, with a dedicated buffer, once every pool buffer is back.
* Dtype conversion and GGUF dequantization run on the device after the transfer, as in `place`.
  Tensors this path does not stage (packed float4, strided PyTorch views, big-endian data, integers
  narrowed with a range check) go through `place`, in order, on the calling thread.
* On CPU devices XLA aliases an aligned staging buffer instead of copying it (``may_alias=False`` does not
  stop it for numpy input), so CPU targets get a private copy first; this keeps the path correct when
  forced onto CPU devices for tests. Real CPU loads never take this path.

Never maps file pages for contiguous blocks, never holds more staging memory than the pool, never leaves
a thread running after `load_staged` returns or raises.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from ._buffers import ALIGNMENT, aligned_empty
from ._devices import is_cpu_only
from ._dtypes import DType
from ._libc import cudart
from ._placement import (
    _DEQUANTIZED,
    _converter,
    _dequantizer,
    _narrows_integers,
    _run_parallel,
    _run_tasks_for,
    blocks_of,
    place,
    plan_for,
)
from ._plan import BlockKey, BlockRead
from .errors import DeviceError, WeightsError
from .formats import Checkpoint, TensorInfo

__all__ = ["StagingPool", "device_put", "load_staged", "staging_buffer_bytes"]

_MAX_BUFFER = 256 << 20
"""Largest staging buffer: big enough for full-bandwidth transfers, small enough to overlap four."""

Request = tuple[TensorInfo, DType, Sharding]
Put = Callable[[np.ndarray, Sequence[Sharding]], Sequence[Any]]
"""Starts copies of a host array to each sharding; returns objects whose ``block_until_ready()`` waits for
the copy and returns the `jax.Array` (what `jax.device_put` returns)."""


def staging_buffer_bytes(budget: int) -> int:
    """Bytes per staging buffer for a byte budget: a quarter of it (so four transfers overlap), 64-byte
    aligned, at most 256 MiB.

    Example:
        >>> staging_buffer_bytes(1 << 30) == 256 << 20, staging_buffer_bytes(4 << 30) == 256 << 20
        (True, True)
        >>> staging_buffer_bytes(1000)
        192
    """
    return max(ALIGNMENT, min(_MAX_BUFFER, budget // 4) // ALIGNMENT * ALIGNMENT)


class StagingPool:
    """A fixed set of reusable, 64-byte aligned host buffers totalling at most ``budget`` bytes.

    `acquire` blocks until a buffer is free; a request larger than one buffer waits until every buffer is
    back and then gets a dedicated buffer (it runs alone). Counters (`uses`, `peak_bytes`) say how the
    pool was used. ``pin`` page-locks the buffers with the CUDA runtime where one is present.

    Example:
        >>> pool = StagingPool(4096)
        >>> pool.count, pool.buffer_bytes
        (4, 1024)
        >>> lease = pool.acquire(100)
        >>> pool.in_flight, lease.nbytes
        (100, 1024)
        >>> pool.release(lease)
        >>> pool.in_flight, pool.peak_bytes, sum(pool.uses)
        (0, 100, 1)
    """

    def __init__(self, budget: int, *, buffer_bytes: int | None = None, pin: bool = False) -> None:
        size = staging_buffer_bytes(budget) if buffer_bytes is None else buffer_bytes
        self.buffer_bytes = max(ALIGNMENT, size // ALIGNMENT * ALIGNMENT)
        self.count = max(1, budget // self.buffer_bytes)
        self._buffers = [aligned_empty((self.buffer_bytes,), np.dtype(np.uint8)) for _ in range(self.count)]
        self._free = list(range(self.count))
        self._ready = threading.Condition()
        self._alone = False
        self.uses = [0] * self.count
        self.in_flight = self.peak_bytes = 0
        self._leased: dict[int, int] = {}
        self.pinned = [_pin(buffer) for buffer in self._buffers] if pin else [False] * self.count

    def acquire(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes (uint8), once one is free."""
        with self._ready:
            if nbytes <= self.buffer_bytes:
                self._ready.wait_for(lambda: bool(self._free) and not self._alone)
                index = self._free.pop()
                self.uses[index] += 1
                buffer = self._buffers[index]
            else:
                self._ready.wait_for(lambda: len(self._free) == self.count and not self._alone)
                self._alone = True
                buffer = aligned_empty((nbytes,), np.dtype(np.uint8))
            self.in_flight += nbytes
            self.peak_bytes = max(self.peak_bytes, self.in_flight)
            self._leased[id(buffer)] = nbytes
            return buffer

    def release(self, buffer: np.ndarray) -> None:
        """Returns a buffer from `acquire`; call only once nothing reads it any more."""
        with self._ready:
            self.in_flight -= self._leased.pop(id(buffer))
            for index, own in enumerate(self._buffers):
                if own is buffer:
                    self._free.append(index)
                    break
            else:
                self._alone = False
            self._ready.notify_all()

    @property
    def free(self) -> int:
        """Pool buffers not leased now."""
        with self._ready:
            return len(self._free)

    def close(self) -> None:
        """Unregisters page-locked buffers; the pool must hold every buffer (nothing in flight)."""
        for buffer, pinned in zip(self._buffers, self.pinned, strict=True):
            if pinned:
                _unpin(buffer)
        self.pinned = [False] * self.count


@functools.cache
def _cudart() -> Any:
    """The CUDA runtime with cudaHostRegister/Unregister, or None (no GPU backend, no library)."""
    try:
        if not jax.devices("gpu"):
            return None
    except RuntimeError:
        return None
    return cudart()


def _pin(buffer: np.ndarray) -> bool:
    lib = _cudart()
    if lib is None or buffer.nbytes == 0:
        return False
    return bool(lib.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 1) == 0)  # 1: portable


def _unpin(buffer: np.ndarray) -> None:
    lib = _cudart()
    if lib is not None:
        lib.cudaHostUnregister(buffer.ctypes.data)


def device_put(host: np.ndarray, shardings: Sequence[Sharding]) -> Sequence[Any]:
    """The default `Put`: one batched, asynchronous `jax.device_put` that never aliases ``host``.

    XLA's CPU client aliases an aligned numpy buffer whatever ``may_alias`` says, so CPU targets get a
    private copy first (only when the staged path is forced onto CPU devices, as the tests do).

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import SingleDeviceSharding
        >>> host = np.arange(4, dtype=np.float32)
        >>> (array,) = device_put(host, [SingleDeviceSharding(jax.devices()[0])])
        >>> array.block_until_ready().tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    if any(is_cpu_only(sharding) for sharding in shardings):
        host = host.copy()
    return list(jax.device_put([host] * len(shardings), list(shardings), may_alias=False))


@dataclass(frozen=True)
class _Piece:
    """Rows [first, last) of one block of a request (all of it when the block has no rows)."""

    request: int
    block: BlockRead
    first: int
    last: int
    nbytes: int

    @property
    def key(self) -> BlockKey:
        if not self.block.key:
            return self.block.key
        (start, _), rest = self.block.key[0], self.block.key[1:]
        return ((start + self.first, start + self.last), *rest)


def _pieces(request: int, blocks: Sequence[BlockRead], buffer_bytes: int) -> list[_Piece]:
    """Each block whole when it fits a buffer, else in runs of whole rows that do (pure)."""
    out: list[_Piece] = []
    for block in blocks:
        rows = block.shape[0] if block.shape else 0
        row_bytes = block.nbytes // rows if rows else block.nbytes
        if block.nbytes <= buffer_bytes or rows <= 1 or row_bytes > buffer_bytes:
            out.append(_Piece(request, block, 0, rows, block.nbytes))
            continue
        step = buffer_bytes // row_bytes
        for first in range(0, rows, step):
            last = min(rows, first + step)
            out.append(_Piece(request, block, first, last, (last - first) * row_bytes))
    return out


def _stageable(info: TensorInfo, dtype: DType) -> bool:
    if info.encoding is not None:
        return dtype is DType.uint8 or dtype in _DEQUANTIZED
    return (
        not info.dtype.is_packed
        and info.contiguous
        and not info.swapped
        and not _narrows_integers(info.dtype, dtype)
    )


def load_staged(
    checkpoint: Checkpoint,
    requests: Sequence[Request],
    *,
    max_inflight_bytes: int,
    put: Put | None = None,
    pool: StagingPool | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[jax.Array]:
    """Places every request (shardings already checked) through staging buffers; arrays in order.

    ``pool`` defaults to one sized to the budget (no larger than the data), page-locked for accelerator
    targets, and closed on return; ``put`` defaults to a copying `jax.device_put`; ``on_done(i)`` is
    called, in order, once request ``i`` is placed. The first failure stops the load (nothing new is read,
    every started transfer is waited for, every buffer is returned) and is re-raised; a failing transfer
    becomes a `DeviceError` naming the tensor.

    Example:
        >>> import tempfile, numpy as np, jax, jaxweights as jw
        >>> from jax.sharding import SingleDeviceSharding
        >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> with jw.open_checkpoint(path) as checkpoint:
        ...     info = checkpoint["w"]
        ...     (array,) = load_staged(checkpoint, [(info, info.dtype, SingleDeviceSharding(jax.devices()[0]))],
        ...                            max_inflight_bytes=1 << 20)
        >>> array.tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    reads = [blocks_of(info) if info.encoding is not None else info for info, _, _ in requests]
    staged = [_stageable(info, dtype) for info, dtype, _ in requests]
    owned = pool is None
    if pool is None:
        total = sum(info.nbytes for info, ok in zip(reads, staged, strict=True) if ok)
        accelerator = any(
            getattr(d, "platform", "cpu") != "cpu" for _, _, s in requests for d in s.addressable_devices
        )
        pool = StagingPool(max(1, min(max_inflight_bytes, total)), pin=accelerator)
    try:
        return _Load(checkpoint, requests, reads, staged, pool, put or device_put, on_done).run()
    finally:
        if owned:
            pool.close()


class _Load:
    """One `load_staged` call: the main thread leases buffers and assembles arrays; readers fill and put."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        requests: Sequence[Request],
        reads: list[TensorInfo],
        staged: list[bool],
        pool: StagingPool,
        put: Put,
        on_done: Callable[[int], None] | None,
    ) -> None:
        self.checkpoint, self.requests, self.reads, self.staged = checkpoint, requests, reads, staged
        self.pool, self.put, self.on_done = pool, put, on_done
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def run(self) -> list[jax.Array]:
        results: list[jax.Array | None] = [None] * len(self.requests)
        pending: deque[tuple[int, list[tuple[_Piece, Future[dict[Hashable, jax.Array] | None]]]]] = deque()
        workers = max(1, min(self.pool.count, 16))
        with ThreadPoolExecutor(workers, thread_name_prefix="jaxweights-stage") as readers:
            try:
                for index, (info, dtype, sharding) in enumerate(self.requests):
                    if not self.staged[index]:
                        self._drain(pending, results, wait=True)
                        results[index] = place(self.checkpoint, info, dtype, sharding, checked=True)
                        results[index].block_until_ready()  # type: ignore[union-attr]
                        self._done(index)
                        continue
                    plan = plan_for(self.reads[index], sharding)
                    futures = []
                    for piece in _pieces(index, plan.blocks, self.pool.buffer_bytes):
                        buffer = self.pool.acquire(piece.nbytes)
                        if self.failed.is_set():
                            self.pool.release(buffer)
                            break
                        futures.append((piece, readers.submit(self._stage, piece, buffer)))
                    pending.append((index, futures))
                    if self.failed.is_set():
                        break
                    self._drain(pending, results, wait=False)
                self._drain(pending, results, wait=True)
            except BaseException as error:
                self._fail(error)
        if self.errors:
            raise self.errors[0]
        return [array for array in results if array is not None]

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)
        self.failed.set()

    def _done(self, index: int) -> None:
        if self.on_done is not None:
            self.on_done(index)

    def _drain(self, pending: deque[Any], results: list[jax.Array | None], *, wait: bool) -> None:
        """Assembles finished requests at the front of ``pending`` (all of them when ``wait``)."""
        while pending and (wait or all(future.done() for _, future in pending[0][1])):
            index, futures = pending.popleft()
            parts = [(piece, future.result()) for piece, future in futures]
            if self.failed.is_set():
                continue
            results[index] = self._assemble(index, parts)
            self._done(index)

    def _stage(self, piece: _Piece, buffer: np.ndarray) -> dict[Hashable, jax.Array] | None:
        """Reader thread: fill the buffer, put it to the block's devices, wait, return the buffer."""
        try:
            if self.failed.is_set():
                return None
            info = self.reads[piece.request]
            sharding = self.requests[piece.request][2]
            shape = (piece.last - piece.first, *piece.block.shape[1:]) if piece.block.shape else ()
            host = buffer[: piece.nbytes].view(info.dtype.to_numpy()).reshape(shape)
            self._read(info, piece, buffer, host)
            devices = list(piece.block.devices)
            targets: list[Sharding] = (
                [sharding]
                if isinstance(sharding, SingleDeviceSharding)
                else [SingleDeviceSharding(device) for device in devices]  # type: ignore[arg-type]
            )
            try:
                started = self.put(host, targets)
                arrays = [array.block_until_ready() for array in started]
            except WeightsError:
                raise
            except Exception as error:
                raise DeviceError(
                    f"Copying tensor {info.name!r} ({info.file}) to {devices} failed: {error}. Check the "
                    f"device's free memory, or lower max_inflight_bytes.",
                    file=info.file,
                    tensor=info.name,
                ) from error
            return dict(zip(devices, arrays, strict=True))
        except BaseException as error:
            self._fail(error)
            return None
        finally:
            self.pool.release(buffer)

    def _read(self, info: TensorInfo, piece: _Piece, buffer: np.ndarray, host: np.ndarray) -> None:
        if piece.block.num_runs <= 1:  # one contiguous run: parallel preadv into the buffer
            row_bytes = piece.nbytes // max(1, piece.last - piece.first)
            offset = piece.block.offset + piece.first * row_bytes
            _run_parallel(_run_tasks_for(self.checkpoint, info, buffer, 0, offset, piece.nbytes))
        else:  # strided (a column shard): gathered from the file, its pages kept for the other blocks
            self.checkpoint.copy_block(info, host, piece.key, release=False)

    def _assemble(
        self, index: int, parts: list[tuple[_Piece, dict[Hashable, jax.Array] | None]]
    ) -> jax.Array:
        info, dtype, sharding = self.requests[index]
        read = self.reads[index]
        by_device: dict[Hashable, list[jax.Array]] = {}
        for _, arrays in parts:
            assert arrays is not None  # a failed piece sets `failed`, checked before assembling
            for device, part in arrays.items():
                by_device.setdefault(device, []).append(part)
        joined = {
            device: rows[0] if len(rows) == 1 else _concatenate(rows) for device, rows in by_device.items()
        }
        if len(joined) == 1 and isinstance(sharding, SingleDeviceSharding):
            array = next(iter(joined.values()))
        else:
            array = jax.make_array_from_single_device_arrays(read.shape, sharding, list(joined.values()))
        if info.encoding is not None:
            if dtype is DType.uint8:
                return array
            expand: jax.Array = _dequantizer(info.encoding, info.shape, dtype, sharding)(array)
            return expand
        if array.dtype != dtype.to_numpy():
            converted: jax.Array = _converter(dtype.value)(array)
            return converted
        return array


@jax.jit
def _concatenate(rows: list[jax.Array]) -> jax.Array:
    return jnp.concatenate(rows, axis=0)
