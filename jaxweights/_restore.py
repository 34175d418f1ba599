"""Restore a checkpoint into a target pytree: plain pytrees of arrays or `ShapeDtypeStruct`s, Flax NNX
states and modules, Equinox modules, optax states.

Four steps: match (pair every target leaf with a checkpoint tensor or saved scalar, reading nothing),
check (every missing and unexpected name, with close matches, every shape and dtype mismatch, every
non-array leaf with no saved value, in one error), load (through the bulk planner of `_bulk`, like
``allocate_all``), report (a `RestoreReport` of what was kept, left unused and converted, logged to the
``jaxweights`` logger and returned on request). The target is never modified; a new tree (or module) is
returned. Nothing here ever fills a leaf by position or leaves one out silently.
"""

from __future__ import annotations

import difflib
import json
import logging
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

__all__ = ["RestoreReport", "restore"]

_logger = logging.getLogger("jaxweights")


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did besides copying tensors one to one, like the loading info of Hugging Face's
    ``from_pretrained``. Names are sorted.

    Attributes:
        missing: target leaves the checkpoint has no value for, kept as the target held them
            (``strict=False``; concrete arrays and scalars only).
        unused: checkpoint names (full, with the accessor's prefix) that no target leaf read
            (``strict=False``).
        converted: target leaf -> what was applied on the way: a dtype cast (``"float32 -> bfloat16"``),
            a keymap transform (``"transformed by Transpose(axes=None)"``), a dequantization.
        mismatched: target leaves whose checkpoint tensor has another shape, kept as the target held them
            (``ignore_mismatched_sizes=True``).

    Example:
        >>> report = RestoreReport(missing=("head.kernel",), unused=("lm_head.bias",))
        >>> report.missing, report.unused, dict(report.converted), report.mismatched
        (('head.kernel',), ('lm_head.bias',), {}, ())
    """

    __module__ = "jaxweights"

    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    converted: Mapping[str, str] = field(default_factory=dict)
    mismatched: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Tensor:
    """A target leaf a checkpoint tensor fills, and how."""

    position: int
    name: str  # the target leaf's
    info: TensorInfo
    sharding: Sharding  # the target's
    dtype: DType
    transform: Transform | None
    conversion: str | None  # what the report says was applied, if anything

    @property
    def load_sharding(self) -> Sharding:
        """The sharding to read with, so that the transform (if any) yields ``sharding``."""
        if isinstance(self.transform, Transpose):
            return self.transform.source_sharding(self.sharding, len(self.info.shape))
        if self.transform is not None:
            return _replicated_over(self.sharding)
        return self.sharding


@dataclass(frozen=True)
class _Problem:
    """Why a leaf and its tensor cannot pair; ``sizes`` when only the shapes differ."""

    text: str
    sizes: bool = False


@dataclass
class _Match:
    """What matching a target against a checkpoint found, before anything is read."""

    tensors: list[_Tensor] = field(default_factory=list)
    values: dict[int, Any] = field(default_factory=dict)  # position -> value known without reading
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what to show, name looked for)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)  # unclaimed checkpoint names, for close matches
    kept: list[str] = field(default_factory=list)  # leaves the checkpoint lacks, kept (strict=False)
    resized: list[str] = field(default_factory=list)  # shape mismatches kept (ignore_mismatched_sizes)
    abstract_unfilled: bool = False  # a leaf that could be kept but holds no data (abstract)
    sizes_differ: bool = False  # a concrete leaf differing in shape alone (ignore_mismatched_sizes keeps it)

    def report(self) -> RestoreReport:
        """What the restore kept, left unused and converted (nothing is reported as an error here)."""
        conversions = sorted((t.name, t.conversion) for t in self.tensors if t.conversion is not None)
        return RestoreReport(
            missing=tuple(sorted(self.kept)),
            unused=tuple(sorted(self.pool)),
            converted=dict(conversions),
            mismatched=tuple(sorted(self.resized)),
        )


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
    ignore_mismatched_sizes: bool = False,
    report: bool = False,
    device: Placement,
    record: Record | None = None,
    progress: bool | None = None,
    max_inflight_bytes: int = DEFAULT_BUDGET,
) -> Any:
    """See `Weights.restore`: match the target against the checkpoint, raise every difference at once,
    load through the bulk planner and rebuild the target's structure with the new values; then log the
    `RestoreReport` and, with ``report=True``, return ``(tree, report)``."""
    module = split_module(target)
    leaves, treedef = flatten_target(module[0] if module is not None else target)
    match = _match(
        checkpoint,
        prefix,
        leaves,
        keymap or KeyMap(),
        strict=strict,
        cast=cast,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        device=device,
    )
    _check(checkpoint, match, strict=strict)
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
    restored = module[1](new_tree) if module is not None else new_tree
    outcome = match.report()
    _log(checkpoint, outcome)
    return (restored, outcome) if report else restored


def _is_concrete(value: Any) -> bool:
    """An array with data, which ``strict=False`` can keep; a `jax.ShapeDtypeStruct` has none."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def _match(
    checkpoint: Checkpoint,
    prefix: str,
    leaves: list[Leaf],
    keymap: KeyMap,
    *,
    strict: bool,
    cast: bool,
    device: Placement,
    ignore_mismatched_sizes: bool = False,
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
            if info is None and not strict and _is_concrete(value):
                match.kept.append(leaf.name)
                continue
            if info is None:
                shown = leaf.name if name == leaf.name else f"{leaf.name} (looked for {name!r})"
                if not strict:
                    shown += " (abstract: no value of its own to keep)"
                    match.abstract_unfilled = True
                match.missing.append((shown, name))
                continue
            claimed.add(name)
            paired = _pair(position, leaf, info, keymap, checkpoint.metadata, cast=cast, default=default)
            if isinstance(paired, _Tensor):
                match.tensors.append(paired)
            elif paired.sizes and ignore_mismatched_sizes and _is_concrete(value):
                match.resized.append(leaf.name)
            elif paired.sizes and ignore_mismatched_sizes:
                match.mismatched.append(f"{paired.text} (abstract: no value of its own to keep)")
                match.abstract_unfilled = True
            else:
                match.mismatched.append(paired.text)
                match.sizes_differ |= paired.sizes and _is_concrete(value)
        elif isinstance(value, SCALAR_TYPES):
            if leaf.name in saved:
                stored = saved[leaf.name]
                match.values[position] = type(value)(stored) if stored is not None else None
            elif strict:
                kind = _article(type(value).__name__)
                match.missing.append((f"{leaf.name} ({kind} leaf; the checkpoint saved no value)", ""))
            else:
                match.kept.append(leaf.name)
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
) -> _Tensor | _Problem:
    """A leaf and its tensor: how to load it, or why it cannot be.

    A quantized tensor is matched by its logical shape and counts as the target's float dtype: placing it
    with that dtype dequantizes it."""
    want_shape, want_dtype = tuple(np.shape(leaf.value)), DType.from_any(np.dtype(leaf.value.dtype))
    if info.encoding is not None and not want_dtype.is_float():
        return _Problem(
            f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {info.name!r} is "
            f"{info.encoding.name}-quantized and dequantizes to floats only (use a float target)"
        )
    stored = want_dtype.to_numpy() if info.encoding is not None else info.dtype.to_numpy()
    transform = keymap.transform_for(leaf.name)
    try:
        if transform is not None:
            transform = bind_transform(transform, metadata)
        shape, dtype = transformed_shape(transform, info.shape, stored) if transform else (info.shape, stored)
    except WeightsError as error:  # a transform that cannot apply to this tensor
        return _Problem(f"{leaf.name}: {error}")
    if shape != want_shape:
        after = " after its transform" if transform else ""
        return _Problem(
            f"{leaf.name}: target shape {want_shape}, checkpoint {info.name!r} has {shape}{after}", sizes=True
        )
    found = DType.from_any(np.dtype(dtype))
    if canonical_dtype(found) is not want_dtype and not cast:  # int64 is int32 to JAX with x64 off
        return _Problem(
            f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {info.name!r} has "
            f"{canonical_dtype(found).name} (pass cast=True to convert)"
        )
    applied = [f"dequantized from {info.encoding.name}"] if info.encoding is not None else []
    applied += [f"transformed by {_describe(transform)}"] if transform is not None else []
    applied += [f"{found.name} -> {want_dtype.name}"] if found is not want_dtype else []
    return _Tensor(
        position,
        leaf.name,
        info,
        _target_sharding(leaf.value, default),
        want_dtype,
        transform,
        ", ".join(applied) or None,
    )


