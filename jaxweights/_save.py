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

The bytes and the file layout come from the safetensors plug-in's `FormatWriter`; this module owns the
tree, the multi-process protocol and which files a save replaces, and never writes a format's bytes or
renames a file itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np

from ._plan import plan_reads
from ._pytree import LEAVES_KEY, SCALAR_TYPES, flatten_target, is_array_like, split_module
from ._staging import publish_folder, staging, write_atomically, write_error
from .errors import ArgumentError, CheckpointWriteError, StructureMismatchError
from .formats import FormatWriter, TensorInfo, TensorSpec, WeightsFormat, plugin_for, spec_of
from .formats.safetensors import INDEX_NAME

__all__ = ["parse_size", "previous_weight_files", "save"]


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


def _write_value(writer: FormatWriter, out: BinaryIO, value: Any) -> None:
    """Writes one leaf; a sharded array is written block by block (one host copy of a shard at a time)."""
    if isinstance(value, jax.Array):
        if not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        elif len(value.sharding.device_set) > 1 and _write_blocks(writer, out, value):
            return
    writer.write_array(out, value)


def _write_blocks(writer: FormatWriter, out: BinaryIO, array: jax.Array) -> bool:
    """Writes each distinct block of a sharded array at its offsets with ``pwrite``; False when the blocks
    are strided (column shards), which are better gathered whole."""
    spec = spec_of("", array)
    if spec.dtype.is_packed:
        return False
    info = TensorInfo("", spec.dtype, spec.shape, Path(), 0, spec.nbytes)
    shards = {shard.device: shard for shard in array.addressable_shards}
    plan = plan_reads(info, {device: shard.index for device, shard in shards.items()})
    if any(block.num_runs > 1 for block in plan.blocks):
        return False
    base = out.tell()
    out.flush()
    for block in plan.blocks:
        data = np.ascontiguousarray(np.asarray(shards[block.devices[0]].data)).reshape(-1).view(np.uint8)
        writer.write_at(out, data, base + block.offset)
    out.seek(base + spec.nbytes)
    return True


def save(
    tree: Any,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
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

    Returns:
        The folder or file written.

    A save into an existing folder replaces only the previous checkpoint's own files and carries the
    others over (``config.json``, tokenizers, unrelated ``*.safetensors``); a symlinked ``path`` stays a
    symlink and what it points to is replaced. Files get ``0666 & ~umask``, a new folder ``0777 & ~umask``;
    an existing folder keeps its mode. Temporary entries that killed saves of the same target left are
    removed first.

    Raises:
        CheckpointWriteError: the folder is read-only, the disk is full, ``path`` is a file where a
            folder is expected (or a folder where a file is): it names the step that failed and a fix;
            the previous checkpoint is left whole and no temporary entry remains.
        StructureMismatchError: a leaf is abstract (a `ShapeDtypeStruct`) or of a type that cannot be stored.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> folder = jw.save({"params": {"w": jnp.ones((2, 2))}, "step": 7}, f"{tempfile.mkdtemp()}/ckpt")
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors']
        >>> jw.load_weights(folder).restore({"params": {"w": jnp.zeros((2, 2))}, "step": 0})["step"]
        7
    """
    path = Path(path)
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
    try:
        if not primary:  # other processes of a job take part in process 0's gathers, in its order
            for spec in writer.write_order(specs, None if single else limit):
                value = arrays[spec.name]
                if isinstance(value, jax.Array) and not value.is_fully_addressable:
                    from jax.experimental import multihost_utils

                    multihost_utils.process_allgather(value, tiled=True)
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
