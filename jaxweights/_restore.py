"""Restore a checkpoint into a target pytree: plain pytrees of arrays or `ShapeDtypeStruct`s, Flax NNX
states and modules, Equinox modules, optax states.

Every difference between target and checkpoint is found before any tensor is read and reported in one
error: missing and unexpected names (with close matches), shape and dtype mismatches, non-array leaves
with no saved value. The target is never modified; a new tree (or module) is returned.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ._devices import Placement, to_sharding
from ._dtypes import DType
from ._keymap import KeyMap, Transform, Transpose, transformed_shape
from ._loader import DEFAULT_BUDGET, Job, load_all
from ._multihost import catalogue_digest, check_same_checkpoint
from ._placement import check_sharding
from ._pytree import LEAVES_KEY, SCALAR_TYPES, Leaf, flatten_target, is_array_like, split_module
from .errors import StructureMismatchError
from .formats import Checkpoint, TensorInfo

__all__ = ["restore"]



@dataclass
class _Tensor:
    leaf: Leaf
    info: TensorInfo
    sharding: Sharding
    dtype: DType
    transform: Transform | None


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
    progress: bool | None = None,
    max_inflight_bytes: int = DEFAULT_BUDGET,
) -> tuple[Any, dict[str, jax.Array]]:
    """See `Weights.restore`. Returns the new tree and ``{full name: array}`` of what was read."""
    keymap = keymap or KeyMap()
    module = split_module(target)
    tree = module[0] if module is not None else target
    leaves, treedef = flatten_target(tree)
    default = to_sharding(device)
    saved = _saved_leaves(checkpoint)
    lead = f"{prefix}." if prefix else ""
    available = [name for name in checkpoint if not prefix or name.startswith(lead)]

    tensors: list[_Tensor] = []
    values: dict[int, Any] = {}
    missing: list[tuple[str, str]] = []  # (what to show, the checkpoint name looked for)
    mismatched: list[str] = []
    claimed: set[str] = set()
    for position, leaf in enumerate(leaves):
        value = leaf.value
        if is_array_like(value):
            name = lead + keymap.checkpoint_name(leaf.name)
            info = checkpoint.get(name)
            if info is None and leaf.name in saved and np.shape(value) == ():
                # a scalar saved as metadata, asked for as a 0-d array (jax.eval_shape makes those)
                target_dtype = np.dtype(value.dtype)
                host = np.asarray(saved[leaf.name], dtype=target_dtype)
                values[position] = jax.device_put(host, _target_sharding(value, default))
                continue
            if info is None:
                shown = leaf.name if name == leaf.name else f"{leaf.name} (looked for {name!r})"
                missing.append((shown, name))
                continue
            claimed.add(name)
            transform = keymap.transform_for(leaf.name)
            stored_np = info.dtype.to_numpy()
            shape, dtype = (
                transformed_shape(transform, info.shape, stored_np) if transform else (info.shape, stored_np)
            )
            want_shape, want_dtype = tuple(np.shape(value)), DType.from_any(np.dtype(value.dtype))
            if shape != want_shape:
                after = " after its transform" if transform else ""
                mismatched.append(
                    f"{leaf.name}: target shape {want_shape}, checkpoint {name!r} has {shape}{after}"
                )
                continue
            if DType.from_any(np.dtype(dtype)) is not want_dtype and not cast:
                mismatched.append(
                    f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {name!r} has "
                    f"{DType.from_any(np.dtype(dtype)).name} (pass cast=True to convert)"
                )
                continue
            tensors.append(_Tensor(leaf, info, _target_sharding(value, default), want_dtype, transform))
            values[position] = None  # filled after loading
        elif isinstance(value, SCALAR_TYPES):
            if leaf.name in saved:
                values[position] = type(value)(saved[leaf.name]) if saved[leaf.name] is not None else None
            elif strict:
                missing.append(
                    (
                        f"{leaf.name} ({_article(type(value).__name__)} leaf; the checkpoint saved no value)",
                        "",
                    )
                )
        # anything else (functions, static objects) is not state: kept as it is
    unexpected = [name for name in available if name not in claimed] if strict else []
    problems = len(missing) + len(mismatched) + len(unexpected)
    if problems:
        hints = []
        pool = [name for name in available if name not in claimed]
        for shown, looked in missing:
            close = difflib.get_close_matches(looked, pool, n=1, cutoff=0.6) if looked else []
            hints.append(f"{shown}; closest in the checkpoint: {close[0]!r}" if close else shown)
        files = ", ".join(str(f) for f in checkpoint.files[:2]) + (
            " ..." if len(checkpoint.files) > 2 else ""
        )
        report = f"The target and the checkpoint ({files}) disagree in {problems} place(s):\n"
        if hints:
            report += _listing("missing from the checkpoint", hints)
        if unexpected:
            report += _listing("in the checkpoint but not in the target", unexpected)
        if mismatched:
            report += _listing("mismatched", mismatched)
        report += (
            "Fix: map names with keymap=KeyMap(renames=...) (jaxweights.TORCH_TO_FLAX for PyTorch layouts), "
            "restore a subtree (weights.<prefix>.restore), or pass strict=False to ignore extra tensors."
        )
        raise StructureMismatchError(report, file=checkpoint.files[0] if checkpoint.files else None)

    check_same_checkpoint(catalogue_digest(t.info for t in tensors))
    jobs = []
    for tensor in tensors:
        load_sharding = tensor.sharding
        if isinstance(tensor.transform, Transpose):
            load_sharding = tensor.transform.source_sharding(tensor.sharding, len(tensor.info.shape))
        elif tensor.transform is not None:
            load_sharding = _replicated_over(tensor.sharding)
        check_sharding(tensor.info, load_sharding)
        jobs.append(Job(tensor.info, tensor.dtype, load_sharding))
    arrays = load_all(checkpoint, jobs, max_inflight_bytes=max_inflight_bytes, progress=progress)
    positions = {id(leaf): position for position, leaf in enumerate(leaves)}
    for tensor in tensors:
        array = arrays[tensor.info.name]
        if tensor.transform is not None:
            array = jax.jit(tensor.transform, out_shardings=tensor.sharding)(array)
        values[positions[id(tensor.leaf)]] = array
    new_leaves = [
        leaf.rebuild(values[position]) if position in values else _original(leaf)
        for position, leaf in enumerate(leaves)
    ]
    new_tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    result = module[1](new_tree) if module is not None else new_tree
    return result, arrays


def _article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _original(leaf: Leaf) -> Any:
    return leaf.rebuild(leaf.value)


def _replicated_over(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding
