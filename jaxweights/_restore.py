"""Restore a checkpoint into a target pytree: plain pytrees of arrays or `ShapeDtypeStruct`s, Flax NNX
states and modules, Equinox modules, optax states.

Three steps: match (pair every target leaf with a checkpoint tensor or saved scalar, reading nothing),
report (every missing and unexpected name, with close matches, every shape and dtype mismatch, every
non-array leaf with no saved value, in one error), load (through the bulk planner of `_bulk`, like
``allocate_all``). The target is never modified; a new tree (or module) is returned.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ._bulk import Record
from ._bulk import load as bulk_load
from ._devices import Placement, to_sharding
from ._dtypes import DType
from ._keymap import KeyMap, Transform, Transpose, bind_transform, transformed_shape
from ._loader import DEFAULT_BUDGET
from ._names import is_under
from ._placement import canonical_dtype
from ._pytree import LEAVES_KEY, SCALAR_TYPES, Leaf, flatten_target, is_array_like, split_module
from .errors import StructureMismatchError, WeightsError
from .formats import Checkpoint, TensorInfo

__all__ = ["restore"]


@dataclass(frozen=True)
class _Tensor:
    """A target leaf a checkpoint tensor fills, and how."""

    position: int
    info: TensorInfo
    sharding: Sharding  # the target's
    dtype: DType
    transform: Transform | None

    @property
    def load_sharding(self) -> Sharding:
        """The sharding to read with, so that the transform (if any) yields ``sharding``."""
        if isinstance(self.transform, Transpose):
            return self.transform.source_sharding(self.sharding, len(self.info.shape))
        if self.transform is not None:
            return _replicated_over(self.sharding)
        return self.sharding


@dataclass
class _Match:
    """What matching a target against a checkpoint found, before anything is read."""

    tensors: list[_Tensor] = field(default_factory=list)
    values: dict[int, Any] = field(default_factory=dict)  # position -> value known without reading
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what to show, name looked for)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)  # unclaimed checkpoint names, for close matches


def _saved_leaves(checkpoint: Checkpoint) -> dict[str, Any]:
    raw = checkpoint.metadata.get(LEAVES_KEY)
    if not isinstance(raw, str):
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _target_sharding(value: Any, default: Sharding) -> Sharding:
    sharding = getattr(value, "sharding", None)
    return sharding if isinstance(sharding, Sharding) else default


def _listing(title: str, lines: list[str], limit: int = 50) -> str:
    lines = sorted(lines)
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return f"  {title} ({len(lines)}):\n" + "".join(f"    {line}\n" for line in shown)


def restore(
    checkpoint: Checkpoint,
    prefix: str,
    target: Any,
    *,
    keymap: KeyMap | None = None,
    strict: bool = True,
    cast: bool = False,
    device: Placement,
    record: Record | None = None,
    progress: bool | None = None,
    max_inflight_bytes: int = DEFAULT_BUDGET,
) -> Any:
    """See `Weights.restore`: match the target against the checkpoint, report every difference at once,
    then load through the bulk planner and rebuild the target's structure with the new values."""
    module = split_module(target)
    leaves, treedef = flatten_target(module[0] if module is not None else target)
    match = _match(checkpoint, prefix, leaves, keymap or KeyMap(), strict=strict, cast=cast, device=device)
    _report(checkpoint, match)
    values = dict(match.values)
    values.update(
        _load(
            checkpoint, match.tensors, record=record, progress=progress, max_inflight_bytes=max_inflight_bytes
        )
    )
    new_leaves = [
        leaf.rebuild(values[position]) if position in values else leaf.rebuild(leaf.value)
        for position, leaf in enumerate(leaves)
    ]
    new_tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return module[1](new_tree) if module is not None else new_tree


def _match(
    checkpoint: Checkpoint,
    prefix: str,
    leaves: list[Leaf],
    keymap: KeyMap,
    *,
    strict: bool,
    cast: bool,
    device: Placement,
) -> _Match:
    """Pairs every target leaf with its checkpoint tensor (or saved scalar); reads nothing."""
    default = to_sharding(device)
    saved = _saved_leaves(checkpoint)
    lead = f"{prefix}." if prefix else ""
    match = _Match()
    claimed: set[str] = set()
    for position, leaf in enumerate(leaves):
        value = leaf.value
        if is_array_like(value):
            name = lead + keymap.checkpoint_name(leaf.name)
            info = checkpoint.get(name)
            if info is None and leaf.name in saved and np.shape(value) == ():
                # a scalar saved as metadata, asked for as a 0-d array (jax.eval_shape makes those)
                host = np.asarray(saved[leaf.name], dtype=np.dtype(value.dtype))
                match.values[position] = jax.device_put(host, _target_sharding(value, default))
                continue
            if info is None:
                shown = leaf.name if name == leaf.name else f"{leaf.name} (looked for {name!r})"
                match.missing.append((shown, name))
                continue
            claimed.add(name)
            problem, tensor = _pair(
                position, leaf, info, keymap, checkpoint.metadata, cast=cast, default=default
            )
            if problem:
                match.mismatched.append(problem)
            elif tensor is not None:
                match.tensors.append(tensor)
        elif isinstance(value, SCALAR_TYPES):
            if leaf.name in saved:
                stored = saved[leaf.name]
                match.values[position] = type(value)(stored) if stored is not None else None
            elif strict:
                kind = _article(type(value).__name__)
                match.missing.append((f"{leaf.name} ({kind} leaf; the checkpoint saved no value)", ""))
        # anything else (functions, static objects) is not state: kept as it is
    available = [name for name in checkpoint if is_under(name, prefix) or (not prefix and name == "")]
    match.pool = [name for name in available if name not in claimed]
    match.unexpected = match.pool if strict else []
    return match