def _check(checkpoint: Checkpoint, match: _Match, *, strict: bool) -> None:
    """Raises one `StructureMismatchError` listing every difference, sorted, with close matches."""
    problems = len(match.missing) + len(match.mismatched) + len(match.unexpected)
    if not problems:
        return
    hints = []
    for shown, looked in match.missing:
        close = difflib.get_close_matches(looked, match.pool, n=1, cutoff=0.6) if looked else []
        hints.append(f"{shown}; closest in the checkpoint: {close[0]!r}" if close else shown)
    report = f"The target and the checkpoint ({_files(checkpoint)}) disagree in {problems} place(s):\n"
    if hints:
        report += _listing("missing from the checkpoint", hints)
    if match.unexpected:
        report += _listing("in the checkpoint but not in the target", match.unexpected)
    if match.mismatched:
        report += _listing("mismatched", match.mismatched)
    fixes = [
        "map names with keymap=KeyMap(renames=...) (jaxweights.TORCH_TO_FLAX for PyTorch layouts)",
        "restore a subtree (weights.<prefix>.restore)",
    ]
    if strict:
        fixes.append(
            "pass strict=False to keep the target's own values (arrays, scalars) where the checkpoint has "
            "none and ignore unused tensors"
        )
    if match.abstract_unfilled:
        fixes.append("give each abstract leaf listed a concrete array (its value is then kept)")
    if match.sizes_differ:
        fixes.append("pass ignore_mismatched_sizes=True to keep the target's values where shapes differ")
    report += "Fix: " + ", ".join(fixes[:-1]) + ", or " + fixes[-1] + "."
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


