"""The one job planner of bulk loads: `Weights.allocate_all`, `Weights.to_pytree` and `restore` (and every
later bulk reader) decide here what each tensor becomes, with the same checks in the same order.

1. In a multi-process job every process first agrees on the checkpoint (a digest over the key-value
   store), so a process that fails a later check cannot leave the others waiting.
2. Every sharding is resolved and checked and every dtype decided by the one dtype rule (`dtype_for`);
   all sharding problems are reported in one error. Nothing has been read yet.
3. The jobs run under the byte budget (`_loader.load_all`), and the arrays are handed to ``record``
   (the accessor's ``allocated_weights``).

It never parses bytes and never looks at pytrees: callers hand it `TensorInfo`s and placements, and
`Composite`s (stacked layers, concatenations, parts of tensors) under their synthetic infos' names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._devices import DeviceRef, Placement, to_sharding
from ._dtypes import DType, DTypeLike
from ._loader import DEFAULT_BUDGET, Job, load_all
from ._multihost import catalogue_digest, check_same_checkpoint
from ._placement import canonical_dtype, resolve_dtype
from ._progress import Progress
from ._rules import Rules, resolve_shardings
from .formats import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from ._compose import Composite

__all__ = ["DTypeRequest", "Record", "dtype_for", "load", "plan_jobs"]

DTypeRequest = DTypeLike | Mapping[str, DTypeLike] | None
"""One dtype for a whole subtree, a dtype per tensor name (a restore target's), or None (stored)."""

Record = Callable[[Mapping[str, jax.Array]], None]
"""Receives every array a bulk load placed, by full name."""


def dtype_for(info: TensorInfo, requested: DTypeRequest) -> DType:
    """The dtype rule of every bulk load.

    - ``None``: the stored dtype, as JAX holds it (64-bit types become 32-bit when ``jax_enable_x64`` is
      off; integers are range-checked when they are read, never silently wrapped).
    - one dtype for a subtree (``allocate_all(dtype=...)``, ``to_pytree(dtype=...)``): converts the
      floating-point tensors only; integer and bool tensors keep their stored type. Quantized tensors
      count as floating-point: a float dtype dequantizes them on the device; without one they stay
      uint8 blocks. Asking for a 64-bit type with x64 off is a `DTypeError`.
    - a dtype per name (a restore target's leaves): used as given, as JAX can hold it (a float dtype
      dequantizes a quantized tensor).

    Example:
        >>> from pathlib import Path
        >>> from jaxweights import DType, TensorInfo
        >>> weight = TensorInfo("w", DType.float32, (2,), Path("m.safetensors"), 0, 8)
        >>> ids = TensorInfo("ids", DType.int32, (2,), Path("m.safetensors"), 8, 16)
        >>> dtype_for(weight, "bfloat16"), dtype_for(ids, "bfloat16"), dtype_for(ids, {"ids": "int8"})
        (<DType.bfloat16>, <DType.int32>, <DType.int8>)
    """
    if isinstance(requested, Mapping):
        wanted = requested.get(info.name)
        return canonical_dtype(DType.from_any(wanted)) if wanted is not None else canonical_dtype(info.dtype)
    if requested is None:
        return canonical_dtype(info.dtype)
    wanted = DType.from_any(requested)
    if info.encoding is not None:
        return resolve_dtype(info, wanted) if wanted.is_float() else canonical_dtype(info.dtype)
    if not info.dtype.is_float():
        return canonical_dtype(info.dtype)
    return resolve_dtype(info, wanted)


def plan_jobs(
    infos: Sequence[TensorInfo],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
    dtype: DTypeRequest = None,
    strict: bool = False,
    first_match: bool = False,
) -> list[Job]:
    """How each tensor is to be placed, every check done and nothing read.

    Tensors no rule matches are replicated over ``mesh``, or placed on ``device`` when there is no mesh.

    Raises:
        ShardingError: one error listing every tensor that cannot be sharded as asked.
        DTypeError: the dtype cannot be produced (a 64-bit type with x64 off, an unknown name).
    """
    default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else to_sharding(device)
    shardings = resolve_shardings(
        infos, mesh=mesh, rules=rules, default=default, strict=strict, first_match=first_match
    )
    return [Job(info, dtype_for(info, dtype), shardings[info.name]) for info in infos]


def load(
    checkpoint: Checkpoint,
    infos: Sequence[TensorInfo],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    device: Placement = DeviceRef.CPU(),  # noqa: B008 - immutable default
    dtype: DTypeRequest = None,
    strict: bool = False,
    first_match: bool = False,
    record: Record | None = None,
    progress: bool | None = None,
    max_inflight_bytes: int = DEFAULT_BUDGET,
    composites: Mapping[str, Composite] | None = None,
) -> dict[str, jax.Array]:
    """Places ``infos`` (see `plan_jobs` for the placement options); returns ``{full name: array}`` in
    the order given, after handing the checkpoint's own tensors to ``record``.

    An info whose name is a key of ``composites`` is that composite's synthetic info: it is planned like
    a tensor (rules match its name, the dtype rule applies) and placed by `place_composite`, one after
    another once the plain tensors are placed, each device reading only its blocks' parts of the sources.

    Raises:
        CheckpointError: another process of the job loads a different checkpoint.
        ShardingError, DTypeError: from `plan_jobs`, before any byte is read.
    """
    composites = composites or {}
    if jax.process_count() > 1:  # the digest walks every tensor: only when there are others to agree with
        sources = [source for composite in composites.values() for source in composite.sources]
        check_same_checkpoint(catalogue_digest([i for i in infos if i.name not in composites] + sources))
    jobs = plan_jobs(
        infos, mesh=mesh, rules=rules, device=device, dtype=dtype, strict=strict, first_match=first_match
    )
    if not composites:
        arrays = load_all(checkpoint, jobs, max_inflight_bytes=max_inflight_bytes, progress=progress)
        if record is not None:
            record(arrays)
        return arrays
    from ._compose import place_composite

    plain = [job for job in jobs if job.info.name not in composites]
    stacked = [job for job in jobs if job.info.name in composites]
    bar = Progress(sum(job.nbytes for job in jobs), len(jobs), enabled=progress)
    try:
        placed = load_all(checkpoint, plain, max_inflight_bytes=max_inflight_bytes, progress=bar)
        if record is not None:
            record(placed)
        for job in stacked:
            composite = composites[job.info.name]
            array = place_composite(
                checkpoint,
                composite,
                job.dtype,
                job.sharding,
                checked=True,
                max_host_bytes=max_inflight_bytes,
            )
            placed[job.info.name] = array.block_until_ready()
            bar.advance(job.nbytes)
    finally:
        bar.close()
    return {job.info.name: placed[job.info.name] for job in jobs}
