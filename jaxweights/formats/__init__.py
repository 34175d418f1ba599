"""Checkpoint formats: the registry `FORMATS`, and `open_checkpoint(paths)`, which sniffs each file's
magic bytes and lets that format's plug-in build a `Checkpoint`.

Every format module has the same small surface, a `FormatPlugin`: recognise its magic bytes, list its
files in a folder, open them, optionally write. Adding a format is one module and one line in `FORMATS`.
This module never parses a format itself, and no format module imports jax.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from .._buffers import ALIGNMENT, aligned_empty
from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointReadError, UnsupportedFormatError
from . import gguf, safetensors, torch
from ._checkpoint import NATIVE_ORDER, Checkpoint, TensorInfo, WeightsFormat
from ._files import open_regular, read_prefix
from ._plugin import FormatPlugin, FormatWriter, TensorSpec, WriteTensor, spec_of

__all__ = [
    "ALIGNMENT",
    "FORMATS",
    "HEAD_SIZE",
    "NATIVE_ORDER",
    "Checkpoint",
    "FormatPlugin",
    "FormatWriter",
    "PathsLike",
    "TensorInfo",
    "TensorSpec",
    "WeightsFormat",
    "WriteTensor",
    "aligned_empty",
    "expand_paths",
    "open_checkpoint",
    "plugin_for",
    "sniff_format",
    "spec_of",
    "weights_format",
]

PathsLike = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

HEAD_SIZE = 16
"""Bytes of each file a plug-in's ``sniff`` sees."""


FORMATS: tuple[FormatPlugin, ...] = (safetensors.PLUGIN, gguf.PLUGIN, torch.PLUGIN)
"""The registry, in order of preference: sniffing asks each plug-in in turn, and a folder holding files of
several formats (``model.safetensors`` and ``pytorch_model.bin``) is read as the first that finds any."""


def plugin_for(name: WeightsFormat | str) -> FormatPlugin:
    """The registered plug-in of a format.

    Example:
        >>> plugin_for("safetensors").title, plugin_for(WeightsFormat.pytorch).title
        ('safetensors', 'PyTorch')
    """
    for plugin in FORMATS:
        if plugin.name == name:
            return plugin
    known = ", ".join(plugin.name for plugin in FORMATS)
    raise UnsupportedFormatError(f"{name!r} is not a checkpoint format jaxweights knows ({known}).")


def _titles() -> str:
    titles = [plugin.title for plugin in FORMATS]
    return ", ".join(titles[:-1]) + f" or {titles[-1]}" if len(titles) > 1 else titles[0]


def _expand_folder(folder: Path) -> list[Path]:
    try:
        for plugin in FORMATS:
            found = plugin.files_in(folder)
            if found:
                return found
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    except OSError as error:
        raise CheckpointReadError(
            f"{folder} cannot be listed ({error.strerror or error}); check its permissions.", file=folder
        ) from None
    patterns = ", ".join(f"*{suffix}" for plugin in FORMATS for suffix in plugin.suffixes)
    raise CheckpointNotFoundError(
        f"{folder} holds no weight files (looked for {patterns}); it holds: {listing}.{_orbax_hint(folder)} "
        f"Pass the weight files themselves.",
        file=folder,
    )


