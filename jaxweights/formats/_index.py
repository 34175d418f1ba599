"""What the format parsers share: strict JSON decoding and JSON indexes (``*.index.json``), the limits a
stored shape must respect, the merge of several files into one catalogue, and a garbage-collector pause
while large headers are parsed. No jax, no format of its own; never reads tensor bytes.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointReadError, DuplicateTensorError
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat
from ._files import open_regular

__all__ = [
    "DuplicateKeyError",
    "LoneSurrogateError",
    "ReadFile",
    "gc_paused",
    "loads_strict",
    "open_files",
    "read_index",
]

ReadFile = Callable[[Path], tuple[list[TensorInfo], Mapping[str, Any], int]]
"""Parses one file: its tensors, its metadata and the file size the validation saw."""

# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (readers would disagree on which value wins).

    Attributes:
        key: the repeated key.
        owner: the top-level key whose value holds that object; None for the top-level object itself.
    """

    def __init__(self, key: str, owner: str | None) -> None:
        super().__init__(key)
        self.key = key
        self.owner = owner


class LoneSurrogateError(ValueError):
    """A JSON string escapes half of a UTF-16 surrogate pair (``"\\ud800"``): not Unicode text, which
    strict decoders (serde_json, and so the safetensors crate) refuse and no file system or terminal can
    encode. ``text`` is the string."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads_strict(text: str) -> Any:
    """`json.loads`, refusing a key named twice in any object and a string holding a lone surrogate.

    The C decoder runs first. Every key in the text is followed by a ``:``, so when the text holds no more
    colons than the decoded value has keys in its top two levels, no key was dropped as a duplicate (and
    no object lies deeper). Otherwise (a colon inside a string, a deeper object, or a duplicate) the text
    is decoded again with a hook that notes any object whose pairs outnumber its keys. Surrogates are
    looked for only when the text escapes one (Python decodes a valid pair into one character).

    Raises:
        DuplicateKeyError: an object names a key twice.
        LoneSurrogateError: a key or a string value holds an unpaired surrogate.
        ValueError: not JSON (`json.JSONDecodeError`), or a number past Python's int-digit limit.
        RecursionError: nesting deeper than the interpreter can decode.

    Example:
        >>> loads_strict('{"a": {"b": 1}}')
        {'a': {'b': 1}}
        >>> loads_strict('{"a": {"b": 1, "\\\\u0062": 2}}')
        Traceback (most recent call last):
        jaxweights.formats._index.DuplicateKeyError: b
    """
    value = json.loads(text)
    if not _keys_all_counted(text, value):
        repeated: list[tuple[dict[str, Any], str]] = []

        def note(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            result = dict(pairs)
            if len(result) != len(pairs) and not repeated:
                repeated.append((result, _first_repeated(pairs)))
            return result

        value = json.loads(text, object_pairs_hook=note)
        if repeated:
            holder, key = repeated[0]
            raise DuplicateKeyError(key, _owner(value, holder))
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        lone = _first_lone_surrogate(value)
        if lone is not None:
            raise LoneSurrogateError(lone)
    return value


def _first_repeated(pairs: list[tuple[str, Any]]) -> str:
    """The first key of ``pairs`` seen before (called only when one was)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            break
        seen.add(key)
    return key


def _keys_all_counted(text: str, value: Any) -> bool:
    if type(value) is not dict:
        return False
    keys = len(value) + sum(len(child) for child in value.values() if type(child) is dict)
    return text.count(":") == keys


