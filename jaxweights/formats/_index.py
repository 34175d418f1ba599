"""What every multi-file format shares: JSON indexes (``*.index.json``), the merge of several files into
one catalogue, and a garbage-collector pause while large headers are parsed. No jax, no format of its own.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, DuplicateTensorError
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat

__all__ = ["DuplicateKeyError", "ReadFile", "gc_paused", "open_files", "read_index", "reject_duplicate_keys"]

ReadFile = Callable[[Path], tuple[list[TensorInfo], Mapping[str, Any], int]]
"""Parses one file: its tensors, its metadata and the file size the validation saw."""


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` ``object_pairs_hook`` that refuses a key named twice (readers would disagree)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result


class DuplicateKeyError(Exception):
    """A JSON object names a key twice (raised by `reject_duplicate_keys`, caught by the callers)."""

    def __init__(self, key: str) -> None:
        self.key = key


def read_index(index_path: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as error:
        raise CheckpointError(
            f"{index_path} names {error.key!r} twice; readers would disagree on which entry wins.",
            file=index_path,
            tensor=error.key,
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{index_path} is not a valid JSON index ({error}).", file=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object mapping tensor names to file names.",
            file=index_path,
        )
    folder = index_path.parent
    resolved: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        relative = PurePosixPath(file_name.replace("\\", "/"))
        if (
            not file_name
            or relative.is_absolute()
            or ".." in relative.parts
            or (len(file_name) > 1 and file_name[1] == ":")
        ):
            raise CheckpointError(
                f"{index_path} maps tensor {name!r} to {file_name!r}, which is outside the index's "
                f"folder. Index entries must be file names relative to {folder}.",
                file=index_path,
                tensor=name,
            )
        resolved[name] = folder.joinpath(*relative.parts)
    metadata = index.get("metadata")
    return resolved, metadata if isinstance(metadata, dict) else {}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while a header's objects are built.

    A 10,000-tensor header makes tens of thousands of containers; with jax loaded, the collections they
    trigger scan jax's own objects and cost 4-5x the parse itself. The objects built here hold no cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def open_files(paths: Sequence[Path], kind: WeightsFormat, read: ReadFile) -> Checkpoint:
    """One catalogue over a format's files and JSON indexes (``*.index.json``: a ``weight_map`` from tensor
    names to file names in the index's folder), each file parsed by ``read``.

    Raises:
        DuplicateTensorError: a name appears in two files and no index says which holds it, or two
            indexes disagree.
        CheckpointNotFoundError: an index names a file that does not exist.
        CheckpointError: an index names a tensor its file lacks; any file is malformed.
    """
    files: list[Path] = []
    owner: dict[str, Path] = {}  # what an index says holds each name
    metadata: dict[str, Any] = {}
    for path in paths:
        if path.name.endswith(".json"):
            weight_map, index_metadata = read_index(path)
            for name, file in weight_map.items():
                if name in owner and owner[name] != file:
                    raise DuplicateTensorError(
                        f"Two indexes disagree on tensor {name!r}: {owner[name]} and {file}.",
                        file=path,
                        tensor=name,
                    )
                owner[name] = file
                if file not in files:
                    if not file.is_file():
                        raise CheckpointNotFoundError(
                            f"{path} maps tensor {name!r} to {file.name}, which does not exist in "
                            f"{file.parent}. Download the missing shard.",
                            file=file,
                            tensor=name,
                        )
                    files.append(file)
            metadata.update(index_metadata)
        elif path not in files:
            files.append(path)

    tensors: dict[str, TensorInfo] = {}
    file_metadata: dict[Path, Mapping[str, Any]] = {}
    file_sizes: dict[Path, int] = {}
    for file in files:
        infos, file_meta, file_sizes[file] = read(file)
        file_metadata[file] = file_meta
        for key, value in file_meta.items():
            metadata.setdefault(key, value)
        for info in infos:
            claimed = owner.get(info.name)
            if claimed is not None and claimed != file:
                continue  # the index says another file holds this name
            if info.name in tensors and claimed is None:
                raise DuplicateTensorError(
                    f"Tensor {info.name!r} is in both {tensors[info.name].file} and {file}, and no "
                    f"index.json says which to use. Remove one file, or load through the index.",
                    file=file,
                    tensor=info.name,
                )
            tensors[info.name] = info
    for name, file in owner.items():
        if name not in tensors:
            raise CheckpointError(
                f"The index maps tensor {name!r} to {file}, but that file has no such tensor. The "
                f"index and shards come from different saves; download them again.",
                file=file,
                tensor=name,
            )
    return Checkpoint(
        kind,
        tensors,
        files,
        metadata=metadata,
        file_metadata=file_metadata,
        file_sizes=file_sizes,
        sources=tuple(paths),
    )