def expand_paths(paths: PathsLike) -> list[Path]:
    """Normalises a path, a folder or a list of them into the files to open, checking each exists.

    A folder is asked of each plug-in in `FORMATS` order; the first that finds its files there wins.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> folder = jw.save({"w": np.zeros(2, np.float32)}, f"{tempfile.mkdtemp()}/ckpt")
        >>> [path.name for path in expand_paths(folder)]
        ['model.safetensors']
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise CheckpointNotFoundError(
            "No checkpoint paths were given. Pass a file, a folder, an index.json, or a list of files."
        )
    result: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            result.extend(_expand_folder(path))
        elif path.is_file():
            result.append(path)
        elif path.exists():
            raise CheckpointError(
                f"{path} is not a regular file (a device, pipe or socket); pass a checkpoint file.",
                file=path,
            )
        else:
            if os.path.lexists(path):  # a broken symlink or a loop: say which
                os.close(open_regular(path))
            raise CheckpointNotFoundError(f"{path} does not exist. Check the path.", file=path)
    return result


def sniff_format(path: Path) -> FormatPlugin:
    """The plug-in for one file, from its first bytes rather than its suffix.

    Every plug-in's ``sniff`` is asked in `FORMATS` order; when several recognise the bytes, one whose
    suffix the file has wins (a JSON index: ``*.safetensors.index.json`` or ``*.bin.index.json``). A
    file none recognises goes to the readable format whose suffix it has, so that parser names what is
    wrong with it (a truncated ``*.safetensors``); otherwise it is refused.

    Raises:
        UnsupportedFormatError: no registered format recognises the file.
    """
    head = read_prefix(path, HEAD_SIZE)
    impostor = _impostor(head)
    if impostor is not None:
        raise UnsupportedFormatError(f"{path} is not a checkpoint: it is {impostor}.", file=path)
    recognised = [plugin for plugin in FORMATS if plugin.sniff(head, path)]
    for plugin in recognised:
        if plugin.owns(path):
            return plugin
    if recognised:
        return recognised[0]
    for plugin in FORMATS:
        if plugin.open is not None and plugin.owns(path):
            return plugin
    start = f"it starts with {head[:8]!r}" if head else "it is empty"
    raise UnsupportedFormatError(f"{path} is not a {_titles()} file ({start}).", file=path)


def _impostor(head: bytes) -> str | None:
    """What a file that is not a checkpoint is, from its first bytes, when it is a usual mistake (an
    empty file is left to the format's parser, which says so).

    Example:
        >>> _impostor(b"version https://git-lfs.github.com/spec/v1"[:16]), _impostor(b"PK")
        ('a Git LFS pointer, not the file it points to: run `git lfs pull` (or download the file)', None)
    """
    if head.startswith(b"version https://"):
        return "a Git LFS pointer, not the file it points to: run `git lfs pull` (or download the file)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")):
        return "an HTML page (a web page saved instead of the file: download the file itself)"
    return None


_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding")


def _orbax_hint(folder: Path) -> str:
    if any((folder / marker).exists() for marker in _ORBAX_MARKERS):
        return (
            " It is an Orbax checkpoint: restore it with orbax.checkpoint, then jw.save the tree to read it "
            "with jaxweights."
        )
    return ""


def _plugin(files: list[Path]) -> FormatPlugin:
    found = {path: sniff_format(path) for path in files}
    plugins = set(found.values())
    if len(plugins) > 1:
        listing = ", ".join(f"{path.name} ({plugin.title})" for path, plugin in found.items())
        raise UnsupportedFormatError(
            f"The paths mix formats: {listing}. Load each format separately.", file=files[0]
        )
    return plugins.pop()


def weights_format(paths: PathsLike) -> WeightsFormat:
    """The `WeightsFormat` of a checkpoint, sniffed from magic bytes.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.zeros(2, np.float32)}, f"{tempfile.mkdtemp()}/m.bin")
        >>> jw.weights_format(path)
        <WeightsFormat.safetensors: 'safetensors'>
    """
    return _plugin(expand_paths(paths)).name


def open_checkpoint(paths: PathsLike, *, mmap: bool = True) -> Checkpoint:
    """Opens files, folders or an index as one `Checkpoint`, validating every header first.

    With ``mmap=False`` no file page is ever mapped: every read copies with `preadv` into memory
    jaxweights owns (`Checkpoint.mapped`), for network filesystems and for files that may be rewritten
    in place while arrays made from them are alive.

    Raises:
        UnsupportedFormatError: a file is in no format jaxweights reads, or the paths mix formats.
        UnsafeCheckpointError: a PyTorch pickle asks to run code (nothing is run).

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.arange(6, dtype=np.int16).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> with jw.open_checkpoint(path) as checkpoint:
        ...     info = checkpoint["w"]
        ...     (info.dtype, info.shape, info.nbytes, checkpoint.view(info).tolist())
        (<DType.int16>, (2, 3), 12, [[0, 1, 2], [3, 4, 5]])
    """
    files = expand_paths(paths)
    plugin = _plugin(files)
    if plugin.open is None:
        readable = ", ".join(p.title for p in FORMATS if p.open is not None)
        raise UnsupportedFormatError(
            f"{files[0]} is a {plugin.title} checkpoint; this version of jaxweights reads {readable} "
            f"only. Convert it to safetensors, or upgrade jaxweights.",
            file=files[0],
        )
    checkpoint = plugin.open(files)
    checkpoint.mapped = mmap
    return checkpoint