def _pair(
    position: int,
    leaf: Leaf,
    info: TensorInfo,
    keymap: KeyMap,
    metadata: Mapping[str, Any],
    *,
    cast: bool,
    default: Sharding,
) -> tuple[str | None, _Tensor | None]:
    """A leaf and its tensor: the mismatch to report, or how to load it.

    A quantized tensor is matched by its logical shape and counts as the target's float dtype: placing it
    with that dtype dequantizes it."""
    want_shape, want_dtype = tuple(np.shape(leaf.value)), DType.from_any(np.dtype(leaf.value.dtype))
    if info.encoding is not None and not want_dtype.is_float():
        return (
            f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {info.name!r} is "
            f"{info.encoding.name}-quantized and dequantizes to floats only (use a float target)"
        ), None
    stored = want_dtype.to_numpy() if info.encoding is not None else info.dtype.to_numpy()
    transform = keymap.transform_for(leaf.name)
    try:
        if transform is not None:
            transform = bind_transform(transform, metadata)
        shape, dtype = transformed_shape(transform, info.shape, stored) if transform else (info.shape, stored)
    except WeightsError as error:  # a transform that cannot apply to this tensor
        return f"{leaf.name}: {error}", None
    if shape != want_shape:
        after = " after its transform" if transform else ""
        return f"{leaf.name}: target shape {want_shape}, checkpoint {info.name!r} has {shape}{after}", None
    found = canonical_dtype(DType.from_any(np.dtype(dtype)))  # int64 is int32 to JAX with x64 off
    if found is not want_dtype and not cast:
        return (
            f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {info.name!r} has {found.name} "
            f"(pass cast=True to convert)"
        ), None
    return None, _Tensor(position, info, _target_sharding(leaf.value, default), want_dtype, transform)


def _report(checkpoint: Checkpoint, match: _Match) -> None:
    """Raises one `StructureMismatchError` listing every difference, sorted, with close matches."""
    problems = len(match.missing) + len(match.mismatched) + len(match.unexpected)
    if not problems:
        return
    hints = []
    for shown, looked in match.missing:
        close = difflib.get_close_matches(looked, match.pool, n=1, cutoff=0.6) if looked else []
        hints.append(f"{shown}; closest in the checkpoint: {close[0]!r}" if close else shown)
    files = ", ".join(str(f) for f in checkpoint.files[:2]) + (" ..." if len(checkpoint.files) > 2 else "")
    report = f"The target and the checkpoint ({files}) disagree in {problems} place(s):\n"
    if hints:
        report += _listing("missing from the checkpoint", hints)
    if match.unexpected:
        report += _listing("in the checkpoint but not in the target", match.unexpected)
    if match.mismatched:
        report += _listing("mismatched", match.mismatched)
    report += (
        "Fix: map names with keymap=KeyMap(renames=...) (jaxweights.TORCH_TO_FLAX for PyTorch layouts), "
        "restore a subtree (weights.<prefix>.restore), or pass strict=False to ignore extra tensors."
    )
    raise StructureMismatchError(report, file=checkpoint.files[0] if checkpoint.files else None)


def _load(
    checkpoint: Checkpoint,
    tensors: list[_Tensor],
    *,
    record: Record | None,
    progress: bool | None,
    max_inflight_bytes: int,
) -> dict[int, Any]:
    """Reads the matched tensors through the bulk planner; returns target position -> value."""
    shardings = {tensor.info.name: tensor.load_sharding for tensor in tensors}
    arrays = bulk_load(
        checkpoint,
        [tensor.info for tensor in tensors],
        rules=lambda name, _: shardings[name],
        dtype={tensor.info.name: tensor.dtype for tensor in tensors},
        record=record,
        progress=progress,
        max_inflight_bytes=max_inflight_bytes,
    )
    values: dict[int, Any] = {}
    for tensor in tensors:
        array = arrays[tensor.info.name]
        if tensor.transform is not None:
            array = jax.jit(tensor.transform, out_shardings=tensor.sharding)(array)
        values[tensor.position] = array
    return values


def _article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _replicated_over(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding
