"""Checkpoint formats: `open_checkpoint(paths)` sniffs each file's magic bytes and builds a `Checkpoint`.

Every format module has the same small surface (open, read header, save) and none imports jax.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from .._buffers import ALIGNMENT, aligned_empty
from ..errors import CheckpointError, CheckpointNotFoundError, UnsupportedFormatError
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat
from .safetensors import iter_weight_files, open_safetensors

__all__ = [
    "ALIGNMENT",
    "Checkpoint",
    "PathsLike",
    "TensorInfo",
    "WeightsFormat",
    "aligned_empty",
    "expand_paths",
    "open_checkpoint",
    "sniff_format",
]

PathsLike = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

_INDEX = "index"  # a JSON index (model.safetensors.index.json): not a weights format of its own


def expand_paths(paths: PathsLike) -> list[Path]:
    """Normalises a path, a folder or a list of them into the files to open, checking each exists."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise CheckpointNotFoundError(
            "No checkpoint paths were given. Pass a file, a folder, an index.json, or a list of files."
        )
    result: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = list(iter_weight_files(path))
            if not found:
                listing = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
                raise CheckpointNotFoundError(
                    f"{path} holds no *.safetensors file or *.safetensors.index.json (it holds: "
                    f"{listing}). Pass the weight files themselves.",
                    file=path,
                )
            result.extend(found)
        elif path.is_file():
            result.append(path)
        elif path.exists():
            raise CheckpointError(
                f"{path} is not a regular file (a device, pipe or socket); pass a checkpoint file.",
                file=path,
            )
        else:
            raise CheckpointNotFoundError(f"{path} does not exist. Check the path.", file=path)
    return result


def sniff_format(path: Path) -> WeightsFormat | str:
    """The format of one file from its first bytes, not its suffix (``"index"`` for a JSON index)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"GGUF":
        return WeightsFormat.gguf
    if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return WeightsFormat.pytorch
    is_json = head.lstrip()[:1] == b"{"
    if is_json and path.suffix == ".json":
        return _INDEX
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0:
        return WeightsFormat.safetensors
    if is_json:
        return _INDEX
    if path.suffix == ".safetensors" or len(head) < 9:
        return WeightsFormat.safetensors  # let the safetensors parser say precisely what is wrong
    raise UnsupportedFormatError(
        f"{path} is not a safetensors, GGUF or PyTorch file (it starts with {head[:8]!r}).",
        file=path,
    )


def _formats(files: list[Path]) -> WeightsFormat:
    found = {path: sniff_format(path) for path in files}
    kinds = {WeightsFormat.safetensors if f == _INDEX else f for f in found.values()}
    if len(kinds) > 1:
        listing = ", ".join(f"{p.name} ({getattr(f, 'value', f)})" for p, f in found.items())
        raise UnsupportedFormatError(
            f"The paths mix formats: {listing}. Load each format separately.", file=files[0]
        )
    kind = kinds.pop()
    assert isinstance(kind, WeightsFormat)
    return kind


def weights_format(paths: PathsLike) -> WeightsFormat:
    """The `WeightsFormat` of a checkpoint, sniffed from magic bytes.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.zeros(2, np.float32)}, f"{tempfile.mkdtemp()}/m.bin")
        >>> jw.weights_format(path)
        <WeightsFormat.safetensors: 'safetensors'>
    """
    return _formats(expand_paths(paths))


def open_checkpoint(paths: PathsLike) -> Checkpoint:
    """Opens files, folders or an index as one `Checkpoint`, validating every header first.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.arange(6, dtype=np.int16).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> with jw.open_checkpoint(path) as checkpoint:
        ...     info = checkpoint["w"]
        ...     (info.dtype, info.shape, info.nbytes, checkpoint.view(info).tolist())
        (<DType.int16>, (2, 3), 12, [[0, 1, 2], [3, 4, 5]])
    """
    files = expand_paths(paths)
    kind = _formats(files)
    if kind is WeightsFormat.safetensors:
        return open_safetensors(files)
    raise UnsupportedFormatError(
        f"{files[0]} is a {kind.value} checkpoint; this version of jaxweights reads safetensors only. "
        f"Convert it (for example with the `gguf` or `safetensors` tools) or upgrade jaxweights.",
        file=files[0],
    )