def _log(checkpoint: Checkpoint, report: RestoreReport) -> None:
    """Warns of leaves left as the target held them; notes unused tensors and conversions at INFO."""
    if (report.missing or report.mismatched) and _logger.isEnabledFor(logging.WARNING):
        text = f"Restored from {_files(checkpoint)}; some target leaves keep their own values:\n"
        if report.missing:
            text += _listing("not in the checkpoint", list(report.missing))
        if report.mismatched:
            text += _listing("shape differs from the checkpoint's", list(report.mismatched))
        _logger.warning("%s", text.rstrip("\n"))
    if (report.unused or report.converted) and _logger.isEnabledFor(logging.INFO):
        text = f"Restored from {_files(checkpoint)}:\n"
        if report.unused:
            text += _listing("in the checkpoint, not used", list(report.unused))
        if report.converted:
            text += _listing("converted", [f"{name}: {how}" for name, how in report.converted.items()])
        _logger.info("%s", text.rstrip("\n"))


def _files(checkpoint: Checkpoint) -> str:
    return ", ".join(str(f) for f in checkpoint.files[:2]) + (" ..." if len(checkpoint.files) > 2 else "")


def _describe(transform: Transform) -> str:
    """``Transpose(axes=None)`` for a transform object, the qualified name of a function."""
    name = getattr(transform, "__qualname__", None)
    return name if isinstance(name, str) else repr(transform)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _replicated_over(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding
