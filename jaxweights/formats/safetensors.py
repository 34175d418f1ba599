"""Safetensors: header parser and validator, multi-file and ``index.json`` catalogues, and a writer.

Registered as `PLUGIN` in `jaxweights.formats`: it recognises safetensors files and their JSON indexes
(``*.safetensors.index.json``), lists them in a folder (the index preferred), opens them as one
`Checkpoint`, and writes single files or shards plus an index (`WRITER`).

The header is parsed and validated in full before any tensor byte is touched: header length within
the file, a UTF-8 JSON object without duplicate keys (at any level) or lone surrogates, ``__metadata__``
absent, null or mapping strings to strings, known dtypes, shapes of non-negative integers that numpy can
hold (at most 64 dimensions, non-zero dimensions multiplying to at most 2**60), offsets inside the data
section that do not overlap and whose length equals shape x dtype. Never imports jax.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from .._buffers import ALIGNMENT
from .._dtypes import DTYPE_TO_SAFETENSORS, SAFETENSORS_TO_DTYPE, DType, pack_nibbles
from .._libc import fsync_dir
from .._shapes import element_count, shape_problem
from .._staging import write_atomically
from ..errors import (
    ArgumentError,
    CheckpointError,
    CheckpointReadError,
    UnsupportedFormatError,
)
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat, first_overlap
from ._files import open_regular
from ._index import DuplicateKeyError, LoneSurrogateError, gc_paused, loads_strict, open_files
from ._plugin import FormatPlugin, FormatWriter, TensorSpec, WriteTensor, spec_of

__all__ = [
    "INDEX_NAME",
    "FileLayout",
    "PLUGIN",
    "TensorSpec",
    "WRITER",
    "WriteTensor",
    "fsync_dir",
    "index_text",
    "open_safetensors",
    "plan_files",
    "read_header",
    "save_file",
    "sniff",
    "spec_of",
    "weight_files",
    "write_array",
    "write_at",
    "write_file",
    "write_folder",
    "write_order",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
"""The one-file checkpoint's name in a folder (Hugging Face's ``SAFE_WEIGHTS_NAME``)."""
INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_SIZE = 100_000_000  # the limit the reference implementation enforces


def _hint_close(path: Path) -> str:
    return f"{path} is not a valid safetensors file"


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str], int]:
    """Parses and validates one file's header.

    Returns:
        The tensors in header order, the ``__metadata__`` dictionary (empty if absent), and the file
        size the validation saw.

    Raises:
        CheckpointError: the header is malformed; the message names the file, the tensor and the fix.
    """
    with os.fdopen(open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = _read(handle, 8, path)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{_hint_close(path)}: it has {size} bytes, fewer than the 8-byte header length. "
                f"The file is truncated; download or save it again.",
                file=path,
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(
                f"{_hint_close(path)}: its header claims {header_len} bytes but only {size - 8} follow "
                f"the length prefix. The file is truncated or not safetensors; download it again.",
                file=path,
            )
        if header_len > MAX_HEADER_SIZE:
            raise CheckpointError(
                f"{_hint_close(path)}: its header claims {header_len} bytes, over the "
                f"{MAX_HEADER_SIZE}-byte limit safetensors allows.",
                file=path,
            )
        raw = _read(handle, header_len, path)
    if len(raw) != header_len:
        raise CheckpointError(f"{_hint_close(path)}: the header ends early (file truncated).", file=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{_hint_close(path)}: its header is not UTF-8 ({error.reason} at byte {error.start}).",
            file=path,
        ) from error
    header = _decode(path, text)
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors = [_tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()]
    _check_overlaps(path, tensors)
    return tensors, metadata, size


def _read(handle: BinaryIO, count: int, path: Path) -> bytes:
    try:
        return handle.read(count)
    except OSError as error:
        raise CheckpointReadError(f"{path} cannot be read ({error.strerror or error}).", file=path) from None


def _decode(path: Path, text: str) -> dict[str, Any]:
    """The header as a JSON object, refusing duplicate keys and lone surrogates (as the safetensors
    crate's serde_json does) with the file's name and the key."""
    try:
        header = loads_strict(text)
    except DuplicateKeyError as error:
        if error.owner is None:
            where = "its header names"
        elif error.owner == "__metadata__":
            where = "its '__metadata__' names"
        else:
            where = f"the header entry of tensor {error.owner!r} names"
        raise CheckpointError(
            f"{_hint_close(path)}: {where} {error.key!r} twice; readers would disagree on which value "
            f"wins. Re-save the file.",
            file=path,
            tensor=error.key if error.owner is None else error.owner,
        ) from None
    except LoneSurrogateError as error:
        raise CheckpointError(
            f"{_hint_close(path)}: its header holds the string {error.text!r:.200}, which escapes half of a "
            f"UTF-16 surrogate pair and so is not text (the safetensors library refuses it too). Re-save "
            f"the file with valid names.",
            file=path,
        ) from None
    except (ValueError, RecursionError) as error:
        raise CheckpointError(
            f"{_hint_close(path)}: its header is not valid JSON ({error}).", file=path
        ) from None
    if type(header) is not dict:
        raise CheckpointError(
            f"{_hint_close(path)}: its header must be a JSON object, found {type(header).__name__}.",
            file=path,
        )
    return header


def _metadata(path: Path, metadata: Any) -> dict[str, str]:
    """``__metadata__``: absent or null (no metadata, as the safetensors crate reads it), else an object
    of strings."""
    if metadata is None:
        return {}
    if type(metadata) is not dict:
        raise CheckpointError(
            f"{_hint_close(path)}: '__metadata__' must map strings to strings, found "
            f"{type(metadata).__name__} {metadata!r:.100}. Re-save the file.",
            file=path,
        )
    for key, value in metadata.items():
        if type(value) is not str:
            raise CheckpointError(
                f"{_hint_close(path)}: '__metadata__' must map strings to strings; {key!r:.100} maps to "
                f"{value!r:.100}. Re-save the file (safetensors stores text only).",
                file=path,
            )
    return metadata


def _shape_text(shape: list[int]) -> str:
    text = ", ".join(str(dim) if dim < 10**30 else f"<{len(str(dim))}-digit number>" for dim in shape[:8])
    return f"[{text}{', ...' if len(shape) > 8 else ''}]"


def _entry_error(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{_hint_close(path)}: tensor {name!r} {what}", file=path, tensor=name)


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_TO_DTYPE[entry["dtype"]]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _describe(path, name, entry) from None
    if type(begin) is not int or type(end) is not int or type(shape) is not list:
        raise _describe(path, name, entry)
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise _describe(path, name, entry)
    problem = shape_problem(shape)
    if problem is not None:
        raise _entry_error(
            path,
            name,
            f"has shape {_shape_text(shape)}, which no array can have ({problem}). The header is corrupt; "
            f"download or save the file again.",
        )
    count = element_count(shape)
    if begin < 0 or end < begin or end > data_len:
        raise _entry_error(
            path,
            name,
            f"has data_offsets [{begin}, {end}] outside the data section of {data_len} bytes. The file "
            f"is truncated or its header is corrupt.",
        )
    bits = count * _BITS[dtype]
    if bits & 7:
        raise _entry_error(
            path, name, f"of {count} {dtype.name} elements does not fill whole bytes (shape {shape})."
        )
    if end - begin != bits >> 3:
        raise _entry_error(
            path,
            name,
            f"has shape {shape} and dtype {entry['dtype']}, which need {bits // 8} bytes, but data_offsets "
            f"[{begin}, {end}] hold {end - begin}.",
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _describe(path: Path, name: str, entry: Any) -> CheckpointError:
    """The precise error for an entry the fast path rejected."""
    if type(entry) is not dict:
        return _entry_error(path, name, f"must be described by a JSON object, found {entry!r:.100}.")
    code = entry.get("dtype")
    if type(code) is not str or code not in SAFETENSORS_TO_DTYPE:
        known = ", ".join(sorted(SAFETENSORS_TO_DTYPE))
        return _entry_error(path, name, f"has dtype {code!r}, which jaxweights cannot read (known: {known}).")
    shape = entry.get("shape")
    if type(shape) is not list or any(type(d) is not int for d in shape):
        return _entry_error(path, name, f"has shape {shape!r:.100}; expected a list of integers.")
    if any(d < 0 for d in shape):
        return _entry_error(path, name, f"has a negative dimension in shape {shape}.")
    offsets = entry.get("data_offsets")
    return _entry_error(path, name, f"has data_offsets {offsets!r:.100}; expected [begin, end] integers.")


_BITS = {dtype: dtype.size_in_bits for dtype in DType}


def _check_overlaps(path: Path, tensors: list[TensorInfo]) -> None:
    overlap = first_overlap(tensors)
    if overlap is not None:
        before, after = overlap
        raise CheckpointError(
            f"{_hint_close(path)}: tensors {before.name!r} and {after.name!r} overlap (bytes "
            f"{before.start}-{before.end} and {after.start}-{after.end}). Re-save the file.",
            file=path,
            tensor=after.name,
        )


# ---------------------------------------------------------------------------------------------
# Several files and index.json
# ---------------------------------------------------------------------------------------------


def open_safetensors(paths: Sequence[Path]) -> Checkpoint:
    """Builds one catalogue over safetensors files and ``*.safetensors.index.json`` indexes.

    Raises:
        DuplicateTensorError: a name appears in two files and no index says which holds it.
        CheckpointNotFoundError: an index names a file that does not exist.
        CheckpointError: any file is malformed.
    """
    with gc_paused():
        return open_files(paths, WeightsFormat.safetensors, read_header)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def _layout(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """Data order that starts as many bytes as possible on 64-byte boundaries, with no gaps (the
    reference reader rejects gaps). Tensors whose size is a multiple of 64 go first, in the caller's
    order, and all start aligned; the rest are placed greedily: the largest one whenever the offset is
    aligned, else one whose size brings the offset back to alignment, else the smallest."""
    order = [spec for spec in specs if spec.nbytes % ALIGNMENT == 0]
    rest = sorted((spec for spec in specs if spec.nbytes % ALIGNMENT), key=lambda spec: spec.nbytes)
    offset = sum(spec.nbytes for spec in order)
    while rest:
        gap = -offset % ALIGNMENT
        if gap == 0:
            pick = rest[-1]
        else:
            pick = next((spec for spec in reversed(rest) if spec.nbytes % ALIGNMENT == gap), rest[0])
        rest.remove(pick)
        order.append(pick)
        offset += pick.nbytes
    return order


def _check_text(text: str, what: str) -> None:
    """Refuses a string that is not Unicode text (a lone surrogate, as from ``"\\ud800"`` or a file name
    decoded with ``surrogateescape``): JSON would escape it, and every strict reader refuses the file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ArgumentError(
            f"{what} {text!r:.200} is not valid Unicode text (a lone surrogate at position {error.start}); "
            f"safetensors readers would refuse the file. Rename it."
        ) from None


def _header_bytes(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[TensorSpec]]:
    """The header (length prefix included, padded so data starts 64-byte aligned) and the data order."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ArgumentError(
                f"metadata must map strings to strings (safetensors stores text only), found "
                f"{dict(metadata)!r:.200}."
            )
        for key, value in metadata.items():
            _check_text(key, "A metadata key")
            _check_text(value, f"The metadata value of {key!r}")
        header["__metadata__"] = dict(metadata)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec.name, str):
            raise ArgumentError(f"Tensor names must be strings, found {spec.name!r}.")
        _check_text(spec.name, "Tensor name")
        if spec.name in seen or spec.name == "__metadata__":
            raise CheckpointError(f"Tensor name {spec.name!r} is used twice (or reserved).", tensor=spec.name)
        seen.add(spec.name)
        if spec.dtype.is_packed and element_count(spec.shape) % 2:
            raise CheckpointError(
                f"Tensor {spec.name!r}: float4 tensors need an even element count.", tensor=spec.name
            )
    order = _layout(specs)
    entries: dict[str, Any] = {}
    offset = 0
    for spec in order:
        entries[spec.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header.update({spec.name: entries[spec.name] for spec in specs})  # the header keeps the caller's order
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, order


def write_file(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    write: WriteTensor,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a safetensors file whose tensor bytes come from ``write``, one tensor at a time.

    ``write`` is called in `write_order`, the data order that aligns the most tensors. The file is written
    under a temporary name in the same folder, fsynced, then renamed over ``path``; on any failure the
    temporary file is removed and an existing ``path`` is untouched.

    Example:
        >>> import tempfile, numpy as np
        >>> values = {"b": np.ones(3, np.int8), "w": np.zeros((4, 4), np.float32)}
        >>> specs = [spec_of(name, value) for name, value in values.items()]
        >>> path = write_file(f"{tempfile.mkdtemp()}/m.safetensors", specs,
        ...                   lambda spec, out: write_array(out, values[spec.name]))
        >>> [info.name for info in read_header(path)[0]], [spec.name for spec in write_order(specs)]
        (['b', 'w'], ['w', 'b'])
    """
    path = Path(path)
    prefix, order = _header_bytes(specs, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(prefix)
            for spec in order:
                start = out.tell()
                write(spec, out)
                if out.tell() - start != spec.nbytes:
                    raise CheckpointError(
                        f"Writing tensor {spec.name!r} produced {out.tell() - start} bytes, expected "
                        f"{spec.nbytes} ({spec.dtype.name}{list(spec.shape)}).",
                        file=path,
                        tensor=spec.name,
                    )
            out.truncate(out.tell())  # materialises trailing holes left by all-zero tensors
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return path


def _shards(specs: Sequence[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most ``limit`` bytes each (a larger tensor gets a group of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def write_folder(
    folder: Path,
    specs: Sequence[TensorSpec],
    write: WriteTensor,
    metadata: Mapping[str, str] | None,
    max_shard_size: int,
) -> list[Path]:
    """Writes ``model.safetensors`` into an existing folder, or, past ``max_shard_size`` bytes, shards
    ``model-00001-of-0000N.safetensors`` plus the standard ``model.safetensors.index.json``.

    Every file is fsynced; the folder itself is not (the caller swaps it in and syncs it then).

    Example:
        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> values = {f"w{i}": np.full(256, i, np.float32) for i in range(3)}  # 1 KiB each
        >>> files = write_folder(Path(tempfile.mkdtemp()), [spec_of(n, v) for n, v in values.items()],
        ...                      lambda spec, out: write_array(out, values[spec.name]), None, 2048)
        >>> [path.name for path in files]
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    groups = _shards(specs, max_shard_size)
    if len(groups) == 1:
        return [write_file(folder / SINGLE_NAME, groups[0], write, metadata)]
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        files.append(
            write_file(
                folder / f"model-{number:05d}-of-{len(groups):05d}.safetensors", group, write, metadata
            )
        )
        weight_map.update({spec.name: files[-1].name for spec in group})
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs), **(metadata or {})},
        "weight_map": weight_map,
    }
    files.append(folder / INDEX_NAME)
    with open(files[-1], "w", encoding="utf-8") as handle:
        handle.write(json.dumps(index, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    return files


def write_order(specs: Sequence[TensorSpec], max_shard_size: int | None = None) -> list[TensorSpec]:
    """The order `write_folder` (with ``max_shard_size``) or `write_file` (without) calls ``write`` in.

    Tensors whose size is a multiple of 64 bytes come first and all start aligned; the rest follow in
    the order that brings the offset back to alignment soonest.
    """
    groups = [list(specs)] if max_shard_size is None else _shards(specs, max_shard_size)
    return [spec for group in groups for spec in _layout(group)]


class FileLayout(NamedTuple):
    """One file of a checkpoint laid out before any byte is written (see `plan_files`).

    Attributes:
        name: the file's name in the folder (``model.safetensors`` or ``model-0000i-of-0000N.safetensors``).
        header: the length prefix and JSON header, padded so data starts 64-byte aligned.
        offsets: tensor name -> absolute offset of its first byte in the file.
        size: the file's size in bytes.
    """

    name: str
    header: bytes
    offsets: dict[str, int]
    size: int


def plan_files(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None, max_shard_size: int | None
) -> list[FileLayout]:
    """The files `write_folder` (with ``max_shard_size``) or `write_file` (without, one file named
    ``model.safetensors``) would write, laid out byte for byte, so that several writers can each fill
    their own byte ranges of files created at their final size and produce the same bytes.

    Example:
        >>> import numpy as np
        >>> values = {f"w{i}": np.full(256, i, np.float32) for i in range(3)}  # 1 KiB each
        >>> files = plan_files([spec_of(n, v) for n, v in values.items()], None, 2048)
        >>> [(f.name, f.offsets, f.size) for f in files]  # doctest: +NORMALIZE_WHITESPACE
        [('model-00001-of-00002.safetensors', {'w0': 192, 'w1': 1216}, 2240),
         ('model-00002-of-00002.safetensors', {'w2': 128}, 1152)]
    """
    groups = [list(specs)] if max_shard_size is None else _shards(specs, max_shard_size)
    layouts = []
    for number, group in enumerate(groups, start=1):
        header, order = _header_bytes(group, metadata)
        offsets, position = {}, len(header)
        for spec in order:
            offsets[spec.name] = position
            position += spec.nbytes
        name = SINGLE_NAME if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        layouts.append(FileLayout(name, header, offsets, position))
    return layouts


def index_text(
    files: Sequence[FileLayout], specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None
) -> str | None:
    """The ``model.safetensors.index.json`` text `write_folder` writes beside shards ``files`` (from
    `plan_files`), or None for a single file, which has no index.

    Example:
        >>> import numpy as np
        >>> specs = [spec_of(f"w{i}", np.zeros(256, np.float32)) for i in range(3)]
        >>> print(index_text(plan_files(specs, None, 2048), specs, None))  # doctest: +ELLIPSIS
        {
          "metadata": {
            "total_size": 3072
          },
          "weight_map": {
            "w0": "model-00001-of-00002.safetensors",
        ...
    """
    if len(files) == 1:
        return None
    weight_map = {}
    for layout in files:
        weight_map.update({spec.name: layout.name for spec in specs if spec.name in layout.offsets})
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs), **(metadata or {})},
        "weight_map": weight_map,
    }
    return json.dumps(index, indent=2)


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes arrays (numpy, jax, anything numpy converts) to a safetensors file, atomically, aligned.

    The header is padded so the data section starts on a 64-byte boundary, and tensors are ordered so
    that every tensor whose size is a multiple of 64 bytes starts aligned: jaxweights then loads them
    to CPU without a copy. The result is a standard safetensors file (contiguous data, no gaps) that
    `safetensors` itself reads. Arrays are converted to host memory one at a time, as they are written;
    the caller's arrays and dict are never modified.

    The file appears under its name only once complete: it is written in a private temporary folder
    beside it, fsynced and renamed over ``path`` (a symlink is followed and stays a symlink), so a crash
    or kill leaves the previous file whole. It gets ``0666 & ~umask`` (0644 under umask 022). Temporary
    entries that killed saves of the same file left are removed first (see the guide's Saving section).

    Raises:
        CheckpointWriteError: ``path`` is a folder, the disk is full, the folder is read-only; ``path`` is
            untouched and no temporary file remains.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> folder = tempfile.mkdtemp()
        >>> path = jw.save_file({"w": np.ones((2, 3), np.float32)}, f"{folder}/m.safetensors")
        >>> jw.load_weights(path).w.data().shape
        (2, 3)
    """
    specs = [spec_of(name, value) for name, value in tensors.items()]

    def write(spec: TensorSpec, out: BinaryIO) -> None:
        write_array(out, tensors[spec.name])

    return write_atomically(path, lambda staged: write_file(staged, specs, write, metadata))


def write_array(out: BinaryIO, value: Any) -> None:
    """Writes one array's bytes (little-endian; float4 packed two per byte) at the current position."""
    data = np.ascontiguousarray(np.asarray(value))
    dtype = DType.from_numpy(data.dtype)
    if data.dtype.byteorder == ">":
        data = data.byteswap().view(data.dtype.newbyteorder("<"))
    if dtype.is_packed:
        data = pack_nibbles(data)
    _write_bytes(out, data.reshape(-1).view(np.uint8))


def _is_zero(data: np.ndarray) -> bool:
    """True when every byte is zero; cheap for typical data (the ends are looked at first)."""
    if data.size == 0 or data[:64].any() or data[-64:].any():
        return False
    return not data.any()


def _write_bytes(out: BinaryIO, data: np.ndarray) -> None:
    """Writes uint8 ``data`` at the current position; all-zero data (a fresh optimizer's moments, zero
    biases) becomes a hole in a sparse file instead (`write_file` sets the final size), which readers see
    as the same zeros without the disk write."""
    if data.nbytes >= 4096 and _is_zero(data):
        out.seek(data.nbytes, os.SEEK_CUR)
    else:
        out.write(data.data)


def write_at(out: BinaryIO, data: np.ndarray, position: int) -> None:
    """Writes uint8 ``data`` at absolute ``position`` with ``pwrite``, leaving ``out``'s position alone;
    all-zero data is left as a hole, as in `write_array`. Flush ``out`` first."""
    if data.nbytes >= 4096 and _is_zero(data):
        return
    view, done, fd = data.data.cast("B"), 0, out.fileno()
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)


# ---------------------------------------------------------------------------------------------
# The plug-in
# ---------------------------------------------------------------------------------------------


def sniff(head: bytes, path: Path) -> bool:
    """True for a safetensors file (a little-endian header length up to 100 MB, then ``{``) or a JSON
    index (text starting with ``{``).

    Example:
        >>> from pathlib import Path
        >>> sniff(struct.pack("<Q", 16) + b"{", Path("m.bin")), sniff(b'{"weight_map"', Path("i.json"))
        (True, True)
        >>> sniff(b"GGUF" + struct.pack("<I", 3) + b"{", Path("m.safetensors"))  # a 13 GB header length
        False
    """
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_SIZE:
        return True
    return head.lstrip()[:1] == b"{"


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint in a folder, as Hugging Face loaders find it: ``model.safetensors.index.json`` (or
    the one ``*.safetensors.index.json``), else ``model.safetensors`` alone (an ``adapter_model.safetensors``
    beside it is another checkpoint), else every ``*.safetensors`` file."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    preferred = folder / INDEX_NAME
    if preferred in indexes:
        return [preferred]
    if len(indexes) == 1:
        return indexes
    if len(indexes) > 1:
        raise UnsupportedFormatError(
            f"{folder} holds several indexes ({', '.join(p.name for p in indexes)}); pass the one "
            f"you want to load.",
            file=folder,
        )
    single = folder / SINGLE_NAME
    if single.exists() or single.is_symlink():
        return [single]
    return sorted(folder.glob("*.safetensors"))


WRITER = FormatWriter(
    write_file=write_file,
    write_folder=write_folder,
    write_order=write_order,
    write_array=write_array,
    write_at=write_at,
)

PLUGIN = FormatPlugin(
    name=WeightsFormat.safetensors,
    title="safetensors",
    suffixes=(".safetensors", INDEX_SUFFIX),
    sniff=sniff,
    expand=weight_files,
    open=open_safetensors,
    writer=WRITER,
)
