"""Save a pytree as safetensors: one file, or shards plus a standard ``model.safetensors.index.json``.

Writes are atomic: a folder checkpoint is written into a temporary sibling folder and swapped in with one
``renameat2(RENAME_EXCHANGE)`` (other files of the folder, such as ``config.json``, are carried over), so a
crash or kill leaves the previous checkpoint whole. Sharded arrays are written shard by shard (replicated
blocks once), so host memory stays near one shard; the caller's tree is never modified. Non-array leaves
(step counters, flags) are stored as JSON in the metadata.

The bytes and the file layout come from the safetensors plug-in's `FormatWriter`; this module owns the
tree, the multi-process protocol and the atomic folder swap, and never writes a format's bytes itself.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np

from ._libc import fsync_dir, libc
from ._plan import plan_reads
from ._pytree import LEAVES_KEY, SCALAR_TYPES, flatten_target, is_array_like, split_module
from .errors import ArgumentError, CheckpointWriteError, StructureMismatchError
from .formats import FormatPlugin, FormatWriter, TensorInfo, TensorSpec, WeightsFormat, plugin_for, spec_of

__all__ = ["parse_size", "save"]


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


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, or None where the C library lacks it (not Linux, old glibc)."""
    lib = libc()
    if lib is None or not hasattr(lib, "renameat2"):
        return None
    function = lib.renameat2
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    Raises:
        CheckpointWriteError: the swap failed for another reason; neither path changed.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False
    raise CheckpointWriteError(
        f"Saving to {second} failed: swapping in the new checkpoint from {first} was refused "
        f"({os.strerror(code)}). Nothing was replaced; check the folder's permissions.",
        file=second,
    )


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

    Raises:
        CheckpointWriteError: the folder is read-only, the disk is full, or ``path`` is a file where a
            folder is expected; the previous checkpoint is left whole and no temporary file remains.
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
            if path.is_dir():
                raise CheckpointWriteError(
                    f"{path} is a folder; pass a new file name or the folder itself.", file=path
                )
            writer.write_file(path, specs, write, info or None)
        else:
            _save_folder(plugin, writer, path, specs, write, info, limit)
        _barrier(path)
        return path
    except CheckpointWriteError:
        raise
    except OSError as error:
        raise CheckpointWriteError(
            f"Saving to {path} failed: {error.strerror or error}. Nothing was replaced and no temporary file "
            f"was left; free space or choose a writable folder.",
            file=path,
        ) from error


def _barrier(path: Path) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxweights.save:{path}")


def _save_folder(
    plugin: FormatPlugin,
    writer: FormatWriter,
    path: Path,
    specs: list[TensorSpec],
    write: Any,
    info: dict[str, str],
    limit: int,
) -> Path:
    if path.exists() and not path.is_dir():
        raise CheckpointWriteError(
            f"{path} is a file, but a checkpoint folder was expected. Pass another path, or a *.safetensors "
            f"file name to write a single file.",
            file=path,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".saving", dir=path.parent))
    try:
        writer.write_folder(temp, specs, write, info or None, limit)
        fsync_dir(temp)
        if path.is_dir():
            for item in path.iterdir():  # carry over config.json, tokenizer files, ...
                if not plugin.owns(item):
                    target = temp / item.name
                    if item.is_dir():
                        shutil.copytree(item, target, symlinks=True)
                    else:
                        try:
                            os.link(item, target)
                        except OSError:
                            shutil.copy2(item, target)
            fsync_dir(temp)
            if _exchange(temp, path):
                fsync_dir(path.parent)
                shutil.rmtree(temp, ignore_errors=True)  # temp now holds the previous checkpoint
                return path
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(temp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
            return path
        os.rename(temp, path)
        fsync_dir(path.parent)
        return path
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
