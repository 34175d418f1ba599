"""Save a pytree as safetensors: one file, or shards plus a standard ``model.safetensors.index.json``.

Writes are atomic and crash-safe: they follow the staging protocol of `_staging` (a private, locked
temporary folder beside the target; a file renamed over it, a folder swapped in with one
``renameat2(RENAME_EXCHANGE)``), so a crash or kill leaves the previous checkpoint or the new one, whole.
A save into an existing folder replaces only the previous checkpoint's own files
(`previous_weight_files`): everything else there (``config.json``, tokenizers, ``adapter_model.safetensors``)
is carried over. A symlinked target stays a symlink; leftovers of killed saves of the same target are
removed first; every operating-system error becomes a `CheckpointWriteError`. Sharded arrays are written
shard by shard (replicated blocks once), so host memory stays near one shard; the caller's tree is never
modified. Non-array leaves (step counters, flags) are stored as JSON in the metadata.

In a multi-process job nothing is gathered: every process lays the files out alike (`plan_files`),
process 0 creates them in its staging folder at their final size, and each process ``pwrite``s the blocks
whose lowest-numbered holder it is (so each byte is written once) and fsyncs; process 0 publishes after
all have. The steps are agreed through the `jax.distributed` key-value store with a timeout
(`BARRIER_TIMEOUT_S`), and a failure in any process becomes a `CheckpointWriteError` in every process.
The folder must be on a file system every process sees. Without that store (a JAX that moved it), process
0 writes everything, gathering one sharded array at a time.

The bytes and the file layout come from the safetensors plug-in's `FormatWriter`; this module owns the
tree, the multi-process protocol and which files a save replaces, and never writes a format's bytes or
renames a file itself.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import jax
import numpy as np

from ._compat import kv_client
from ._names import is_under, natural_sorted
from ._plan import BlockRead, ReadPlan, block_key, plan_reads
from ._pytree import LEAVES_KEY, SCALAR_TYPES, flatten_target, is_array_like, split_module
from ._staging import publish_folder, staging, write_atomically, write_error
from .errors import ArgumentError, CheckpointWriteError, StructureMismatchError
from .formats import FormatWriter, TensorInfo, TensorSpec, WeightsFormat, plugin_for, spec_of
from .formats.safetensors import INDEX_NAME, FileLayout, index_text, plan_files

__all__ = ["SaveStats", "last_save_stats", "parse_size", "previous_weight_files", "save", "unstack_leaves"]


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000_000``, ``"5GB"`` or ``"500MiB"``.

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(10)
        (5000000000, 2097152, 10)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    text = str(size).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ArgumentError(f"{size!r} is not a size; use bytes or a string such as '5GB' or '500MiB'.")
    return int(value * units[unit])


@dataclass(frozen=True)
class _Layer:
    """Layer ``index`` of a stacked array (one step of its leading axis), saved as a tensor of its own.

    Nothing is sliced on a device: the writers take the layer's rows from the host data of the stacked
    array or of its shards (`_host_layer`, `_layer_indices`). Only the gathering fallbacks (`_gathered`: a
    job without a key-value store, float4 spread over processes) slice one layer on the devices, so that
    one layer is gathered, not the whole stack once per layer.
    """

    stacked: Any
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.stacked.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.stacked.dtype


def _source(value: Any) -> tuple[Any, int | None]:
    """``(array, layer)``: the array whose data a written tensor comes from, and its layer (or None)."""
    return (value.stacked, value.index) if isinstance(value, _Layer) else (value, None)


def _is_spread(value: Any) -> bool:
    """True when a tensor's array spans several processes (this one holds only some of its shards)."""
    array, _ = _source(value)
    return isinstance(array, jax.Array) and not array.is_fully_addressable


def _gathered(value: Any) -> Any:
    """A spread tensor gathered whole into every process (a collective: every process calls it in step).
    A layer is sliced on the devices first (one layer's device memory, briefly), so that one layer is
    gathered, not the stack."""
    from jax.experimental import multihost_utils

    array, layer = _source(value)
    return multihost_utils.process_allgather(array if layer is None else array[layer], tiled=True)