def _containers(value: Any) -> Iterator[Any]:
    """Every dict and list inside ``value`` (itself included), depth first, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            yield item
            stack.extend(item.values())
        elif type(item) is list:
            yield item
            stack.extend(item)


def _owner(value: Any, holder: dict[str, Any]) -> str | None:
    """The top-level key of ``value`` under which ``holder`` lies (None: ``holder`` is ``value``)."""
    if type(value) is dict and value is not holder:
        for name, child in value.items():
            if any(inner is holder for inner in _containers(child)):
                return str(name)
    return None


def _first_lone_surrogate(value: Any) -> str | None:
    if type(value) is str:
        return value if _SURROGATE.search(value) else None
    for container in _containers(value):
        strings = [*container, *container.values()] if type(container) is dict else container
        for item in strings:
            if type(item) is str and _SURROGATE.search(item):
                return item
    return None


# ---------------------------------------------------------------------------------------------
# Indexes and several files
# ---------------------------------------------------------------------------------------------


def read_index(index_path: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The ``weight_map`` of a JSON index (tensor name -> file in the index's folder) and its
    ``metadata`` (empty when absent or not an object).

    Raises:
        CheckpointError: not UTF-8 JSON, a key named twice, a lone surrogate, no ``weight_map`` object
            of strings, or a file name that leaves the index's folder.
    """
    fd = open_regular(index_path)
    try:
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise CheckpointReadError(
            f"{index_path} cannot be read ({error.strerror or error}).", file=index_path
        ) from None
    try:
        index = loads_strict(raw.decode("utf-8"))
    except DuplicateKeyError as error:
        where = f" in {error.owner!r}" if error.owner is not None else ""
        raise CheckpointError(
            f"{index_path} names {error.key!r} twice{where}; readers would disagree on which entry wins.",
            file=index_path,
            tensor=error.key,
        ) from None
    except LoneSurrogateError as error:
        raise CheckpointError(
            f"{index_path} holds the string {error.text!r:.200}, which escapes half of a UTF-16 surrogate "
            f"pair: it is not text. Write the index again.",
            file=index_path,
        ) from None
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{index_path} is not a valid JSON index ({error}).", file=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object mapping tensor names to file names.",
            file=index_path,
        )
    resolved: dict[str, Path] = {}
    relatives: dict[str, Path] = {}  # an index names a few files for many tensors
    for name, file_name in weight_map.items():
        file = relatives.get(file_name)
        if file is None:
            file = relatives[file_name] = _index_entry(index_path, name, file_name)
        resolved[name] = file
    metadata = index.get("metadata")
    return resolved, metadata if isinstance(metadata, dict) else {}


def _index_entry(index_path: Path, name: str, file_name: str) -> Path:
    relative = PurePosixPath(file_name.replace("\\", "/"))
    folder = index_path.parent
    if (
        not file_name
        or relative.is_absolute()
        or ".." in relative.parts
        or (len(file_name) > 1 and file_name[1] == ":")
    ):
        raise CheckpointError(
            f"{index_path} maps tensor {name!r} to {file_name!r}, which is outside the index's folder. "
            f"Index entries must be file names relative to {folder}.",
            file=index_path,
            tensor=name,
        )
    if "\0" in file_name or not relative.parts:
        raise CheckpointError(
            f"{index_path} maps tensor {name!r} to {file_name!r}, which is not a file name.",
            file=index_path,
            tensor=name,
        )
    return folder.joinpath(*relative.parts)


def _check_shard(index_path: Path, name: str, file: Path) -> None:
    """Refuses a file an index names that does not exist or cannot be looked at (a name too long for
    the file system, a path through a file); what it is (a folder, a pipe) is checked when it is read."""
    try:
        os.stat(file)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CheckpointNotFoundError(
                f"{index_path} maps tensor {name!r} to {file.name}, which does not exist in {file.parent}. "
                f"Download the missing shard.",
                file=file,
                tensor=name,
            ) from None
        raise CheckpointReadError(
            f"{index_path} maps tensor {name!r} to {str(file.name)[:100]!r}, which cannot be looked up "
            f"({error.strerror or error}). Fix the index's weight_map.",
            file=index_path,
            tensor=name,
        ) from None


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

    Linear in the number of files and tensors: an index of 16,000 one-tensor shards opens in the time
    its headers take to parse.

    Raises:
        DuplicateTensorError: a name appears in two files and no index says which holds it, or two
            indexes disagree.
        CheckpointNotFoundError: an index names a file that does not exist.
        CheckpointError: an index names a tensor its file lacks; any file is malformed.
    """
    files: dict[Path, None] = {}  # an ordered set
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
                    _check_shard(path, name, file)
                    files[file] = None
            metadata.update(index_metadata)
        else:
            files.setdefault(path, None)

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
        list(files),
        metadata=metadata,
        file_metadata=file_metadata,
        file_sizes=file_sizes,
        sources=tuple(paths),
    )
