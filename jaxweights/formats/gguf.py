"""GGUF v2 and v3: header parser and validator, lazily decoded metadata, split models.

Registered as `PLUGIN` in `jaxweights.formats`: it recognises GGUF files by their magic bytes, lists
them in a folder, and opens one file, a list of files or the shards of a split model
(``model-00001-of-00003.gguf``; naming one shard opens them all) as one `Checkpoint`. It has no writer.

The header and every tensor info are parsed and validated before any tensor byte is touched: counts and
string lengths against the bytes left (a corrupt count of 2**60 allocates nothing), known value and ggml
types, nesting depth of arrays, the ``general.alignment`` key, at most 4 dimensions per tensor (ggml's
``GGML_MAX_DIMS``) whose non-zero values multiply to at most 2**60, tensor offsets aligned and inside the
file, no overlaps, and byte lengths equal to the element count x type size per block. Shapes are in
numpy order (GGUF stores ``ne[]`` fastest-varying first). Plain types become ordinary tensors (with
``byteorder=">"`` in a big-endian file); the quantized types jaxweights knows become uint8 blocks with
their `QuantizationEncoding` and their logical shape. Metadata arrays (a 150k-token vocabulary) are
walked over, not decoded, until their key is asked for (`GGUFMetadata`).

Never imports jax, nor gguf-py (the reference writer is a test-time dependency only).
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._dtypes import DType
from .._quantization import QuantizationEncoding
from .._shapes import element_count, shape_problem
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    DuplicateTensorError,
    UnsupportedFormatError,
)
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat, first_overlap
from ._files import open_regular
from ._plugin import FormatPlugin

__all__ = [
    "DEFAULT_ALIGNMENT",
    "GGML_TYPE_NAMES",
    "MAGIC",
    "MAX_ARRAY_DEPTH",
    "MAX_DIMS",
    "PLUGIN",
    "VERSIONS",
    "GGUFHeader",
    "GGUFMetadata",
    "open_gguf",
    "read_header",
    "sniff",
    "weight_files",
]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
"""The versions read: both use 64-bit counts and string lengths (version 1 used 32-bit ones)."""
DEFAULT_ALIGNMENT = 32
"""Alignment of the data section and of every tensor offset when ``general.alignment`` is absent."""
MAX_ARRAY_DEPTH = 8
"""Arrays of arrays nested deeper than this are refused (no file in the wild nests at all)."""
MAX_DIMS = 4
"""The most dimensions a GGUF tensor has (``GGML_MAX_DIMS`` in ggml.h; gguf.cpp refuses more)."""

GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_2", 5: "Q4_3", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 31: "Q4_0_4_4",
    32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0", 35: "TQ2_0", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip
"""ggml type number -> name (ggml.h), for messages about the types jaxweights does not read."""

_PLAIN: dict[int, DType] = {
    0: DType.float32,
    1: DType.float16,
    24: DType.int8,
    25: DType.int16,
    26: DType.int32,
    27: DType.int64,
    28: DType.float64,
    30: DType.bfloat16,
}
_QUANTIZED: dict[int, QuantizationEncoding] = {
    number: QuantizationEncoding[GGML_TYPE_NAMES[number]] for number in (2, 3, 6, 7, 8, 10, 11, 12, 13, 14)
}

# Metadata value types (gguf.h): struct/numpy type codes of the fixed-size ones, and names for messages.
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {kind: struct.calcsize(code) for kind, code in _SCALAR_CODES.items()}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
    8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}  # fmt: skip
_MIN_VALUE_SIZE = {**_SCALAR_SIZES, _STRING: 8, _ARRAY: 12}  # bytes the smallest value of a type takes
_MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, dimension count, type, offset

_SHARD_NAME = re.compile(r"(?P<prefix>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.gguf")


def _invalid(path: Path) -> str:
    return f"{path} is not a valid GGUF file"


def _kind_name(kind: int) -> str:
    return f"{kind} ({GGML_TYPE_NAMES.get(kind, 'unknown')})"


# ---------------------------------------------------------------------------------------------
# Bounds-checked reading
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Reads a header buffer front to back; every read is checked against the bytes left first, so a
    corrupt length or count raises `CheckpointError` before anything is allocated for it.

    ``origin`` is the file offset of ``buffer[0]`` (a metadata array read on its own), for messages.
    """

    def __init__(self, buffer: Any, path: Path, order: str, origin: int = 0) -> None:
        self.buffer = buffer
        self.path = path
        self.order = order
        self.origin = origin
        self.size = len(buffer)
        self.pos = 0
        self._u32 = struct.Struct(order + "I").unpack_from
        self._u64 = struct.Struct(order + "Q").unpack_from

    def fail(self, what: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(f"{_invalid(self.path)}: {what}", file=self.path, tensor=tensor)

    def need(self, nbytes: int, what: str, tensor: str | None = None) -> None:
        left = self.size - self.pos
        if nbytes > left:
            raise self.fail(
                f"{what} at byte {self.origin + self.pos} needs {nbytes} bytes, but only {left} are left "
                f"before the end at byte {self.origin + self.size}. The file is truncated or corrupt; "
                f"download it again.",
                tensor,
            )

    def u32(self, what: str, tensor: str | None = None) -> int:
        self.need(4, what, tensor)
        (value,) = self._u32(self.buffer, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str, tensor: str | None = None) -> int:
        self.need(8, what, tensor)
        (value,) = self._u64(self.buffer, self.pos)
        self.pos += 8
        return int(value)

    def raw_string(self, what: str, tensor: str | None = None) -> bytes:
        length = self.u64(f"the length of {what}", tensor)
        self.need(length, what, tensor)
        data = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return data

    def text(self, what: str, tensor: str | None = None) -> str:
        start = self.origin + self.pos
        data = self.raw_string(what, tensor)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(
                f"{what} at byte {start} is not UTF-8 ({error.reason} at byte {error.start} of "
                f"{data[:60]!r}).",
                tensor,
            ) from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walks over ``count`` strings by their length prefixes alone (no string is built)."""
        self.need(8 * count, what)
        unpack, buffer, pos = self._u64, self.buffer, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack(buffer, pos)[0]
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            raise self.fail(
                f"{what} at byte {self.origin + self.pos} runs past the end at byte "
                f"{self.origin + self.size}. The file is truncated or corrupt; download it again."
            )
        self.pos = pos


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


class _LazyArray(NamedTuple):
    """Where a metadata array is: bytes [start, end) of ``file`` (from its item type field on)."""

    file: Path
    file_size: int
    order: str
    start: int
    end: int
    item_type: int
    length: int


def _walk_array(reader: _Reader, key: str, depth: int) -> tuple[int, int]:
    """Skips over one array (item type, count, items); returns its item type and count."""
    if depth > MAX_ARRAY_DEPTH:
        raise reader.fail(
            f"metadata {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep; jaxweights refuses it."
        )
    item = reader.u32(f"the item type of metadata array {key!r}")
    count = reader.u64(f"the length of metadata array {key!r}")
    what = f"the {count} items of metadata array {key!r}"
    if item in _SCALAR_SIZES:
        reader.need(count * _SCALAR_SIZES[item], what)
        reader.pos += count * _SCALAR_SIZES[item]
    elif item == _STRING:
        reader.skip_strings(count, what)
    elif item == _ARRAY:
        reader.need(count * _MIN_VALUE_SIZE[_ARRAY], what)
        for _ in range(count):
            _walk_array(reader, key, depth + 1)
    else:
        raise _unknown_value_type(reader, key, item)
    return item, count


def _unknown_value_type(reader: _Reader, key: str, kind: int) -> CheckpointError:
    known = ", ".join(f"{number} ({name})" for number, name in _VALUE_TYPE_NAMES.items())
    return reader.fail(
        f"metadata {key!r} has value type {kind}, which GGUF does not define (known: {known})."
    )


def _read_value(reader: _Reader, key: str, kind: int) -> Any:
    """A scalar or string, decoded; an array, walked over and located."""
    if kind in _SCALAR_CODES:
        reader.need(_SCALAR_SIZES[kind], f"the value of metadata {key!r}")
        (value,) = struct.unpack_from(reader.order + _SCALAR_CODES[kind], reader.buffer, reader.pos)
        reader.pos += _SCALAR_SIZES[kind]
        return value
    if kind == _STRING:
        return reader.text(f"the value of metadata {key!r}")
    if kind == _ARRAY:
        start = reader.pos
        item, count = _walk_array(reader, key, 1)
        return _LazyArray(reader.path, reader.size, reader.order, start, reader.pos, item, count)
    raise _unknown_value_type(reader, key, kind)


def _decode_array(reader: _Reader, key: str) -> Any:
    """One array, already validated by `_walk_array`: a read-only numpy array of numbers or bools, a list
    of strings, or a list of decoded arrays."""
    item = reader.u32(f"the item type of metadata array {key!r}")
    count = reader.u64(f"the length of metadata array {key!r}")
    if item in _SCALAR_CODES:
        nbytes = count * _SCALAR_SIZES[item]
        reader.need(nbytes, f"metadata array {key!r}")
        if item == 7:
            values = np.frombuffer(reader.buffer, np.uint8, count, reader.pos) != 0
        else:
            stored = np.dtype(reader.order + _SCALAR_CODES[item])
            values = np.frombuffer(reader.buffer, stored, count, reader.pos).astype(stored.newbyteorder("="))
        reader.pos += nbytes
        values.flags.writeable = False
        return values
    if item == _STRING:
        return _decode_strings(reader, key, count)
    if item == _ARRAY:
        return [_decode_array(reader, key) for _ in range(count)]
    raise _unknown_value_type(reader, key, item)


def _decode_strings(reader: _Reader, key: str, count: int) -> list[str]:
    """``count`` strings; a tight loop (a 150k-token vocabulary decodes in tens of milliseconds), which
    on a bad string starts again slowly to say which item is wrong."""
    reader.need(8 * count, f"the {count} items of metadata array {key!r}")
    unpack, buffer, pos, end = reader._u64, reader.buffer, reader.pos, reader.size
    strings: list[str] = []
    try:
        for _ in range(count):
            stop = pos + 8 + unpack(buffer, pos)[0]
            strings.append(str(buffer[pos + 8 : stop], "utf-8"))
            pos = stop
    except (struct.error, OverflowError, UnicodeDecodeError):
        pos = end + 1
    if pos > end:  # the slow loop names the item
        return [reader.text(f"item {index} of metadata array {key!r}") for index in range(count)]
    reader.pos = pos
    return strings


def _load_array(key: str, where: _LazyArray) -> Any:
    fd = open_regular(where.file)
    try:
        size = os.fstat(fd).st_size
        if size != where.file_size:
            raise CheckpointError(
                f"{where.file} changed size since it was opened ({where.file_size} -> {size} bytes) "
                f"before metadata {key!r} was read. Re-open the checkpoint.",
                file=where.file,
            )
        chunks, position = [], where.start
        while position < where.end:
            chunk = os.pread(fd, where.end - position, position)
            if not chunk:
                break
            chunks.append(chunk)
            position += len(chunk)
    except OSError as error:
        raise CheckpointReadError(
            f"{where.file} cannot be read ({error.strerror or error}).", file=where.file
        ) from None
    finally:
        os.close(fd)
    reader = _Reader(b"".join(chunks), where.file, where.order, origin=where.start)
    return _decode_array(reader, key)


def _describe(value: Any) -> str:
    if type(value) is _LazyArray:
        return f"<array of {value.length} {_VALUE_TYPE_NAMES.get(value.item_type, '?')}>"
    return repr(value)


class GGUFMetadata(Mapping[str, Any]):
    """The metadata key-values of a GGUF checkpoint, decoded lazily.

    Scalars (Python ``int``, ``float``, ``bool``) and strings are decoded when the file is opened. An
    array is only located then: it is read from its file and decoded on first access (then cached) into
    a read-only numpy array of numbers or bools in native byte order, a ``list[str]``, or a list of such
    values for arrays of arrays. ``len()``, iteration over keys, ``in`` and ``repr`` never decode one;
    ``values()``, ``items()`` and ``dict(metadata)`` decode them all.
    """

    def __init__(self, entries: Mapping[str, Any]) -> None:
        self._entries: dict[str, Any] = dict(entries)
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        value = self._entries[key]
        if type(value) is not _LazyArray:
            return value
        decoded = self._decoded.get(key)
        if decoded is None:
            decoded = self._decoded[key] = _load_array(key, value)
        return decoded

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def array_info(self, key: str) -> tuple[str, int] | None:
        """(item type name, length) of an array value, without decoding it; None for scalars and strings.

        Raises:
            KeyError: no such key.
        """
        value = self._entries[key]
        if type(value) is not _LazyArray:
            return None
        return _VALUE_TYPE_NAMES.get(value.item_type, "?"), value.length

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{key!r}: {_describe(value)}" for key, value in itertools.islice(self._entries.items(), 20)
        )
        more = f", ... ({len(self) - 20} more)" if len(self) > 20 else ""
        return f"GGUFMetadata({{{shown}{more}}})"


def _merged(metadatas: Sequence[GGUFMetadata]) -> GGUFMetadata:
    """One mapping over several files' metadata, the first file's value winning; decodes nothing."""
    entries: dict[str, Any] = {}
    for metadata in metadatas:
        for key, value in metadata._entries.items():
            entries.setdefault(key, value)
    return GGUFMetadata(entries)


# ---------------------------------------------------------------------------------------------
# Header and tensor infos
# ---------------------------------------------------------------------------------------------


class GGUFHeader(NamedTuple):
    """One GGUF file's header, validated.

    Attributes:
        file: the file.
        version: 2 or 3.
        byteorder: ``"<"`` or ``">"`` (a big-endian file).
        alignment: of the data section and of every tensor offset.
        data_start: absolute offset of the data section.
        size: the file size the validation saw.
        tensors: the tensors in header order, with absolute byte ranges.
        metadata: the key-values, arrays decoded on access.
    """

    file: Path
    version: int
    byteorder: str
    alignment: int
    data_start: int
    size: int
    tensors: list[TensorInfo]
    metadata: GGUFMetadata


def _version(path: Path, head: bytes) -> tuple[int, str]:
    """The version and byte order, told apart by which order gives a version this module reads."""
    little, big = struct.unpack("<I", head[4:8])[0], struct.unpack(">I", head[4:8])[0]
    if little in VERSIONS:
        return little, "<"
    if big in VERSIONS:
        return big, ">"
    version = little if little <= 0xFFFF or big > 0xFFFF else big
    if version == 1:
        detail = "GGUF version 1 (32-bit counts), which jaxweights does not read"
        fix = "Convert the model again with a current llama.cpp or gguf-py."
    elif version > max(VERSIONS):
        detail = f"GGUF version {version}, newer than the versions jaxweights reads"
        fix = "Upgrade jaxweights."
    else:
        detail = f"GGUF version {version}, which does not exist"
        fix = "The file is corrupt; download it again."
    raise UnsupportedFormatError(
        f"{path} is {detail} (it reads versions {', '.join(map(str, VERSIONS))}). {fix}", file=path
    )


def read_header(path: Path) -> GGUFHeader:
    """Parses and validates one GGUF file's header and tensor infos; reads no tensor data.

    Raises:
        CheckpointError: the file is malformed; the message names the file, the tensor or key, and
            what was expected.
        UnsupportedFormatError: a GGUF version other than 2 or 3.
    """
    with os.fdopen(open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            head = handle.read(24)
        except OSError as error:
            raise CheckpointReadError(
                f"{path} cannot be read ({error.strerror or error}).", file=path
            ) from None
        if head[:4] != MAGIC:
            start = f"it starts with {head[:8]!r}" if head else "it is empty"
            raise CheckpointError(
                f"{_invalid(path)}: GGUF files start with {MAGIC!r}, {start}. It is another format or "
                f"corrupt.",
                file=path,
            )
        if size < 24:
            raise CheckpointError(
                f"{_invalid(path)}: it has {size} bytes, fewer than the 24-byte GGUF header. The file "
                f"is truncated; download it again.",
                file=path,
            )
        version, order = _version(path, head)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            reader = _Reader(buffer, path, order)
            reader.pos = 8
            return _parse(reader, version)


def _parse(reader: _Reader, version: int) -> GGUFHeader:
    path = reader.path
    tensor_count = reader.u64("the tensor count")
    kv_count = reader.u64("the metadata count")
    left = reader.size - reader.pos
    if kv_count * _MIN_KV_SIZE + tensor_count * _MIN_TENSOR_INFO_SIZE > left:
        raise reader.fail(
            f"its header claims {tensor_count} tensors and {kv_count} metadata entries, which need at "
            f"least {kv_count * _MIN_KV_SIZE + tensor_count * _MIN_TENSOR_INFO_SIZE} bytes, but only "
            f"{left} follow. The file is truncated or corrupt; download it again."
        )
    entries: dict[str, Any] = {}
    for index in range(kv_count):
        key = reader.text(f"the key of metadata entry #{index}")
        kind = reader.u32(f"the value type of metadata {key!r}")
        if key in entries:
            raise reader.fail(f"it holds metadata key {key!r} twice; readers would disagree on which wins.")
        entries[key] = _read_value(reader, key, kind)
    alignment = _alignment(reader, entries)

    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(tensor_count):
        name = reader.text(f"the name of tensor #{index}")
        n_dims = reader.u32(f"the dimension count of tensor {name!r}", name)
        if n_dims > MAX_DIMS:
            raise reader.fail(
                f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have at most {MAX_DIMS} "
                f"(GGML_MAX_DIMS). The file is corrupt; download or convert it again.",
                name,
            )
        reader.need(8 * n_dims, f"the {n_dims} dimensions of tensor {name!r}", name)
        dims = struct.unpack_from(f"{reader.order}{n_dims}Q", reader.buffer, reader.pos)
        reader.pos += 8 * n_dims
        kind = reader.u32(f"the type of tensor {name!r}", name)
        offset = reader.u64(f"the offset of tensor {name!r}", name)
        raw.append((name, dims, kind, offset))
    data_start = reader.pos + -reader.pos % alignment

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, kind, offset in raw:
        if name in seen:
            raise DuplicateTensorError(
                f"{_invalid(path)}: it holds two tensors named {name!r}; readers would disagree on "
                f"which wins.",
                file=path,
                tensor=name,
            )
        seen.add(name)
        tensors.append(_tensor_info(reader, name, dims, kind, offset, data_start, alignment))
    _check_overlaps(path, tensors)
    return GGUFHeader(
        path, version, reader.order, alignment, data_start, reader.size, tensors, GGUFMetadata(entries)
    )


def _alignment(reader: _Reader, entries: dict[str, Any]) -> int:
    value = entries.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(value) is not int or value <= 0 or value & (value - 1):
        raise reader.fail(
            f"its 'general.alignment' is {_describe(value)}; it must be a positive power of two (a "
            f"uint32, 32 when absent)."
        )
    return value


def _tensor_info(
    reader: _Reader,
    name: str,
    dims: tuple[int, ...],
    kind: int,
    offset: int,
    data_start: int,
    alignment: int,
) -> TensorInfo:
    shape = tuple(reversed(dims))
    problem = shape_problem(shape, MAX_DIMS)
    if problem is not None:
        raise reader.fail(
            f"tensor {name!r} has ne={list(dims)}, which no array can have ({problem}). The file is "
            f"corrupt; download or convert it again.",
            name,
        )
    count = element_count(shape)
    dtype = _PLAIN.get(kind)
    encoding: QuantizationEncoding | None = None
    byteorder = "<"
    if dtype is not None:
        nbytes = count * dtype.size_in_bytes
        if dtype.size_in_bytes > 1:
            byteorder = reader.order
    else:
        encoding = _QUANTIZED.get(kind)
        if encoding is None:
            readable = ", ".join(GGML_TYPE_NAMES[number] for number in sorted({*_PLAIN, *_QUANTIZED}))
            raise reader.fail(
                f"tensor {name!r} has ggml type {_kind_name(kind)}, which jaxweights cannot read "
                f"(it reads {readable}). Convert the model to one of those types.",
                name,
            )
        per_block = encoding.elements_per_block
        if not dims or dims[0] % per_block:
            raise reader.fail(
                f"tensor {name!r} is {encoding.name}, which packs {per_block} values per block, but its "
                f"rows hold ne[0]={dims[0] if dims else 'nothing'} values, not a multiple of {per_block}.",
                name,
            )
        dtype, nbytes = DType.uint8, count // per_block * encoding.block_size
    if offset % alignment:
        raise reader.fail(
            f"tensor {name!r} has offset {offset}, which is not a multiple of the file's alignment "
            f"{alignment}.",
            name,
        )
    start = data_start + offset
    if start + nbytes > reader.size:
        raise reader.fail(
            f"tensor {name!r} ({GGML_TYPE_NAMES[kind]}, shape {list(shape)}) needs bytes [{start}, "
            f"{start + nbytes}), past the end of the file at byte {reader.size}. The file is truncated "
            f"or its header is corrupt; download it again.",
            name,
        )
    return TensorInfo(name, dtype, shape, reader.path, start, start + nbytes, encoding, byteorder)


def _check_overlaps(path: Path, tensors: list[TensorInfo]) -> None:
    overlap = first_overlap(tensors)
    if overlap is not None:
        before, after = overlap
        raise CheckpointError(
            f"{_invalid(path)}: tensors {before.name!r} and {after.name!r} overlap (bytes "
            f"{before.start}-{before.end} and {after.start}-{after.end}). Convert the model again.",
            file=path,
            tensor=after.name,
        )


# ---------------------------------------------------------------------------------------------
# Several files and split models
# ---------------------------------------------------------------------------------------------


class _Split(NamedTuple):
    number: int  # split.no, from 0
    shards: int  # split.count
    tensors: int | None  # split.tensors.count


def _split(header: GGUFHeader) -> _Split | None:
    metadata = header.metadata
    if "split.count" not in metadata:
        return None
    values = [metadata.get(key, 0) for key in ("split.no", "split.count", "split.tensors.count")]
    number, count, tensors = values
    if any(type(value) is not int for value in values) or count < 1 or not 0 <= number < count:
        raise CheckpointError(
            f"{_invalid(header.file)}: its split keys are inconsistent (split.no={_describe(number)}, "
            f"split.count={_describe(count)}, split.tensors.count={_describe(tensors)}).",
            file=header.file,
        )
    return _Split(number, count, tensors if "split.tensors.count" in metadata else None)


def _shard_paths(path: Path, split: _Split) -> list[Path] | None:
    """Every shard's path from one shard's name (``prefix-00002-of-00003.gguf``), or None when the
    name does not follow that pattern."""
    match = _SHARD_NAME.fullmatch(path.name)
    if match is None or int(match["count"]) != split.shards or int(match["number"]) != split.number + 1:
        return None
    prefix = match["prefix"]
    return [
        path.with_name(f"{prefix}-{n:05d}-of-{split.shards:05d}.gguf") for n in range(1, split.shards + 1)
    ]


def _read_all(paths: Sequence[Path]) -> list[GGUFHeader]:
    """Every file's header, with the missing shards of split models added, each split model's shards
    together and in order."""
    queue = list(dict.fromkeys(paths))
    seen: set[Path] = set(queue)
    groups: dict[object, list[tuple[GGUFHeader, _Split]]] = {}
    for path in queue:  # grows while it is walked
        header = read_header(path)
        split = _split(header) or _Split(0, 1, None)
        siblings = _shard_paths(path, split) if split.shards > 1 else None
        key: object = (
            (siblings[0], split.shards) if siblings else (path if split.shards == 1 else split.shards)
        )
        groups.setdefault(key, []).append((header, split))
        for sibling in siblings or ():
            if sibling in seen:
                continue
            if not sibling.is_file():
                raise CheckpointNotFoundError(
                    f"{path.name} is shard {split.number + 1} of a model split into {split.shards} files, "
                    f"but shard {sibling.name} is missing from {sibling.parent}. Download it.",
                    file=sibling,
                )
            queue.append(sibling)
            seen.add(sibling)
    return [header for group in groups.values() for header in _check_split(group)]


def _check_split(group: list[tuple[GGUFHeader, _Split]]) -> list[GGUFHeader]:
    """The shards of one model in order, after checking that each is there once and that together they
    hold the tensors the first one announces."""
    group = sorted(group, key=lambda pair: pair[1].number)
    first, split = group[0]
    numbers = [pair[1].number for pair in group]
    if numbers != list(range(split.shards)):
        missing = sorted(set(range(split.shards)) - set(numbers))
        if missing:
            raise CheckpointNotFoundError(
                f"{first.file} belongs to a model split into {split.shards} files, but shard(s) "
                f"{', '.join(str(n + 1) for n in missing)} (split.no {', '.join(map(str, missing))}) "
                f"were not given. Pass every shard, or the first one named '...-00001-of-"
                f"{split.shards:05d}.gguf'.",
                file=first.file,
            )
        repeated = next(n for n, m in itertools.pairwise(numbers) if n == m)
        files = ", ".join(str(header.file) for header, s in group if s.number == repeated)
        raise CheckpointError(
            f"Several files claim to be shard {repeated + 1} of {split.shards}: {files}. Pass one model.",
            file=first.file,
        )
    found = sum(len(header.tensors) for header, _ in group)
    if split.tensors is not None and found != split.tensors:
        raise CheckpointError(
            f"{first.file} says its model's {split.shards} shard(s) hold {split.tensors} tensors, but "
            f"they hold {found}. A shard comes from another conversion; download them again.",
            file=first.file,
        )
    return [header for header, _ in group]


def open_gguf(paths: Sequence[Path]) -> Checkpoint:
    """Opens GGUF files as one `Checkpoint`, validating every header first.

    A shard of a split model (``model-00001-of-00003.gguf``) brings its sibling shards along. The
    checkpoint's ``metadata`` is a `GGUFMetadata` over all files (the first file's value wins), and
    ``file_metadata`` holds each file's own.

    Raises:
        CheckpointError: a file is malformed, or the shards of a split model disagree.
        CheckpointNotFoundError: a shard of a split model is missing.
        DuplicateTensorError: two files hold a tensor of the same name.
        UnsupportedFormatError: a GGUF version other than 2 or 3.

    Example:
        >>> import struct, tempfile, numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "tiny.gguf"
        >>> header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)  # version, tensors, metadata entries
        >>> header += struct.pack("<Q", 12) + b"general.name" + struct.pack("<IQ", 8, 4) + b"tiny"
        >>> header += struct.pack("<Q", 1) + b"w" + struct.pack("<IQQIQ", 2, 3, 2, 0, 0)  # ne=[3, 2], F32
        >>> _ = path.write_bytes(header.ljust(-len(header) // 32 * -32, b"\\0") + np.arange(6, dtype="<f4").tobytes())
        >>> with open_gguf([path]) as checkpoint:
        ...     info = checkpoint["w"]
        ...     checkpoint.metadata["general.name"], info.shape, checkpoint.view(info).tolist()
        ('tiny', (2, 3), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    """
    headers = _read_all(paths)
    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for info in header.tensors:
            if info.name in tensors:
                raise DuplicateTensorError(
                    f"Tensor {info.name!r} is in both {tensors[info.name].file} and {header.file}. A "
                    f"folder holding several GGUF models (quantizations) must be opened one file at a "
                    f"time: pass the file you want.",
                    file=header.file,
                    tensor=info.name,
                )
            tensors[info.name] = info
    return Checkpoint(
        WeightsFormat.gguf,
        tensors,
        [header.file for header in headers],
        metadata=_merged([header.metadata for header in headers]),
        file_metadata={header.file: header.metadata for header in headers},
        file_sizes={header.file: header.size for header in headers},
        sources=tuple(paths),
    )


# ---------------------------------------------------------------------------------------------
# The plug-in
# ---------------------------------------------------------------------------------------------


def sniff(head: bytes, path: Path) -> bool:
    """True for a GGUF file (its first four bytes are ``GGUF``), whatever its version or byte order.

    Example:
        >>> sniff(b"GGUF" + struct.pack("<I", 3), Path("m.bin")), sniff(b"\\x08\\0\\0\\0\\0\\0\\0\\0{", Path("m.gguf"))
        (True, False)
    """
    return head[:4] == MAGIC


def weight_files(folder: Path) -> list[Path]:
    """The ``*.gguf`` files in a folder, sorted (the shards of a split model come out together, in
    order)."""
    return sorted(path for path in folder.glob("*.gguf") if path.is_file())


PLUGIN = FormatPlugin(
    name=WeightsFormat.gguf,
    title="GGUF",
    suffixes=(".gguf",),
    sniff=sniff,
    expand=weight_files,
    open=open_gguf,
)
