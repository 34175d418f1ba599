"""Bulk loads: many tensors placed in parallel by a small thread pool, under a byte budget.

The budget bounds the bytes being read at any moment (host staging memory, on accelerators); a tensor
larger than the budget runs alone. Each tensor is placed by `_placement.place`, whose copies run on their
own pool, so the two pools never wait on each other. When every target is a CPU device, tensors are placed
one after another: the copies already use every core, and the per-tensor work left is bound by the GIL,
where more threads only add contention (docs/performance.md has the measurements). For accelerators,
`_transfer.load_staged` reads into reusable (page-locked where possible) staging buffers totalling the
budget and overlaps those reads with the host-to-device copies.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
from jax.sharding import Sharding, SingleDeviceSharding

from ._devices import is_cpu_only, usable_cores
from ._dtypes import DType
from ._placement import blocks_of, place, place_many, plan_for
from ._progress import Progress
from ._transfer import load_staged
from .formats import Checkpoint, TensorInfo

__all__ = ["DEFAULT_BUDGET", "Job", "load_all", "planned_bytes"]

DEFAULT_BUDGET = 1 << 30
"""Bytes in flight at once by default."""


_CHUNK = 256 << 20
"""Most bytes of file pages a CPU bulk load keeps mapped while XLA copies them (one `place_many` chunk)."""


def _accelerator_workers() -> int:
    return min(8, max(2, usable_cores()))


@dataclass(frozen=True)
class Job:
    """One tensor to place: what, as which dtype, laid out how."""

    info: TensorInfo
    dtype: DType
    sharding: Sharding

    @property
    def nbytes(self) -> int:
        """Bytes this process reads for the job."""
        return planned_bytes(self.info, self.sharding)


def planned_bytes(info: TensorInfo, sharding: Sharding) -> int:
    """Bytes this process will read for ``info`` under ``sharding`` (zero-copy views included)."""
    if info.encoding is not None:
        return plan_for(blocks_of(info), sharding).nbytes
    if info.dtype.is_packed:
        return info.nbytes
    if info.strides is None and type(sharding) is SingleDeviceSharding:  # the common case, quickly
        return info.nbytes
    if not info.contiguous:  # gathered whole on the host
        return info.size * info.dtype.size_in_bytes
    return plan_for(info, sharding).nbytes


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._ready = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._ready:
            self._ready.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._ready:
            self.used -= nbytes
            self._ready.notify_all()


def load_all(
    checkpoint: Checkpoint,
    jobs: Sequence[Job],
    *,
    max_inflight_bytes: int = DEFAULT_BUDGET,
    progress: Progress | bool | None = None,
    workers: int | None = None,
    staged: bool | None = None,
) -> dict[str, jax.Array]:
    """Places every job; returns ``{name: array}`` in job order. The first failure cancels the rest and
    is re-raised. ``staged`` sends the jobs through staging buffers (`_transfer.load_staged`); None
    does so when some target is not a CPU device. Otherwise ``workers`` defaults to 1 when every target
    is a CPU device, else one per usable core (2 to 8). ``progress`` is a
    `Progress` to advance, or whether to draw one (None: for large loads on a terminal)."""
    if not isinstance(progress, Progress):
        total = sum(job.nbytes for job in jobs)
        bar = Progress(total, len(jobs), enabled=progress)
        try:
            return load_all(
                checkpoint,
                jobs,
                max_inflight_bytes=max_inflight_bytes,
                progress=bar,
                workers=workers,
                staged=staged,
            )
        finally:
            bar.close()
    cpu_only = all(is_cpu_only(job.sharding) for job in jobs)
    if staged or (staged is None and not cpu_only):
        arrays = load_staged(
            checkpoint,
            [(job.info, job.dtype, job.sharding) for job in jobs],
            max_inflight_bytes=max(1, max_inflight_bytes),
            on_done=lambda i: progress.advance(jobs[i].nbytes),
        )
        return {job.info.name: array for job, array in zip(jobs, arrays, strict=True)}
    budget = _Budget(max(1, max_inflight_bytes))
    failed = threading.Event()

    def run(job: Job) -> jax.Array:
        nbytes = planned_bytes(job.info, job.sharding)
        budget.acquire(nbytes)
        try:
            if failed.is_set():
                raise _CancelledError
            array = place(checkpoint, job.info, job.dtype, job.sharding, checked=True)
            array.block_until_ready()
        except BaseException:
            failed.set()
            raise
        finally:
            budget.release(nbytes)
        if progress is not None:
            progress.advance(nbytes)
        return array

    results: dict[str, jax.Array] = {}
    if workers is None:
        workers = 1 if cpu_only else _accelerator_workers()
    if workers <= 1:  # CPU targets: placed in chunks whose copies XLA overlaps (see place_many)
        requests = [(job.info, job.dtype, job.sharding) for job in jobs]
        arrays = place_many(checkpoint, requests, chunk_bytes=min(max_inflight_bytes, _CHUNK))
        for job, array in zip(jobs, arrays, strict=True):  # each is ready (see place_many)
            results[job.info.name] = array
            if progress is not None:
                progress.advance(job.nbytes)
        return results
    with ThreadPoolExecutor(min(workers, max(1, len(jobs))), thread_name_prefix="jaxweights-load") as pool:
        futures: list[tuple[str, Future[jax.Array]]] = [
            (job.info.name, pool.submit(run, job)) for job in jobs
        ]
        first_error: BaseException | None = None
        for name, future in futures:
            try:
                results[name] = future.result()
            except _CancelledError:
                continue
            except BaseException as error:
                if first_error is None:
                    first_error = error
        if first_error is not None:
            raise first_error
    return results


class _CancelledError(Exception):
    """A job skipped because an earlier one failed."""