def _host_layer(layer: _Layer) -> np.ndarray:
    """A layer of an array one device holds whole (or a host array): a view of its host data."""
    return cast(np.ndarray, np.asarray(layer.stacked)[layer.index])


def _layer_indices(
    indices: Mapping[Hashable, tuple[slice, ...] | None], shape: tuple[int, ...], layer: int
) -> dict[Hashable, tuple[tuple[slice, ...], int]]:
    """The devices whose block of a stacked array of ``shape`` holds row ``layer``: device -> (the index
    of that row's part within the layer, the row's position in the device's block).

    Example:
        >>> rows = {"d0": (slice(0, 2),), "d1": (slice(2, 4),)}
        >>> _layer_indices(rows, (4, 3), 2)
        {'d1': ((), 0)}
        >>> _layer_indices({"d0": (slice(None), slice(0, 2)), "d1": (slice(None), slice(2, 3))}, (4, 3), 1)
        {'d0': ((slice(0, 2, None),), 1), 'd1': ((slice(2, 3, None),), 1)}
    """
    held: dict[Hashable, tuple[tuple[slice, ...], int]] = {}
    for device, index in indices.items():
        (start, stop), *_ = block_key(index, shape)
        if start <= layer < stop:
            held[device] = (tuple((index or ())[1:]), layer - start)
    return held


def _plan_blocks(
    spec: TensorSpec,
    shape: tuple[int, ...],
    indices: Mapping[Hashable, tuple[slice, ...] | None],
    layer: int | None,
) -> tuple[ReadPlan, dict[Hashable, int | None]]:
    """The blocks of a tensor written from the shards of an array of ``shape`` (device -> ``indices``), and
    the row of each device's shard that holds them: the whole array's blocks, or those of one layer."""
    info = TensorInfo("", spec.dtype, spec.shape, Path(), 0, spec.nbytes)
    if layer is None:
        return plan_reads(info, indices), dict.fromkeys(indices)
    held = _layer_indices(indices, shape, layer)
    plan = plan_reads(info, {device: index for device, (index, _) in held.items()})
    return plan, {device: row for device, (_, row) in held.items()}


def _block_bytes(data: Any, row: int | None) -> np.ndarray:
    """A shard's host bytes (of one of its rows when ``row`` is set), C-contiguous, as flat uint8."""
    host = np.asarray(data)
    if row is not None:
        host = host[row]
    return np.ascontiguousarray(host).reshape(-1).view(np.uint8)


def _write_value(writer: FormatWriter, out: BinaryIO, value: Any) -> None:
    """Writes one tensor; a sharded array (or a layer of one) is written block by block (one host copy of
    a shard at a time)."""
    array, layer = _source(value)
    if isinstance(array, jax.Array):
        if not array.is_fully_addressable:
            value = _gathered(value)
        elif len(array.sharding.device_set) > 1 and layer is None:
            if _write_blocks(writer, out, array):
                return
        elif len(array.sharding.device_set) > 1 and layer is not None:
            if not _write_blocks(writer, out, array, layer):  # strided: one layer assembled on the host
                writer.write_array(out, _assemble_layer(array, layer))
            return
    writer.write_array(out, _host_layer(value) if isinstance(value, _Layer) else value)


def _write_blocks(writer: FormatWriter, out: BinaryIO, array: jax.Array, layer: int | None = None) -> bool:
    """Writes each distinct block of a sharded array (or of its layer ``layer``) at its offsets with
    ``pwrite``; False when the blocks are strided (column shards), which are better gathered whole."""
    spec = spec_of("", array if layer is None else _Layer(array, layer))
    if spec.dtype.is_packed:
        return False
    shards = {shard.device: shard for shard in array.addressable_shards}
    plan, rows = _plan_blocks(
        spec, tuple(array.shape), {device: shard.index for device, shard in shards.items()}, layer
    )
    if any(block.num_runs > 1 for block in plan.blocks):
        return False
    base = out.tell()
    out.flush()
    for block in plan.blocks:
        device = block.devices[0]
        writer.write_at(
            out, _block_bytes(shards[cast(jax.Device, device)].data, rows[device]), base + block.offset
        )
    out.seek(base + spec.nbytes)
    return True


