"""Restore a checkpoint into a target pytree: plain pytrees of arrays or `ShapeDtypeStruct`s, Flax NNX
states and modules, Equinox modules, optax states.

Four steps: match (pair every target leaf with a checkpoint tensor, a composite of tensors (layers
stacked for a scanned model, a `Concat`, a `Split` part) or a saved scalar, reading nothing),
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ._bulk import Record
from ._bulk import load as bulk_load
from ._compose import Composite, concat, stack, window
from ._devices import Placement, to_sharding
from ._dtypes import DType
from ._keymap import Concat, KeyMap, Source, Transform, Transpose, bind_transform, transformed_shape
from ._loader import DEFAULT_BUDGET
from ._names import is_under
from ._placement import canonical_dtype
from ._pytree import LEAVES_KEY, SCALAR_TYPES, Leaf, flatten_target, is_array_like, split_module
from .errors import ArgumentError, StructureMismatchError, WeightsError
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
    composite: Composite | None = None  # the tensors info stands for, when it is not one of the checkpoint's

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
    stack: Sequence[str] = (),
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
        stacks=_stack_prefixes(stack, leaves),
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
    stacks: Sequence[str] = (),
) -> _Match:
    """Pairs every target leaf with its checkpoint tensor, composite or saved scalar; reads nothing."""
    default = to_sharding(device)
    saved = _saved_leaves(checkpoint)
    lead = f"{prefix}." if prefix else ""
    match = _Match()
    claimed: set[str] = set()
    for position, leaf in enumerate(leaves):
        value = leaf.value
        if is_array_like(value):
            layered = _layered(leaf.name, stacks)
            if layered is None:
                found = _source(checkpoint, lead, leaf.name, keymap)
            else:
                found = _stacked_source(checkpoint, lead, leaf, layered, keymap)
            claimed.update(found.names)
            if found.problem is not None:  # parts that cannot be joined, layers that do not add up
                match.mismatched.append(f"{leaf.name}: {found.problem}")
                continue
            if found.info is None and layered is None and leaf.name in saved and np.shape(value) == ():
                # a scalar saved as metadata, asked for as a 0-d array (jax.eval_shape makes those)
                host = np.asarray(saved[leaf.name], dtype=np.dtype(value.dtype))
                match.values[position] = jax.device_put(host, _target_sharding(value, default))
                continue
            if found.info is None and not strict and _is_concrete(value):
                match.kept.append(leaf.name)
                continue
            if found.info is None:
                name = found.missing
                shown = leaf.name if name == leaf.name else f"{leaf.name} (looked for {name!r})"
                if not strict:
                    shown += " (abstract: no value of its own to keep)"
                    match.abstract_unfilled = True
                match.missing.append((shown, name))
                continue
            name_for_transform = leaf.name if layered is None else _layer_name(layered, 0)
            paired = _pair(
                position,
                leaf,
                found.info,
                keymap.transform_for(name_for_transform),
                checkpoint.metadata,
                cast=cast,
                default=default,
                layers=None if layered is None else np.shape(value)[0],
                note=found.note,
                composite=found.composite,
            )
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
    transform: Transform | None,
    metadata: Mapping[str, Any],
    *,
    cast: bool,
    default: Sharding,
    layers: int | None = None,
    note: str | None = None,
    composite: Composite | None = None,
) -> _Tensor | _Problem:
    """A leaf and its tensor (or composite): how to load it, or why it cannot be.

    A quantized tensor is matched by its logical shape and counts as the target's float dtype: placing it
    with that dtype dequantizes it. ``transform`` is the keymap's for the leaf (for a stacked leaf, the
    first layer's name's, applied to every layer); ``note`` says how a composite was formed."""
    want_shape, want_dtype = tuple(np.shape(leaf.value)), DType.from_any(np.dtype(leaf.value.dtype))
    if info.encoding is not None and not want_dtype.is_float():
        return _Problem(
            f"{leaf.name}: target dtype {want_dtype.name}, checkpoint {info.name!r} is "
            f"{info.encoding.name}-quantized and dequantizes to floats only (use a float target)"
        )
    stored = want_dtype.to_numpy() if info.encoding is not None else info.dtype.to_numpy()
    try:
        if transform is not None:
            transform = bind_transform(transform, metadata)
            transform = _per_layer(transform, len(info.shape)) if layers is not None else transform
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
    applied = [note] if note is not None else []
    applied += [f"dequantized from {info.encoding.name}"] if info.encoding is not None else []
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
        composite,
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
        composites={t.info.name: t.composite for t in tensors if t.composite is not None},
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


@dataclass(frozen=True)
class _Found:
    """What a target leaf reads: a tensor or composite (``info``), every checkpoint name involved, or the
    first name missing and why."""

    info: TensorInfo | None
    names: tuple[str, ...] = ()
    composite: Composite | None = None
    note: str | None = None  # how a composite was formed, for the report
    missing: str = ""
    problem: str | None = None  # why the tensors found cannot fill the leaf


def _source(checkpoint: Checkpoint, lead: str, name: str, keymap: KeyMap) -> _Found:
    """The tensor a target name reads, or the composite a `Concat` / `Split` of the keymap makes (with
    the reason when the parts cannot be joined or a `Split` does not divide its tensor)."""
    names = [lead + found for found in keymap.sources(name)]
    infos = [checkpoint.get(found) for found in names]
    present = tuple(found for found, info in zip(names, infos, strict=True) if info is not None)
    absent = [found for found, info in zip(names, infos, strict=True) if info is None]
    if absent:
        return _Found(None, present, missing=absent[0])
    parts = [info for info in infos if info is not None]
    chosen = keymap.source_for(name)
    if chosen is None:
        return _Found(parts[0], present)
    try:
        return _composed(names, parts, chosen[1], present)
    except WeightsError as error:
        return _Found(None, present, problem=str(error))


def _composed(names: list[str], parts: list[TensorInfo], source: Source, present: tuple[str, ...]) -> _Found:
    if isinstance(source, Concat):
        joined = concat(" + ".join(names), parts, source.axis)
        what = f"concatenated from {len(parts)} tensors along axis {source.axis}"
        return _Found(joined.info, present, joined, what)
    (whole,) = parts
    axis = source.axis + len(whole.shape) if source.axis < 0 else source.axis
    if not 0 <= axis < len(whole.shape):
        raise ArgumentError(
            f"Split axis {source.axis} does not exist in {whole.name!r} of shape {whole.shape} ({whole.file})."
        )
    start, stop = source.bounds(whole.shape[axis])
    part = window(f"{whole.name}[{start}:{stop} along axis {axis}]", whole, axis, start, stop)
    return _Found(part.info, present, part, f"part {source.index} of {whole.name!r}")


def _stack_prefixes(stack: Sequence[str], leaves: list[Leaf]) -> tuple[str, ...]:
    """The ``stack=`` prefixes, checked: strings, each the prefix of at least one target leaf."""
    if isinstance(stack, str):
        stack = (stack,)
    prefixes = tuple(stack)
    names = [leaf.name for leaf in leaves]
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix:
            raise ArgumentError(f"stack= takes target name prefixes such as 'model.layers', not {prefix!r}.")
        if not any(is_under(name, prefix) and name != prefix for name in names):
            close = difflib.get_close_matches(prefix, names, n=3, cutoff=0.5)
            hint = f" Closest target leaves: {', '.join(repr(c) for c in close)}." if close else ""
            raise ArgumentError(
                f"stack={prefix!r} matches no leaf of the target: it names the subtree whose leaves carry "
                f"a leading layer axis (the leaves are '{prefix}.<name>').{hint}"
            )
    return prefixes


def _layered(name: str, stacks: Sequence[str]) -> tuple[str, str] | None:
    """``(prefix, rest)`` when a target leaf lies under a stack prefix."""
    for prefix in stacks:
        if is_under(name, prefix) and name != prefix:
            return prefix, name[len(prefix) + 1 :]
    return None


def _layer_name(layered: tuple[str, str], index: int) -> str:
    prefix, rest = layered
    return f"{prefix}.{index}.{rest}"


def _stacked_source(
    checkpoint: Checkpoint, lead: str, leaf: Leaf, layered: tuple[str, str], keymap: KeyMap
) -> _Found:
    """The layers ``prefix.0.rest`` ... ``prefix.{L-1}.rest`` of a stacked target leaf, stacked, where L is
    the target's leading axis. No layer at all is a missing name; a layer missing after others, a gap,
    more layers in the checkpoint than the target holds, and layers whose shapes or dtypes differ are
    problems naming the tensors and counts involved."""
    shape = np.shape(leaf.value)
    if not shape:
        problem = (
            f"it lies under stack prefix {layered[0]!r} but has no leading layer axis (shape ()); stacked "
            f"leaves have shape (layers, ...)"
        )
        return _Found(None, problem=problem)
    count = shape[0]
    names: list[str] = []
    items: list[TensorInfo | Composite] = []
    for index in range(count):
        found = _source(checkpoint, lead, _layer_name(layered, index), keymap)
        names += found.names
        if found.problem is not None:
            return _Found(None, tuple(names), problem=found.problem)
        if found.info is None and not index:
            return _Found(None, tuple(names), missing=found.missing)
        if found.info is None:
            later = _source(checkpoint, lead, _layer_name(layered, index + 1), keymap)
            if later.info is not None:
                why = f"layer {index} is missing while layer {index + 1} exists: a gap in the numbering"
            else:
                why = f"the target's leading axis holds {count} layers, the checkpoint {index}"
            return _Found(None, tuple(names), problem=f"{why} ({found.missing!r} is missing)")
        items.append(found.composite if found.composite is not None else found.info)
    extra = _source(checkpoint, lead, _layer_name(layered, count), keymap)
    if extra.info is not None:
        total = count + 1
        while total < count + 100_000 and _source(checkpoint, lead, _layer_name(layered, total), keymap).info:
            total += 1
        problem = (
            f"the target's leading axis holds {count} layers, but the checkpoint holds {total} layers of it "
            f"({', '.join(repr(n) for n in extra.names)} exists); give the target {total} layers"
        )
        return _Found(None, tuple(names), problem=problem)
    first = items[0].info.name if isinstance(items[0], Composite) else items[0].name
    last = items[-1].info.name if isinstance(items[-1], Composite) else items[-1].name
    try:
        stacked = stack(_stacked_name(first, last, count), items)
    except WeightsError as error:  # layers of different shapes or dtypes
        return _Found(None, tuple(names), problem=str(error))
    return _Found(stacked.info, tuple(names), stacked, f"stacked from {count} layers")


def _stacked_name(first: str, last: str, count: int) -> str:
    """``model.layers.{0..5}.mlp.weight`` from the first and last layer's names."""
    if count == 1:
        return f"{first} (stacked)"
    head, tail = first.split("."), last.split(".")
    if len(head) == len(tail):
        differ = [k for k, (a, b) in enumerate(zip(head, tail, strict=True)) if a != b]
        if len(differ) == 1:
            head[differ[0]] = f"{{{head[differ[0]]}..{tail[differ[0]]}}}"
            return ".".join(head)
    return f"{first} .. {last}"


@dataclass(frozen=True)
class _PerLayer:
    """A keymap function applied to each layer of a stacked tensor (vmapped over the layer axis)."""

    inner: Transform

    def __call__(self, value: Any) -> Any:
        return jax.vmap(self.inner)(value)

    def __repr__(self) -> str:
        return f"{_describe(self.inner)} per layer"


def _per_layer(transform: Transform, ndim: int) -> Transform:
    """``transform`` of one layer made a transform of the stacked tensor: a `Transpose` keeps the layer
    axis first (so sharded reads stay per-block); any other function is vmapped."""
    if isinstance(transform, Transpose):
        return Transpose((0, *(axis + 1 for axis in transform.permutation(ndim - 1))))
    return _PerLayer(transform)
