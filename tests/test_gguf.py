"""GGUF reading (jaxweights/formats/gguf.py): files written by gguf-py's reference writer, little- and
big-endian, split models, lazily decoded metadata, and every malformed header refused by name.

Malformed files are built byte by byte with `build`, so each test breaks exactly one field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest

import jaxweights as jw
from jaxweights import DType, QuantizationEncoding
from jaxweights.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DuplicateTensorError,
    UnsupportedFormatError,
)
from jaxweights.formats import WeightsFormat
from jaxweights.formats import gguf as reader

Q = gguf.GGMLQuantizationType
LITTLE, BIG = gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG
Tensor = np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]


def write(
    path: Path,
    tensors: dict[str, Tensor],
    *,
    endian: gguf.GGUFEndian = LITTLE,
    setup: Callable[[gguf.GGUFWriter], None] | None = None,
    **options: Any,
) -> Path:
    """Writes ``tensors`` (arrays, or ``(raw, ggml type)`` pairs) with the reference writer."""
    writer = gguf.GGUFWriter(path, "test", endianess=endian, **options)
    if setup is not None:
        setup(writer)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- a byte-level builder for malformed files ----------------------------------------------------


def string(text: str | bytes, order: str = "<") -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(data)) + data


def kv(key: str | bytes, kind: int, payload: bytes, order: str = "<") -> bytes:
    return string(key, order) + struct.pack(order + "I", kind) + payload


def info(name: str | bytes, ne: Sequence[int], kind: int, offset: int, order: str = "<") -> bytes:
    dims = struct.pack(f"{order}I{len(ne)}Q", len(ne), *ne)
    return string(name, order) + dims + struct.pack(order + "IQ", kind, offset)


def build(
    path: Path,
    kvs: Sequence[bytes] = (),
    infos: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    order: str = "<",
    alignment: int = 32,
    counts: tuple[int, int] | None = None,
) -> Path:
    tensor_count, kv_count = counts or (len(infos), len(kvs))
    header = b"GGUF" + struct.pack(order + "IQQ", version, tensor_count, kv_count)
    header += b"".join(kvs) + b"".join(infos)
    path.write_bytes(header + b"\0" * (-len(header) % alignment) + data)
    return path


F32 = 0


# -- tensors -------------------------------------------------------------------------------------

PLAIN = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8, np.int16, np.int32, np.int64]


def sample(dtype: Any, shape: tuple[int, ...] = (3, 4, 5)) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal(shape) * 50
    return values.astype(dtype)


@pytest.mark.parametrize("endian", [LITTLE, BIG], ids=["little", "big"])
@pytest.mark.parametrize("dtype", PLAIN, ids=lambda d: np.dtype(d).name)
def test_plain_types_round_trip(tmp_path: Path, dtype: Any, endian: gguf.GGUFEndian) -> None:
    source = sample(dtype)

    def tensor(array: np.ndarray) -> Tensor:  # gguf-py takes BF16 as raw uint16
        return (array.view(np.uint16), Q.BF16) if array.dtype == ml_dtypes.bfloat16 else array

    path = write(tmp_path / "m.gguf", {"blk.0.w": tensor(source), "v": tensor(source[0, 0])}, endian=endian)
    weights = jw.load_weights(path)
    data = weights["blk.0.w"].data()
    assert data.dtype is DType.from_numpy(source.dtype) and data.shape == (3, 4, 5)
    np.testing.assert_array_equal(data.data, source)
    np.testing.assert_array_equal(weights.v.data().data, source[0, 0])
    info_ = weights.checkpoint["blk.0.w"]
    wide = endian is BIG and source.dtype.itemsize > 1
    assert info_.byteorder == (">" if wide else "<") and info_.encoding is None


def test_shapes_are_in_numpy_order_and_ranges_match_the_reference_reader(tmp_path: Path) -> None:
    tensors: dict[str, Tensor] = {
        "a": np.zeros((2, 3, 5), np.float32),
        "b": np.zeros(7, np.int8),
        "c": (np.zeros((4, 2 * 18), np.uint8), Q.Q4_0),
        "scalar": np.array(3.5, np.float32),
    }
    path = write(tmp_path / "m.gguf", tensors)
    with jw.open_checkpoint(path) as checkpoint:
        assert [checkpoint[n].shape for n in tensors] == [(2, 3, 5), (7,), (4, 64), ()]
        for tensor in gguf.GGUFReader(path).tensors:
            found = checkpoint[tensor.name]
            assert (found.start, found.nbytes) == (tensor.data_offset, tensor.n_bytes)
            assert found.shape == tuple(reversed(tensor.shape.tolist()))
        assert checkpoint.view(checkpoint["scalar"]).item() == 3.5


@pytest.mark.parametrize("endian", [LITTLE, BIG], ids=["little", "big"])
@pytest.mark.parametrize("encoding", [e for e in QuantizationEncoding if e.is_gguf], ids=lambda e: e.name)
def test_quantized_tensors_are_raw_blocks_with_their_logical_shape(
    tmp_path: Path, encoding: QuantizationEncoding, endian: gguf.GGUFEndian
) -> None:
    rows, cols = 3, 2 * encoding.elements_per_block
    blocks = np.random.default_rng(1).integers(0, 256, (rows, 2 * encoding.block_size), dtype=np.uint8)
    path = write(tmp_path / "q.gguf", {"w": (blocks, getattr(Q, encoding.name))}, endian=endian)
    with jw.open_checkpoint(path) as checkpoint:
        found = checkpoint["w"]
        assert (found.dtype, found.shape, found.encoding) == (DType.uint8, (rows, cols), encoding)
        assert found.nbytes == encoding.bytes_for_shape((rows, cols)) and found.byteorder == "<"
        assert checkpoint.raw_view(found).tobytes() == blocks.tobytes()  # never byte-swapped


def test_version_2_reads_like_version_3(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", {"w": np.arange(6, dtype=np.float32)})
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    path.write_bytes(raw)
    header = reader.read_header(path)
    assert header.version == 2 and header.byteorder == "<"
    np.testing.assert_array_equal(jw.load_weights(path).w.data().data, np.arange(6, dtype=np.float32))


def test_a_file_without_tensors_opens_empty(tmp_path: Path) -> None:
    with jw.open_checkpoint(write(tmp_path / "empty.gguf", {})) as checkpoint:
        assert len(checkpoint) == 0 and checkpoint.metadata["general.architecture"] == "test"


def test_registry_sniffs_and_expands_gguf(tmp_path: Path) -> None:
    path = write(tmp_path / "model.bin", {"w": np.ones(2, np.float32)})
    assert jw.weights_format(path) is WeightsFormat.gguf
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "model.gguf", {"w": np.ones(2, np.float32)})
    (folder / "README.md").write_text("hi")
    with jw.open_checkpoint(folder) as checkpoint:
        assert checkpoint.format is WeightsFormat.gguf and list(checkpoint) == ["w"]


# -- metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endian", [LITTLE, BIG], ids=["little", "big"])
def test_metadata_values(tmp_path: Path, endian: gguf.GGUFEndian) -> None:
    def setup(writer: gguf.GGUFWriter) -> None:
        writer.add_uint8("u8", 200)
        writer.add_int16("i16", -300)
        writer.add_uint32("u32", 4_000_000_000)
        writer.add_int64("i64", -(2**40))
        writer.add_uint64("u64", 2**63)
        writer.add_float32("f32", 0.5)
        writer.add_float64("f64", 1e300)
        writer.add_bool("flag", True)
        writer.add_string("text", "héllo")
        writer.add_array("ints", [1, -2, 3])
        writer.add_key_value("u16s", [1, 2, 65535], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT16)
        writer.add_array("floats", [0.25, 1.5])
        writer.add_array("bools", [True, False, True])
        writer.add_array("words", ["a", "bé", ""])
        writer.add_array("nested", [[1, 2], [3]])

    path = write(tmp_path / "m.gguf", {}, endian=endian, setup=setup)
    metadata = jw.open_checkpoint(path).file_metadata[path]
    assert isinstance(metadata, reader.GGUFMetadata)
    scalars = ["u8", "i16", "u32", "i64", "u64", "f32", "f64", "flag", "text"]
    assert [metadata[k] for k in scalars] == [
        200,
        -300,
        4_000_000_000,
        -(2**40),
        2**63,
        0.5,
        1e300,
        True,
        "héllo",
    ]
    ints = metadata["ints"]
    assert ints.dtype == np.int32 and ints.dtype.isnative and ints.tolist() == [1, -2, 3]
    assert not ints.flags.writeable
    assert metadata["u16s"].dtype == np.uint16 and metadata["u16s"].tolist() == [1, 2, 65535]
    assert metadata["floats"].tolist() == [0.25, 1.5]
    assert metadata["bools"].dtype == np.bool_ and metadata["bools"].tolist() == [True, False, True]
    assert metadata["words"] == ["a", "bé", ""]
    assert [inner.tolist() for inner in metadata["nested"]] == [[1, 2], [3]]
    assert "<array of 3 string>" in repr(metadata)


VOCAB = 150_000


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def setup(writer: gguf.GGUFWriter) -> None:
        writer.add_token_list([f"token{i}" for i in range(VOCAB)])
        writer.add_token_types([1] * VOCAB)
        writer.add_uint32("after", 7)

    return write(tmp_path_factory.mktemp("vocab") / "v.gguf", {"w": np.ones(4, np.float32)}, setup=setup)


def test_metadata_arrays_are_decoded_only_when_asked_for(vocabulary: Path) -> None:
    with jw.open_checkpoint(vocabulary) as checkpoint:
        for metadata in (checkpoint.file_metadata[vocabulary], checkpoint.metadata):
            assert isinstance(metadata, reader.GGUFMetadata)
            key = "tokenizer.ggml.tokens"
            assert key in metadata and len(metadata) == 4 and key in list(metadata)
            assert metadata["after"] == 7 and metadata.get("general.architecture") == "test"
            assert f"<array of {VOCAB} string>" in repr(metadata)
            assert metadata._decoded == {}  # nothing decoded yet
            tokens = metadata[key]
            assert len(tokens) == VOCAB and tokens[12345] == "token12345"
            assert metadata[key] is tokens and list(metadata._decoded) == [key]


def test_a_bad_string_in_a_lazy_array_is_named_on_access(tmp_path: Path) -> None:
    items = string("ok") + string(b"\xff\xfe")
    array = struct.pack("<IQ", 8, 2) + items
    path = build(tmp_path / "m.gguf", [kv("words", 9, array)])
    metadata = jw.open_checkpoint(path).metadata
    with pytest.raises(CheckpointError, match=r"item 1 of metadata array 'words' .* is not UTF-8"):
        metadata["words"]


# -- split models --------------------------------------------------------------------------------


def split_model(folder: Path) -> tuple[list[Path], dict[str, Tensor]]:
    tensors: dict[str, Tensor] = {f"blk.{i}.w": np.full((2, 3), i, np.float32) for i in range(5)}
    write(folder / "model.gguf", tensors, split_max_tensors=2)
    return [folder / f"model-{n:05d}-of-00003.gguf" for n in (1, 2, 3)], tensors


@pytest.mark.parametrize("given", ["first", "last", "folder", "all reversed"])
def test_split_models_open_as_one(tmp_path: Path, given: str) -> None:
    shards, tensors = split_model(tmp_path)
    paths: Any = {
        "first": shards[0],
        "last": shards[2],
        "folder": tmp_path,
        "all reversed": shards[::-1],
    }[given]
    with jw.open_checkpoint(paths) as checkpoint:
        assert checkpoint.files == tuple(shards) and list(checkpoint) == list(tensors)
        assert checkpoint.metadata["split.count"] == 3 and checkpoint.metadata["split.no"] == 0
        assert checkpoint.metadata["general.architecture"] == "test"
        for name, value in tensors.items():
            np.testing.assert_array_equal(checkpoint.view(checkpoint[name]), value)


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    shards, _ = split_model(tmp_path)
    shards[1].unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"shard model-00002-of-00003.gguf is missing") as error:
        jw.open_checkpoint(shards[0])
    assert error.value.file == str(shards[1])


def test_renamed_shards_must_all_be_given(tmp_path: Path) -> None:
    shards, tensors = split_model(tmp_path)
    renamed = [shard.rename(tmp_path / f"{name}.gguf") for shard, name in zip(shards, "abc", strict=True)]
    with pytest.raises(CheckpointNotFoundError, match=r"shard\(s\) 2 \(split.no 1\) were not given"):
        jw.open_checkpoint([renamed[0], renamed[2]])
    with jw.open_checkpoint(renamed[::-1]) as checkpoint:
        assert list(checkpoint) == list(tensors)


def test_a_tensor_in_two_files_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "q4.gguf", {"w": np.ones(2, np.float32)})
    write(tmp_path / "q8.gguf", {"w": np.ones(2, np.float32)})
    with pytest.raises(DuplicateTensorError, match=r"'w' is in both .*q4.gguf and .*q8.gguf"):
        jw.open_checkpoint(tmp_path)


# -- malformed files -----------------------------------------------------------------------------


def refused(
    path: Path, match: str, error: type[Exception] = CheckpointError, tensor: str | None = None
) -> None:
    with pytest.raises(error, match=match) as caught:
        jw.open_checkpoint(path)
    assert isinstance(caught.value, jw.errors.WeightsError)
    assert caught.value.file == str(path) and str(path) in str(caught.value)
    assert caught.value.tensor == tensor


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUX" + b"\0" * 40)
    refused(path, r"GGUF files start with b'GGUF', it starts with b'GGUX")


@pytest.mark.parametrize(("version", "match"), [(1, "version 1 .32-bit counts"), (4, "version 4, newer")])
@pytest.mark.parametrize("order", ["<", ">"])
def test_unsupported_versions(tmp_path: Path, version: int, match: str, order: str) -> None:
    path = build(tmp_path / "m.gguf", version=version, order=order)
    refused(path, match, UnsupportedFormatError)


def test_big_endian_headers_are_read(tmp_path: Path) -> None:
    data = np.arange(4, dtype=">f4").tobytes()
    path = build(
        tmp_path / "m.gguf",
        [kv("n", 4, struct.pack(">I", 9), ">")],
        [info("w", [4], F32, 0, ">")],
        data,
        order=">",
    )
    with jw.open_checkpoint(path) as checkpoint:
        assert checkpoint.metadata["n"] == 9 and checkpoint["w"].byteorder == ">"
        assert checkpoint.view(checkpoint["w"]).tolist() == [0, 1, 2, 3]


def valid(path: Path) -> Path:
    array = struct.pack("<IQ", 8, 2) + string("a") + string("b")
    kvs = [kv("name", 8, string("x")), kv("words", 9, array)]
    return build(path, kvs, [info("w", [4], F32, 0), info("v", [2], F32, 32)], b"\1" * 40)


@pytest.mark.parametrize("keep", [6, 20, 30, 60, 90, 130, 150, 200, -1])
def test_truncated_files(tmp_path: Path, keep: int) -> None:
    path = valid(tmp_path / "m.gguf")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:keep])
    assert keep < size
    with pytest.raises(CheckpointError, match=r"truncated") as caught:
        jw.open_checkpoint(path)
    assert caught.value.file == str(path)


@pytest.mark.parametrize(
    "counts", [(2**60, 0), (0, 2**60), (2**64 - 1, 2**64 - 1)], ids=["tensors", "metadata", "both"]
)
def test_counts_beyond_the_file_are_refused_before_allocating(
    tmp_path: Path, counts: tuple[int, int]
) -> None:
    path = build(tmp_path / "m.gguf", [kv("k", 4, b"\0" * 4)], counts=counts)
    refused(path, r"its header claims \d+ tensors and \d+ metadata entries, which need at least")


@pytest.mark.parametrize(
    ("kvs", "match"),
    [
        (
            [struct.pack("<Q", 2**60) + b"key"],
            r"the key of metadata entry #0 at byte 32 needs 1152921504606846976",
        ),
        ([kv("k", 8, struct.pack("<Q", 2**62))], r"the value of metadata 'k' at byte \d+ needs"),
        ([kv("k", 9, struct.pack("<IQ", 8, 2**60))], r"the 1152921504606846976 items of metadata array 'k'"),
        (
            [kv("k", 9, struct.pack("<IQ", 8, 2) + string("a") + struct.pack("<Q", 2**40))],
            r"runs past the end",
        ),
        ([kv("k", 9, struct.pack("<IQ", 12, 2**59))], r"items of metadata array 'k' .* needs"),
        ([kv("k", 9, struct.pack("<IQ", 9, 2**58))], r"items of metadata array 'k' .* needs"),
    ],
    ids=["key", "string", "string array", "string in array", "number array", "array of arrays"],
)
def test_lengths_beyond_the_file_are_refused(tmp_path: Path, kvs: list[bytes], match: str) -> None:
    refused(build(tmp_path / "m.gguf", kvs), match)


def test_unaligned_offset(tmp_path: Path) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("w", [1], F32, 4)], data=b"\0" * 64)
    refused(path, r"tensor 'w' has offset 4, which is not a multiple of the file's alignment 32", tensor="w")


def test_offset_past_the_end(tmp_path: Path) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("w", [4], F32, 64)], data=b"\0" * 64)
    refused(path, r"tensor 'w' \(F32, shape \[4\]\) needs bytes \[\d+, \d+\), past the end", tensor="w")


@pytest.mark.parametrize(
    ("ne", "match"),
    [
        (
            [2**63, 0],
            r"ne=\[9223372036854775808, 0\], which no array can have \(dimension \d+ exceeds 2\*\*60\)",
        ),
        (
            [0, 2**40, 2**40],
            r"ne=\[0, \d+, \d+\], .*\(the product of its non-zero dimensions exceeds 2\*\*60\)",
        ),
        ([2**64 - 1], r"ne=\[18446744073709551615\], .*\(dimension 18446744073709551615 exceeds 2\*\*60\)"),
    ],
    ids=["2**63", "empty but huge", "u64 max"],
)
def test_dimensions_no_array_can_have_are_refused_at_parse(tmp_path: Path, ne: list[int], match: str) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("w", ne, F32, 0)])
    refused(path, rf"tensor 'w' has {match}. The file is corrupt", tensor="w")


def test_more_than_four_dimensions_are_refused_before_they_are_read(tmp_path: Path) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("w", [1] * 5, F32, 0)], data=b"\0" * 32)
    refused(path, r"tensor 'w' has 5 dimensions; GGUF tensors have at most 4 \(GGML_MAX_DIMS\)", tensor="w")
    # a dimension count of 2**32 - 1 is refused by the same rule, not by the bytes it would need
    huge = string("w") + struct.pack("<I", 2**32 - 1)
    refused(build(tmp_path / "n.gguf", infos=[huge]), r"has 4294967295 dimensions", tensor="w")
    four = build(tmp_path / "o.gguf", infos=[info("w", [1, 1, 1, 2], F32, 0)], data=b"\0" * 32)
    assert jw.load_weights(four).w.data().shape == (2, 1, 1, 1)


def test_overlapping_tensors(tmp_path: Path) -> None:
    infos = [info("a", [16], F32, 0), info("b", [8], F32, 32)]
    path = build(tmp_path / "m.gguf", infos=infos, data=b"\0" * 64)
    refused(path, r"tensors 'a' and 'b' overlap", tensor="b")


@pytest.mark.parametrize(
    ("kind", "name"), [(99, "unknown"), (16, "IQ2_XXS"), (15, "Q8_K"), (39, "MXFP4"), (35, "TQ2_0")]
)
def test_unreadable_ggml_types_are_named(tmp_path: Path, kind: int, name: str) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("blk.0.w", [256], kind, 0)], data=b"\0" * 1024)
    refused(
        path,
        rf"tensor 'blk.0.w' has ggml type {kind} \({name}\), which jaxweights cannot read",
        tensor="blk.0.w",
    )


@pytest.mark.parametrize(("kind", "ne"), [(2, [48, 2]), (12, [128]), (14, [])])
def test_quantized_rows_must_fill_whole_blocks(tmp_path: Path, kind: int, ne: list[int]) -> None:
    path = build(tmp_path / "m.gguf", infos=[info("w", ne, kind, 0)], data=b"\0" * 1024)
    refused(path, r"tensor 'w' is Q\d_[0K], which packs \d+ values per block, but its rows hold", tensor="w")


def test_unknown_metadata_value_type(tmp_path: Path) -> None:
    refused(build(tmp_path / "m.gguf", [kv("k", 13, b"\0" * 8)]), r"metadata 'k' has value type 13")
    array = kv("k", 9, struct.pack("<IQ", 42, 1) + b"\0" * 8)
    refused(build(tmp_path / "n.gguf", [array]), r"metadata 'k' has value type 42")


@pytest.mark.parametrize(
    "value",
    [kv("general.alignment", 4, struct.pack("<I", 0)), kv("general.alignment", 4, struct.pack("<I", 48)),
     kv("general.alignment", 8, string("32")), kv("general.alignment", 7, b"\1")],
    ids=["zero", "48", "string", "bool"],
)  # fmt: skip
def test_alignment_must_be_a_positive_power_of_two(tmp_path: Path, value: bytes) -> None:
    refused(
        build(tmp_path / "m.gguf", [value]),
        r"its 'general.alignment' is .*; it must be a positive power of two",
    )


def test_alignment_key_is_honoured(tmp_path: Path) -> None:
    align = kv("general.alignment", 4, struct.pack("<I", 64))
    path = build(
        tmp_path / "m.gguf",
        [align],
        [info("w", [2], F32, 0), info("v", [2], F32, 64)],
        b"\0" * 72,
        alignment=64,
    )
    with jw.open_checkpoint(path) as checkpoint:
        assert checkpoint["w"].start % 64 == 0 and checkpoint["v"].start - checkpoint["w"].start == 64
    bad = build(tmp_path / "n.gguf", [align], [info("w", [2], F32, 32)], b"\0" * 72, alignment=64)
    refused(bad, r"offset 32, which is not a multiple of the file's alignment 64", tensor="w")


def test_duplicates_are_refused(tmp_path: Path) -> None:
    path = build(
        tmp_path / "m.gguf", infos=[info("w", [1], F32, 0), info("w", [1], F32, 32)], data=b"\0" * 64
    )
    refused(path, r"it holds two tensors named 'w'", DuplicateTensorError, tensor="w")
    keys = [kv("k", 4, b"\0" * 4), kv("k", 4, b"\0" * 4)]
    refused(build(tmp_path / "n.gguf", keys), r"it holds metadata key 'k' twice")


def test_names_must_be_utf8(tmp_path: Path) -> None:
    refused(
        build(tmp_path / "m.gguf", infos=[info(b"w\xff", [1], F32, 0)], data=b"\0" * 32),
        r"the name of tensor #0 at byte \d+ is not UTF-8",
    )
    refused(
        build(tmp_path / "n.gguf", [kv(b"\xc3(", 4, b"\0" * 4)]),
        r"the key of metadata entry #0 at byte 24 is not UTF-8",
    )
    refused(
        build(tmp_path / "o.gguf", [kv("k", 8, string(b"\xff"))]),
        r"the value of metadata 'k' at byte \d+ is not UTF-8",
    )


@pytest.mark.parametrize("depth", [reader.MAX_ARRAY_DEPTH + 1, 100_000])
def test_deeply_nested_arrays_are_refused_without_recursion_errors(tmp_path: Path, depth: int) -> None:
    nested = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)
    refused(
        build(tmp_path / "m.gguf", [kv("k", 9, nested)]),
        rf"metadata 'k' nests arrays more than {reader.MAX_ARRAY_DEPTH} deep",
    )


def test_nested_arrays_within_the_limit_decode(tmp_path: Path) -> None:
    depth = reader.MAX_ARRAY_DEPTH
    nested = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 5)
    value: Any = jw.open_checkpoint(build(tmp_path / "m.gguf", [kv("k", 9, nested)])).metadata["k"]
    for _ in range(depth - 1):
        value = value[0]
    assert value.tolist() == [5]


def test_a_file_that_changed_since_opening_is_refused_when_an_array_is_read(
    vocabulary: Path, tmp_path: Path
) -> None:
    path = tmp_path / "v.gguf"
    path.write_bytes(vocabulary.read_bytes())
    metadata = jw.open_checkpoint(path).metadata
    with open(path, "ab") as out:
        out.write(b"\0")
    with pytest.raises(CheckpointError, match=r"changed size since it was opened"):
        metadata["tokenizer.ggml.token_type"]


def test_mutated_gguf_files_load_or_raise_a_jaxweights_error(tmp_path: Path) -> None:
    """Random byte flips (mostly in the header and metadata), truncations and count rewrites: never a
    crash, never another exception type, including when every metadata array is decoded."""
    source = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_head_count(4)
    writer.add_token_list([f"tok{i}".encode() for i in range(40)])
    writer.add_token_scores([float(i) for i in range(40)])
    writer.add_string("general.name", "mutant")
    values = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor(
        "blk.0.q",
        gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.add_tensor("blk.0.w", values)
    writer.add_tensor("blk.0.h", values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = source.read_bytes()
    rng = np.random.default_rng(11)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(240):
        data = bytearray(original)
        kind = trial % 3
        if kind == 0:  # flip bytes in the header, metadata and tensor infos
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(4, min(len(data), 1200)))] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate anywhere
            data = data[: int(rng.integers(0, len(data)))]
        else:  # rewrite the tensor count or the metadata count
            at = 8 if trial % 2 else 16
            data[at : at + 8] = int(rng.integers(0, 1 << 62)).to_bytes(8, "little")
        path = tmp_path / f"mutant{trial}.gguf"
        path.write_bytes(bytes(data))
        try:
            weights = jw.load_weights(path)
            for key in weights.metadata:
                weights.metadata[key]
            for _, accessor in weights.items():
                accessor.data()
                accessor.allocate()
                if accessor.info.encoding is not None:
                    accessor.allocate(dtype="float32")
            outcomes["loaded"] += 1
        except jw.errors.WeightsError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 80 and sum(outcomes.values()) == 240