def _assemble_layer(array: jax.Array, layer: int) -> np.ndarray:
    """One layer of a sharded array, copied from its shards' rows into a host buffer."""
    shards = {shard.device: shard for shard in array.addressable_shards}
    held = _layer_indices(
        {device: shard.index for device, shard in shards.items()}, tuple(array.shape), layer
    )
    host = np.empty(tuple(array.shape[1:]), array.dtype)
    for device, (index, row) in held.items():
        host[index] = np.asarray(shards[cast(jax.Device, device)].data)[row]
    return host


def savable_leaves(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, scalars)`` of a tree to save, by dotted name; functions and static leaves skipped.

    Raises:
        StructureMismatchError: every leaf that cannot be stored (abstract, or neither array nor scalar).
    """
    module = split_module(tree)
    leaves, _ = flatten_target(module[0] if module is not None else tree)
    arrays: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    bad: list[str] = []
    for leaf in leaves:
        if isinstance(leaf.value, jax.ShapeDtypeStruct):
            bad.append(f"{leaf.name}: an abstract ShapeDtypeStruct has no data to save")
        elif is_array_like(leaf.value):
            arrays[leaf.name] = leaf.value
        elif isinstance(leaf.value, SCALAR_TYPES):
            scalars[leaf.name] = leaf.value
        elif not callable(leaf.value):
            kind = type(leaf.value).__name__
            bad.append(
                f"{leaf.name}: {'an' if kind[:1] in 'aeiou' else 'a'} {kind} is neither an array nor a scalar"
            )
    if bad:
        raise StructureMismatchError(
            "Cannot save these leaves:\n"
            + "".join(f"  {line}\n" for line in sorted(bad))
            + "Fix: filter them out (e.g. eqx.filter(tree, eqx.is_array)) or convert them to arrays."
        )
    return arrays, scalars


def unstack_leaves(
    arrays: Mapping[str, Any], scalars: Mapping[str, Any], prefixes: str | Sequence[str]
) -> dict[str, Any]:
    """``arrays`` with every leaf under one of ``prefixes`` split along its leading (layer) axis: the leaf
    ``prefix.rest`` of shape ``(L, *s)`` becomes ``L`` tensors ``prefix.0.rest`` ... ``prefix.{L-1}.rest`` of
    shape ``s``, in natural order where the first leaf under the prefix was. Pure: the layers are lazy
    views (nothing is sliced or copied here).

    Raises:
        ArgumentError: ``prefixes`` holds an empty, repeated or nested prefix.
        StructureMismatchError: a prefix matches no array (the closest names are listed); a leaf under a
            prefix is a scalar or a 0-d array, or its leading size differs from the others'; a written name
            is also the name of another leaf. Every problem is listed at once.

    Example:
        >>> import numpy as np
        >>> arrays = {"embed": np.zeros(3), "layers.w": np.zeros((2, 4)), "layers.b": np.zeros((2,))}
        >>> [(name, value.shape) for name, value in unstack_leaves(arrays, {}, ["layers"]).items()]
        [('embed', (3,)), ('layers.0.b', ()), ('layers.0.w', (4,)), ('layers.1.b', ()), ('layers.1.w', (4,))]
    """
    chosen = [prefixes] if isinstance(prefixes, str) else list(prefixes)  # one prefix, as restore's stack=
    for prefix in chosen:
        if not isinstance(prefix, str) or not prefix or prefix.startswith(".") or prefix.endswith("."):
            raise ArgumentError(
                f"unstack prefix {prefix!r} is not a dotted leaf-name prefix such as 'model.layers'."
            )
        clash = [other for other in chosen if is_under(other, prefix)]
        if clash or chosen.count(prefix) > 1:
            raise ArgumentError(
                f"unstack prefix {prefix!r} is given twice or contains {clash}: name each stack once."
            )
    if not chosen:
        return dict(arrays)
    problems: list[str] = []
    groups: dict[str, tuple[str, int, list[str]]] = {}  # first member -> (prefix, L, members)
    for prefix in chosen:
        members = natural_sorted(name for name in arrays if name == prefix or is_under(name, prefix))
        problems += [
            f"{name}: a scalar ({type(scalars[name]).__name__}) under unstack prefix {prefix!r} has no layer axis"
            for name in natural_sorted(name for name in scalars if name == prefix or is_under(name, prefix))
        ]
        if not members:
            known = {
                ".".join(name.split(".")[:end])
                for name in [*arrays, *scalars]
                for end in range(1, name.count(".") + 2)
            }
            close = difflib.get_close_matches(prefix, sorted(known), n=5, cutoff=0.5)
            problems.append(
                f"unstack prefix {prefix!r} matches no array leaf; "
                + (f"closest names: {', '.join(close)}" if close else "no name is close")
            )
            continue
        shapes = {name: spec_of(name, arrays[name]).shape for name in members}
        flat = [name for name in members if not shapes[name]]
        problems += [
            f"{name}: a 0-d array under unstack prefix {prefix!r} has no layer axis" for name in flat
        ]
        stacked = [name for name in members if shapes[name]]
        if stacked:
            size = shapes[stacked[0]][0]
            problems += [
                f"{name}: shape {shapes[name]} has leading size {shapes[name][0]}, but {stacked[0]} under "
                f"unstack prefix {prefix!r} has {size}: expected L = {size}"
                for name in stacked
                if shapes[name][0] != size
            ]
            groups[members[0]] = (prefix, size, members)
    originals = {*arrays, *scalars}
    result: dict[str, Any] = {}
    written_from: dict[str, str] = {}
    replaced = {name for _, _, members in groups.values() for name in members}
    for name, value in arrays.items():
        if name not in replaced:
            result[name] = value
            continue
        if name not in groups:
            continue
        prefix, size, members = groups[name]
        for index in range(size):
            for member in members:
                rest = member[len(prefix) + 1 :]
                written = f"{prefix}.{index}" + (f".{rest}" if rest else "")
                if written in originals:
                    problems.append(
                        f"{member}: its layer {index} would be written as {written}, which is also a leaf"
                    )
                elif written in written_from:
                    problems.append(
                        f"{member} and {written_from[written]} would both be written as {written}"
                    )
                written_from[written] = member
                result[written] = _Layer(arrays[member], index)
    if problems:
        raise StructureMismatchError(
            "Cannot unstack these leaves:\n"
            + "".join(f"  {line}\n" for line in problems)
            + "Fix: every leaf under an unstack prefix must be an array whose leading axis counts the layers."
        )
    return result


def save(
    tree: Any,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    unstack: str | Sequence[str] = (),
) -> Path:
    """Saves a pytree's arrays as safetensors, atomically.

    Args:
        tree: nested dicts/lists/tuples, an optax state, an Equinox module, a Flax NNX state or module.
            Leaves are named by their key paths joined with dots (``params.layers.0.kernel``). Python
            scalars and strings are stored in the metadata and restored by `Weights.restore`; functions
            and other static leaves are skipped.
        path: a folder (created if missing), which receives ``model.safetensors``, or shards
            ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` when the arrays
            exceed ``max_shard_size``; or a ``*.safetensors`` file path for a single file.
        max_shard_size: bytes per shard file, or a string such as ``"2GB"``.
        metadata: extra ``__metadata__`` strings.
        unstack: dotted prefixes of leaf names (matched on whole segments) whose leaves are stacked along a
            leading layer axis, as under ``jax.lax.scan``, ``nnx.scan`` or ``eqx.filter_vmap``: the leaf
            ``model.layers.mlp.kernel`` of shape ``(L, *s)`` is written as ``L`` tensors
            ``model.layers.0.mlp.kernel`` ... of shape ``s``, so that the file loads in ``transformers`` and
            ``safetensors`` as an ordinary checkpoint. Each layer is written from the host data of the stack
            (or of its shards; each process writes the layers its shards hold), never sliced on a device.

    Returns:
        The folder or file written.

    A save into an existing folder replaces only the previous checkpoint's own files and carries the
    others over (``config.json``, tokenizers, unrelated ``*.safetensors``); a symlinked ``path`` stays a
    symlink and what it points to is replaced. Files get ``0666 & ~umask``, a new folder ``0777 & ~umask``;
    an existing folder keeps its mode. Temporary entries that killed saves of the same target left are
    removed first.

    In a multi-process `jax.distributed` job, every process calls ``save`` with the same tree and a path
    on a file system they all share; each writes only the blocks of its own shards (nothing is gathered),
    and the result is byte for byte what one process would write. A process that fails or never arrives
    makes the save raise `CheckpointWriteError` in every process.

    Raises:
        CheckpointWriteError: the folder is read-only, the disk is full, ``path`` is a file where a
            folder is expected (or a folder where a file is): it names the step that failed and a fix;
            the previous checkpoint is left whole and no temporary entry remains.
        StructureMismatchError: a leaf is abstract (a `ShapeDtypeStruct`) or of a type that cannot be stored;
            an ``unstack`` prefix matches no array, or a leaf under it is not an array with a leading axis
            of the same size as the others', or a per-layer name is also another leaf's name.
        ArgumentError: ``unstack`` names a prefix twice or one inside another.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> folder = jw.save({"params": {"w": jnp.ones((2, 2))}, "step": 7}, f"{tempfile.mkdtemp()}/ckpt")
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors']
        >>> jw.load_weights(folder).restore({"params": {"w": jnp.zeros((2, 2))}, "step": 0})["step"]
        7

        Layers stacked for ``scan``, written one tensor per layer:

        >>> stacked = {"layers": {"w": jnp.ones((3, 4)), "b": jnp.zeros((3,))}}
        >>> folder = jw.save(stacked, f"{tempfile.mkdtemp()}/ckpt", unstack=["layers"])
        >>> list(jw.load_weights(folder).keys())
        ['layers.0.b', 'layers.0.w', 'layers.1.b', 'layers.1.w', 'layers.2.b', 'layers.2.w']
    """
    path = Path(path)
    round_id = next(_rounds) if jax.process_count() > 1 else 0  # counted before anything can raise
    arrays, scalars = savable_leaves(tree)
    arrays = unstack_leaves(arrays, scalars, unstack)
    specs = [spec_of(name, value) for name, value in arrays.items()]
    info: dict[str, str] = dict(metadata or {})
    if scalars:
        info[LEAVES_KEY] = json.dumps(scalars, sort_keys=True)
    primary = jax.process_index() == 0
    plugin = plugin_for(WeightsFormat.safetensors)
    writer = plugin.require_writer()

    def write(spec: TensorSpec, out: BinaryIO) -> None:
        _write_value(writer, out, arrays[spec.name])

    single = path.suffix == ".safetensors"
    limit = parse_size(max_shard_size)
    client = kv_client() if jax.process_count() > 1 else None
    try:
        if client is not None:
            sync = _Rendezvous(client, round_id, path)
            _record(_save_distributed(sync, writer, path, arrays, specs, info, None if single else limit))
            return path
        files = plan_files(specs, info or None, None if single else limit)
        _record(
            SaveStats(
                tensor_bytes=sum(spec.nbytes for spec in specs) if primary else 0,
                header_bytes=_header_size(files, specs, info) if primary else 0,
                pieces=len(specs) if primary else 0,
            )
        )
        if not primary:  # without a key-value store: take part in process 0's gathers, in its order
            for spec in writer.write_order(specs, None if single else limit):
                if _is_spread(arrays[spec.name]):
                    _gathered(arrays[spec.name])
            _barrier(path)
            return path
        if single:
            write_atomically(path, lambda staged: writer.write_file(staged, specs, write, info or None))
        else:
            _save_folder(writer, path, specs, write, info, limit)
        _barrier(path)
        return path
    except CheckpointWriteError:
        raise
    except OSError as error:  # every step names itself in staging; this is a net
        raise write_error(path, "saving", error) from error


def _barrier(path: Path) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxweights.save:{path}")


_WRITTEN_NAMES = re.compile(r"model(?:-\d{5}-of-\d{5})?\.safetensors")
"""The weight files the safetensors writer names: ``model.safetensors`` and its shards."""


def previous_weight_files(folder: Path) -> set[str]:
    """The previous checkpoint's own files in ``folder``, which a new save replaces: the names the
    safetensors writer gives (``model.safetensors``, ``model-0000i-of-0000N.safetensors``, the index) and
    the ``*.safetensors`` files the folder's ``model.safetensors.index.json`` names. Every other entry
    (``config.json``, ``adapter_model.safetensors``, subfolders) is kept.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("model-00001-of-00002.safetensors", "extra.safetensors", "adapter_model.safetensors",
        ...              "config.json"):
        ...     _ = (folder / name).write_text("")
        >>> _ = (folder / INDEX_NAME).write_text('{"weight_map": {"a": "extra.safetensors"}}')
        >>> sorted(previous_weight_files(folder))
        ['extra.safetensors', 'model-00001-of-00002.safetensors', 'model.safetensors.index.json']
    """
    try:
        names = set(os.listdir(folder))
    except OSError:  # missing, or not a folder
        return set()
    owned = {name for name in names if _WRITTEN_NAMES.fullmatch(name)}
    if INDEX_NAME in names:
        owned.add(INDEX_NAME)
        try:
            index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # an unreadable index names nothing more
            index = None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if isinstance(weight_map, dict):
            owned.update(
                name
                for name in weight_map.values()
                if isinstance(name, str) and name in names and name.endswith(".safetensors")
            )
    return owned


def _save_folder(
    writer: FormatWriter, path: Path, specs: list[TensorSpec], write: Any, info: dict[str, str], limit: int
) -> None:
    with staging(path) as stage:
        stage.expect_folder()
        stage.doing = "writing the weights"
        writer.write_folder(stage.folder, specs, write, info or None, limit)
        publish_folder(stage, replaced=previous_weight_files(stage.target))


# Multi-process saves: every process writes its own shards into files process 0 created
# ---------------------------------------------------------------------------------------------

BARRIER_TIMEOUT_S = 1800.0
"""How long a process of a multi-process save waits at each step for the others (the slowest process's
writes fall within one step) before it gives up with a `CheckpointWriteError`."""

_rounds = itertools.count()


@dataclass(frozen=True)
class SaveStats:
    """What this process wrote in its last `save` (for tests and benchmarks).

    Attributes:
        tensor_bytes: tensor bytes this process wrote (all-zero blocks left as holes included); over the
            processes of a job they sum to the checkpoint's tensor bytes.
        header_bytes: header and index bytes (process 0 only).
        pieces: whole arrays and blocks of sharded arrays written.
    """

    tensor_bytes: int
    header_bytes: int
    pieces: int


_stats: list[SaveStats] = []


def _record(stats: SaveStats) -> None:
    _stats[:] = [stats]


def last_save_stats() -> SaveStats | None:
    """This process's `SaveStats` of its last `save`, or None before any.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> _ = jw.save({"w": np.ones(16, np.float32)}, f"{tempfile.mkdtemp()}/ckpt")
        >>> last_save_stats().tensor_bytes
        64
    """
    return _stats[-1] if _stats else None


def _header_size(files: list[FileLayout], specs: list[TensorSpec], info: dict[str, str]) -> int:
    index = index_text(files, specs, info or None)
    return sum(len(layout.header) for layout in files) + (len(index.encode()) if index else 0)


class _Rendezvous:
    """The steps of one multi-process save, agreed through the `jax.distributed` key-value store.

    Process 0 posts ``created`` (the staged files' paths) and ``published``; the others post ``planned``
    (their layout's digest) and ``written``. Each value is ``ok:<payload>`` or ``error:<message>``; a
    process that fails posts its error at every step it has not posted yet, so no process waits on it
    longer than the step it is at, and every wait has a timeout.
    """

    def __init__(self, client: Any, round_id: int, path: Path) -> None:
        self.client = client
        self.prefix = f"jaxweights/save/{round_id}"
        self.path = path
        self.me = jax.process_index()
        self.count = jax.process_count()
        self.posted: set[str] = set()
        self.peer_errors: list[str] = []

    def post(self, step: str, payload: str = "") -> None:
        self.client.key_value_set(f"{self.prefix}/{step}/{self.me}", f"ok:{payload}")
        self.posted.add(step)

    def fail(self, steps: tuple[str, ...], error: BaseException) -> None:
        """Posts ``error`` (or the peers' errors that caused it) at every step of ``steps`` not posted."""
        text = " ".join(self.peer_errors) or f"process {self.me}: {error}"
        for step in steps:
            if step not in self.posted:
                with contextlib.suppress(Exception):  # the store is gone: the others time out
                    self.client.key_value_set(f"{self.prefix}/{step}/{self.me}", f"error:{text}")
                self.posted.add(step)

    def wait(self, step: str, processes: range) -> list[str]:
        """The payloads ``processes`` posted at ``step``; raises `CheckpointWriteError` when one of them
        failed or did not post within `BARRIER_TIMEOUT_S`."""
        payloads = []
        for process in processes:
            try:
                value = self.client.blocking_key_value_get(
                    f"{self.prefix}/{step}/{process}", int(BARRIER_TIMEOUT_S * 1000)
                )
            except Exception as error:  # the store raises XlaRuntimeError on timeout
                self.peer_errors.append(
                    f"process {process} did not reach step {step!r} within {BARRIER_TIMEOUT_S:.0f} s."
                )
                raise self.error(
                    "Every process of the job must call jaxweights.save with the same tree and path."
                ) from error
            kind, _, text = str(value).partition(":")
            if kind != "ok":
                self.peer_errors.append(text)
            payloads.append(text)
        if self.peer_errors:
            raise self.error("")
        return payloads

    def error(self, fix: str) -> CheckpointWriteError:
        return CheckpointWriteError(
            f"Saving to {self.path} failed in this multi-process job (this is process {self.me}): "
            f"{' '.join([*self.peer_errors, fix]).strip()}",
            file=self.path,
        )


def _save_distributed(
    sync: _Rendezvous,
    writer: FormatWriter,
    path: Path,
    arrays: dict[str, Any],
    specs: list[TensorSpec],
    info: dict[str, str],
    limit: int | None,
) -> SaveStats:
    """One multi-process save. Every process lays the files out alike (`plan_files`); process 0 checks
    that the layouts agree, creates the files in a staging folder at their final size with their headers,
    and posts their paths; every process writes the blocks it owns with ``pwrite`` and fsyncs; process 0
    publishes once all have, and posts the outcome, which every process waits for."""
    files = plan_files(specs, info or None, limit)
    index = index_text(files, specs, info or None)
    digest = hashlib.sha256()
    for layout in files:
        digest.update(f"{layout.name}\0{layout.size}\0{sorted(layout.offsets.items())}\0".encode())
        digest.update(layout.header)
    digest.update((index or "").encode())
    planned = digest.hexdigest()[:16]
    steps = ("created", "published") if sync.me == 0 else ("planned", "written")
    try:
        if sync.me == 0:
            return _lead(sync, writer, path, files, index, arrays, planned, single=limit is None)
        sync.post("planned", planned)
        paths = [Path(name) for name in json.loads(sync.wait("created", range(1))[0])]
        stats = _write_share(writer, sync, paths, files, arrays)
        sync.post("written")
        sync.wait("published", range(1))
        return stats
    except BaseException as error:
        sync.fail(steps, error)
        raise


def _lead(
    sync: _Rendezvous,
    writer: FormatWriter,
    path: Path,
    files: list[FileLayout],
    index: str | None,
    arrays: dict[str, Any],
    planned: str,
    *,
    single: bool,
) -> SaveStats:
    """Process 0's side of `_save_distributed`, inside the staging protocol."""
    done: list[SaveStats] = []

    def fill(folder: Path, names: list[str]) -> None:
        digests = sync.wait("planned", range(1, sync.count))
        if any(other != planned for other in digests):
            listing = ", ".join(f"process {p}: {d}" for p, d in enumerate([planned, *digests]))
            sync.peer_errors.append(f"the processes lay out different checkpoints ({listing}).")
            raise sync.error("Every process must save the same tree (names, dtypes, shapes, scalars).")
        paths = [folder / name for name in names]
        header = 0
        for layout, target in zip(files, paths, strict=True):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.pwrite(fd, layout.header, 0)
                os.ftruncate(fd, layout.size)
            finally:
                os.close(fd)
            header += len(layout.header)
        if index is not None:
            with open(folder / INDEX_NAME, "w", encoding="utf-8") as handle:
                handle.write(index)
                handle.flush()
                os.fsync(handle.fileno())
            header += len(index.encode())
        sync.post("created", json.dumps([str(target) for target in paths]))
        stats = _write_share(writer, sync, paths, files, arrays)
        sync.wait("written", range(1, sync.count))
        done.append(SaveStats(stats.tensor_bytes, header, stats.pieces))

    if single:
        write_atomically(path, lambda staged: fill(staged.parent, [staged.name]))
    else:
        with staging(path) as stage:
            stage.expect_folder()
            stage.doing = "writing the weights"
            fill(stage.folder, [layout.name for layout in files])
            publish_folder(stage, replaced=previous_weight_files(stage.target))
    sync.post("published")
    return done[0]


def _write_share(
    writer: FormatWriter,
    sync: _Rendezvous,
    paths: list[Path],
    files: list[FileLayout],
    arrays: dict[str, Any],
) -> SaveStats:
    """Writes this process's bytes into the created files and fsyncs them: the blocks of sharded arrays
    whose lowest-numbered holder is this process, and, on process 0, the arrays every process holds
    whole (numpy arrays, single-process `jax.Array`s)."""
    written = pieces = 0
    for target, layout in zip(paths, files, strict=True):
        try:
            out = open(target, "r+b")  # noqa: SIM115 - closed below, after the fsync
        except FileNotFoundError as error:
            raise CheckpointWriteError(
                f"Saving to {sync.path} failed: process {sync.me} cannot see {target}, which process 0 "
                f"created. A multi-process save needs a folder on a file system every process shares.",
                file=sync.path,
            ) from error
        with out:
            try:
                for name, offset in layout.offsets.items():
                    count, parts = _write_owned(writer, out, arrays[name], offset, sync.me)
                    written += count
                    pieces += parts
                out.flush()
                os.fsync(out.fileno())
            except CheckpointWriteError:
                raise
            except OSError as error:
                raise write_error(sync.path, f"process {sync.me} was writing its shards", error) from error
    return SaveStats(written, 0, pieces)


def _write_owned(writer: FormatWriter, out: BinaryIO, value: Any, offset: int, me: int) -> tuple[int, int]:
    """Writes what process ``me`` owns of one tensor (an array or a `_Layer`) at ``offset``: (bytes, pieces)."""
    spec = spec_of("", value)
    spread = _is_spread(value)
    if spread and spec.dtype.is_packed:  # float4 shards split bytes: gathered, in step
        value, spread = _gathered(value), False
    array, layer = _source(value)
    local = isinstance(array, jax.Array) and len(array.sharding.device_set) > 1 and not spec.dtype.is_packed
    if spread or (local and me == 0):
        return _write_blocks_owned(writer, out, array, spec, offset, me, layer)
    if me != 0:
        return 0, 0
    out.seek(offset)
    writer.write_array(out, _host_layer(value) if isinstance(value, _Layer) else value)
    out.flush()
    return spec.nbytes, 1


def _write_blocks_owned(
    writer: FormatWriter,
    out: BinaryIO,
    array: jax.Array,
    spec: TensorSpec,
    offset: int,
    me: int,
    layer: int | None = None,
) -> tuple[int, int]:
    """The blocks of a sharded array (or of its layer ``layer``: the rows of the shards that hold it) whose
    lowest-numbered holding process is ``me`` (a replicated block is written once, by one process), each
    run with ``pwrite`` at its place in the file."""
    shape = tuple(array.shape)
    plan, rows = _plan_blocks(spec, shape, array.sharding.devices_indices_map(shape), layer)
    local = {shard.device: shard for shard in array.addressable_shards}
    written = pieces = 0
    for block in plan.blocks:
        if min(cast(jax.Device, device).process_index for device in block.devices) != me:
            continue
        device = next(device for device in block.devices if device in local)
        _put_block(writer, out, _block_bytes(local[device].data, rows[device]), block, offset)
        written += block.nbytes
        pieces += 1
    return written, pieces


def _put_block(writer: FormatWriter, out: BinaryIO, data: np.ndarray, block: BlockRead, offset: int) -> None:
    """Writes a block's C-contiguous bytes to its runs in a tensor starting at ``offset`` in ``out``."""
    if block.num_runs == 1:
        writer.write_at(out, data, offset + block.offset)
        return
    for number, (start, length) in enumerate(block.runs()):
        writer.write_at(out, data[number * length : (number + 1) * length], offset + start)
