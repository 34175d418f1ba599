from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import jaxweights as jw
from jaxweights._shapes import element_count
from jaxweights.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DuplicateTensorError,
    UnsupportedFormatError,
)
from jaxweights.formats import ALIGNMENT, open_checkpoint
from jaxweights.formats.safetensors import read_header


def raw_file(path: Path, header: Any, data: bytes = b"", *, claimed_length: int | None = None) -> Path:
    """A file laid out by hand: u64 header length, header bytes, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if claimed_length is None else claimed_length
    path.write_bytes(struct.pack("<Q", length) + text + data)
    return path


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- reading -----------------------------------------------------------------------------------


def test_reads_reference_file_with_metadata(write_reference: Callable[..., Path]) -> None:
    values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int16)}
    path = write_reference(values, metadata={"format": "pt", "step": "3"})
    tensors, metadata, size = read_header(path)
    assert size == path.stat().st_size
    assert metadata == {"format": "pt", "step": "3"}
    assert {t.name: (t.dtype.name, t.shape) for t in tensors} == {
        "a": ("float32", (2, 3)),
        "b": ("int16", (2,)),
    }
    with open_checkpoint(path) as checkpoint:
        np.testing.assert_array_equal(checkpoint.view(checkpoint["a"]), values["a"])
        assert checkpoint.metadata == {"format": "pt", "step": "3"}
        assert not checkpoint.view(checkpoint["a"]).flags.writeable


def test_several_files_and_a_folder(write_reference: Callable[..., Path], tmp_path: Path) -> None:
    first = write_reference({"a.w": np.ones(2, np.float32)}, "m-00001-of-00002.safetensors")
    second = write_reference({"b.w": np.zeros(3, np.float32)}, "m-00002-of-00002.safetensors")
    for source in ([first, second], tmp_path, str(tmp_path)):
        weights = jw.load_weights(source)  # type: ignore[arg-type]
        assert [n for n, _ in weights.items()] == ["a.w", "b.w"]
        assert weights.b.w.data().shape == (3,)


def write_index(folder: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"metadata": {"total_size": 20}, "weight_map": weight_map}))
    return path


def test_index_json_decides_which_file_holds_a_duplicate(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    write_reference({"x": np.full(2, 1, np.float32), "y": np.ones(1, np.float32)}, "one.safetensors")
    write_reference({"x": np.full(2, 2, np.float32)}, "two.safetensors")
    index = write_index(tmp_path, {"x": "two.safetensors", "y": "one.safetensors"})
    for source in (index, tmp_path):
        weights = jw.load_weights(source)
        assert weights.x.data().data.tolist() == [2.0, 2.0]
        assert weights.metadata["total_size"] == 20
    with pytest.raises(DuplicateTensorError, match=r"'x' is in both .*one.safetensors and .*two.safetensors"):
        jw.load_weights([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])


def test_index_naming_a_missing_file(write_reference: Callable[..., Path], tmp_path: Path) -> None:
    write_reference({"x": np.ones(2, np.float32)}, "one.safetensors")
    index = write_index(tmp_path, {"x": "one.safetensors", "y": "gone.safetensors"})
    with pytest.raises(
        CheckpointNotFoundError, match=r"maps tensor 'y' to gone.safetensors, which does not exist"
    ):
        jw.load_weights(index)


@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x"]
)
def test_index_paths_never_leave_the_folder(tmp_path: Path, target: str) -> None:
    (tmp_path / "model").mkdir()
    index = write_index(tmp_path / "model", {"x": target})
    with pytest.raises(CheckpointError, match=r"outside the index's folder"):
        jw.load_weights(index)


def test_index_tensor_missing_from_its_file(write_reference: Callable[..., Path], tmp_path: Path) -> None:
    write_reference({"x": np.ones(2, np.float32)}, "one.safetensors")
    index = write_index(tmp_path, {"x": "one.safetensors", "z": "one.safetensors"})
    with pytest.raises(
        CheckpointError, match=r"maps tensor 'z' to .*one.safetensors, but that file has no such"
    ):
        jw.load_weights(index)


def test_index_with_a_name_twice(write_reference: Callable[..., Path], tmp_path: Path) -> None:
    write_reference({"x": np.ones(2, np.float32)}, "one.safetensors")
    write_reference({"x": np.zeros(2, np.float32)}, "two.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"x": "one.safetensors", "x": "two.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"names 'x' twice"):
        jw.load_weights(index)


def test_an_index_of_thousands_of_shards_opens(tmp_path: Path) -> None:
    """Opening is linear in the files an index names (it was quadratic: 16,000 shards took 20 s)."""
    count = 4000
    weight_map = {}
    for number in range(count):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        raw_file(tmp_path / name, {f"layers.{number}.w": entry("U8", [1], 0, 1)}, bytes([number % 256]))
        weight_map[f"layers.{number}.w"] = name
    weights = jw.load_weights(write_index(tmp_path, weight_map))
    assert len(weights.checkpoint.files) == count and len(weights.layers) == count
    assert weights.layers[3999].w.data().data.tolist() == [3999 % 256]
    assert weights.checkpoint["layers.10.w"].file.name == "model-00010-of-04000.safetensors"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"weight_map": {"x": "one.safetensors"}, "metadata": {"total_size": 1' + "0" * 5000 + "}}",
         r"is not a valid JSON index \(Exceeds the limit"),
        ('{"weight_map": {"\\ud800": "one.safetensors"}}', r"holds the string '\\ud800', which escapes half"),
        ('{"weight_map": {"x": "one\\udfff.safetensors"}}', r"which escapes half of a UTF-16 surrogate"),
        ('{"weight_map": {"x": "one\\u0000.safetensors"}}', r"maps tensor 'x' to 'one\\x00.safetensors', which is not a"),
        ('{"weight_map": {"x": "."}}', r"maps tensor 'x' to '.', which is not a file name"),
        ('{"weight_map": {"x": "one.safetensors"}, "weight_map": {}}', r"names 'weight_map' twice"),
        ('{"weight_map": {"x": "one.safetensors", "\\u0078": "one.safetensors"}}', r"names 'x' twice in 'weight_map'"),
    ],
    ids=["huge number", "surrogate name", "surrogate file", "nul", "dot", "two maps", "escaped twin"],
)  # fmt: skip
def test_malformed_indexes_are_refused_by_name(
    write_reference: Callable[..., Path], tmp_path: Path, text: str, match: str
) -> None:
    write_reference({"x": np.ones(2, np.float32)}, "one.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=match) as caught:
        jw.load_weights(index)
    assert caught.value.file == str(index) and str(index) in str(caught.value)


def test_index_naming_a_file_the_file_system_cannot_look_up(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    shard = write_reference({"x": np.ones(2, np.float32)}, "one.safetensors")
    for target, error, match in [
        (
            "a" * 300 + ".safetensors",
            jw.errors.CheckpointReadError,
            r"which cannot be looked up \(File name too long\)",
        ),
        (
            "one.safetensors/inner.safetensors",
            CheckpointNotFoundError,
            r"to inner.safetensors, which does not exist",
        ),
        ("sub", jw.errors.CheckpointReadError, r"sub is a folder, not a regular file"),
    ]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        index = write_index(tmp_path, {"x": "one.safetensors", "y": target})
        with pytest.raises(error, match=match) as caught:
            jw.load_weights(index)
        assert isinstance(caught.value, jw.errors.WeightsError)
    assert shard.exists()


def test_index_that_is_not_an_index(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"has no 'weight_map' object"):
        jw.load_weights(index)
    index.write_bytes(b"{\xff")
    with pytest.raises(CheckpointError, match=r"is not a valid JSON index"):
        jw.load_weights(index)


# -- bad input: every case names the file (and the tensor where there is one) -----------------


def test_truncated_below_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(
        CheckpointError, match=r"short.safetensors is not a valid safetensors file: it has 2 bytes"
    ):
        jw.load_weights(path)


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "big.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, claimed_length=10**9
    )
    with pytest.raises(CheckpointError, match=r"big.safetensors .*header claims 1000000000 bytes but only"):
        jw.load_weights(path)


def test_truncated_data(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "cut.safetensors", {"a": entry("F32", [4], 0, 16)}, b"\0" * 10)
    with pytest.raises(
        CheckpointError, match=r"cut.safetensors.*tensor 'a' has data_offsets \[0, 16\] outside"
    ):
        jw.load_weights(path)


def test_non_utf8_header(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", b'{"\xff\xfe": 1}')
    with pytest.raises(CheckpointError, match=r"bad.safetensors .*header is not UTF-8"):
        jw.load_weights(path)


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b'"text"', b"{not json"])
def test_header_that_is_not_a_json_object(tmp_path: Path, header: bytes) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=r"bad.safetensors is not a valid safetensors file"):
        jw.load_weights(path)


def test_deeply_nested_header_does_not_crash(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "deep.safetensors", b"{" + b'"a":' * 1 + b"[" * 200_000 + b"]" * 200_000 + b"}"
    )
    with pytest.raises(CheckpointError, match=r"deep.safetensors"):
        jw.load_weights(path)


def test_duplicate_keys_in_header(tmp_path: Path) -> None:
    text = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    path = raw_file(tmp_path / "dup.safetensors", text, b"\0\0")
    with pytest.raises(CheckpointError, match=r"dup.safetensors .*names 'a' twice"):
        jw.load_weights(path)


def test_unknown_dtype(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "odd.safetensors", {"w": entry("F7", [1], 0, 1)}, b"\0")
    with pytest.raises(
        CheckpointError, match=r"odd.safetensors.*tensor 'w' has dtype 'F7', which jaxweights cannot"
    ):
        jw.load_weights(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (entry("F32", [2], 0, 12), r"tensor 'w' has shape \[2\] and dtype F32, which need 8 bytes"),
        (entry("F32", [-1], 0, 4), r"tensor 'w' has a negative dimension"),
        (entry("F32", [2**40, 2**40], 0, 8), r"tensor 'w' has shape \[1099511627776, 1099511627776\]"),
        (entry("F32", [1.5], 0, 4), r"tensor 'w' has shape \[1.5\]; expected a list of integers"),
        (entry("F32", [True], 0, 4), r"tensor 'w' has shape \[True\]"),
        ({"dtype": "F32", "shape": [1]}, r"tensor 'w' has data_offsets None"),
        (entry("F32", [1], 8, 4), r"tensor 'w' has data_offsets \[8, 4\] outside"),
        (entry("F32", [1], -4, 0), r"tensor 'w' has data_offsets \[-4, 0\] outside"),
        (entry("F4", [3], 0, 1), r"tensor 'w' of 3 float4_e2m1fn elements does not fill whole bytes"),
        ("not an object", r"tensor 'w' must be described by a JSON object"),
    ],
)
def test_bad_tensor_entries(tmp_path: Path, spec: Any, message: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"w": spec}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=message) as caught:
        jw.load_weights(path)
    assert caught.value.tensor == "w" and caught.value.file == str(path)


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = raw_file(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensors 'a' and 'b' overlap"):
        jw.load_weights(path)


@pytest.mark.parametrize(
    "metadata",
    [{"step": 3}, {"step": None}, {"a": "1", "b": ["x"]}, {"a": {}}, [], 0, False, "", [["a", "b"]]],
)
def test_bad_metadata(tmp_path: Path, metadata: Any) -> None:
    path = raw_file(tmp_path / "meta.safetensors", {"__metadata__": metadata})
    with pytest.raises(
        CheckpointError, match=r"meta.safetensors .*'__metadata__' must map strings to strings"
    ):
        jw.load_weights(path)


def test_null_metadata_is_no_metadata_as_in_the_reference_reader(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "m.safetensors", {"__metadata__": None, "w": entry("U8", [1], 0, 1)}, b"\7")
    with safetensors.safe_open(str(path), "np") as reference:
        assert reference.metadata() is None
    weights = jw.load_weights(path)
    assert dict(weights.metadata) == {} and weights.w.data().data.tolist() == [7]


W = b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'{"w": {"\\u0064type": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
         r"the header entry of tensor 'w' names 'dtype' twice"),
        (b'{"__metadata__": {}, "__metadata__": {}, ' + W + b"}", r"its header names '__metadata__' twice"),
        (b'{"__metadata__": {"a": "1", "a": "2"}, ' + W + b"}", r"its '__metadata__' names 'a' twice"),
        (b'{"w" : {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' + W + b"}",
         r"its header names 'w' twice"),
        (b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": {"y": 1, "y": 2}}}',
         r"the header entry of tensor 'w' names 'y' twice"),
        (b'{"__metadata__": {"t": "12:30"}, "w": {"dtype": "U8", "shape": [1], "shape": [1], "data_offsets": [0, 1]}}',
         r"the header entry of tensor 'w' names 'shape' twice"),
    ],
    ids=["escaped key", "metadata twice", "inside metadata", "space before colon", "nested", "colon in a value"],
)  # fmt: skip
def test_duplicate_keys_are_refused_at_any_level(tmp_path: Path, text: bytes, match: str) -> None:
    path = raw_file(tmp_path / "dup.safetensors", text, b"\0")
    with pytest.raises(CheckpointError, match=rf"dup.safetensors is not a valid safetensors file: {match}"):
        jw.load_weights(path)


def test_lone_surrogates_are_refused_like_the_reference_reader(tmp_path: Path) -> None:
    def header(name: bytes, value: bytes = b"1") -> bytes:
        return (
            b'{"__metadata__": {"k": "'
            + value
            + b'"}, "'
            + name
            + b'": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
        )

    for number, text in enumerate([header(b"\\ud800"), header(b"a\\udc00b"), header(b"w", b"\\uDBFF")]):
        path = raw_file(tmp_path / f"s{number}.safetensors", text, b"\0")
        with pytest.raises(safetensors.SafetensorError):
            safetensors.safe_open(str(path), "np")
        with pytest.raises(CheckpointError, match=r"escapes half of a UTF-16 surrogate pair") as caught:
            jw.load_weights(path)
        str(caught.value).encode("utf-8")  # the message itself is printable
    pair = raw_file(tmp_path / "pair.safetensors", header(b"\\ud83d\\ude00", b"\\\\ud800"), b"\0")
    weights = jw.load_weights(pair)  # a valid pair, and an escaped backslash before "ud800"
    assert weights.keys() == ["\U0001f600"] and weights.metadata["k"] == "\\ud800"


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (
            [0, 2**63],
            r"\[0, 9223372036854775808\], which no array can have \(dimension \d+ exceeds 2\*\*60\)",
        ),
        ([0, 2**64 - 1], r"\[0, 18446744073709551615\], .*\(dimension 18446744073709551615 exceeds"),
        ([2**31, 0, 2**31], r"\[2147483648, 0, 2147483648\], .*\(the product of its non-zero dimensions"),
        (
            [1] * 70,
            r"\[1, 1, 1, 1, 1, 1, 1, 1, ...\], which no array can have \(70 dimensions, more than 64\)",
        ),
        ([0, 10**100], r"\[0, <101-digit number>\]"),
    ],
    ids=["2**63", "u64 max", "product", "70 dims", "googol"],
)
def test_shapes_no_array_can_have_are_refused_at_parse(tmp_path: Path, shape: list[int], match: str) -> None:
    ones = element_count(shape) == 1
    path = raw_file(tmp_path / "big.safetensors", {"w": entry("U8", shape, 0, int(ones))}, b"\0")
    with pytest.raises(CheckpointError, match=r"big.safetensors .*tensor 'w' has shape " + match) as caught:
        read_header(path)
    assert caught.value.tensor == "w" and "download or save the file again" in str(caught.value)
    with pytest.raises(CheckpointError, match=match):
        jw.load_weights(path)


def test_the_largest_shapes_an_array_can_have_still_load(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "m.safetensors",
        {"e": entry("F64", [0, 2**60 - 1], 0, 0), "d": entry("U8", [1] * 64, 0, 1)},
        b"\0",
    )
    weights = jw.load_weights(path)
    assert weights.e.data().shape == (0, 2**60 - 1) and weights.e.allocate().shape == (0, 2**60 - 1)
    assert weights.d.data().shape == (1,) * 64


def test_empty_path_list_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"No checkpoint paths were given"):
        jw.load_weights([])
    with pytest.raises(CheckpointNotFoundError, match=r"nope.safetensors does not exist"):
        jw.load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointNotFoundError, match=r"holds no weight files \(looked for \*.safetensors, "):
        jw.load_weights(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"empty.safetensors is not a valid safetensors file: it has 0 bytes"
    ):
        jw.load_weights(path)


def test_not_a_checkpoint_at_all(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, this is text")
    with pytest.raises(UnsupportedFormatError, match=r"notes.txt is not a safetensors, GGUF or PyTorch file"):
        jw.load_weights(path)


def test_mixed_formats(write_reference: Callable[..., Path], tmp_path: Path) -> None:
    good = write_reference({"a": np.ones(1, np.float32)})
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(UnsupportedFormatError, match=r"The paths mix formats"):
        jw.load_weights([good, gguf])
    assert jw.weights_format(gguf) is jw.WeightsFormat.gguf
    assert jw.weights_format(good) is jw.WeightsFormat.safetensors


def test_a_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    # 0x280 = 640 bytes of header: the file starts with b"\x80\x02", a pickle's protocol-2 marker.
    text = json.dumps({"a": entry("F32", [1], 0, 4)}).encode()
    path = raw_file(tmp_path / "m.bin", text + b" " * (0x280 - len(text)), b"\0" * 4)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert jw.weights_format(path) is jw.WeightsFormat.safetensors
    assert jw.load_weights(path).a.data().shape == (1,)


# -- writer ------------------------------------------------------------------------------------


def test_writer_aligns_every_even_sized_tensor(tmp_path: Path) -> None:
    values = {
        "odd": np.arange(3, dtype=np.uint8),
        "big": np.ones((64, 32), np.float32),
        "bias": np.ones(16, np.float32),
        "half": np.ones(7, np.float16),
    }
    path = jw.save_file(values, tmp_path / "aligned.safetensors", metadata={"k": "v"})
    checkpoint = open_checkpoint(path)
    assert list(checkpoint) == list(values)  # the header keeps the caller's order
    assert checkpoint["big"].start % ALIGNMENT == 0 and checkpoint["bias"].start % ALIGNMENT == 0
    loaded = safetensors.numpy.load_file(str(path))  # the reference reader accepts the layout
    for name, value in values.items():
        np.testing.assert_array_equal(loaded[name], value)
    checkpoint.close()


def test_writer_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = jw.save_file({"a": np.ones(4, np.float32)}, tmp_path / "m.safetensors")
    before = path.read_bytes()

    class Exploding:
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match=r"disk on fire"):
        jw.save_file({"a": np.zeros(4, np.float32), "b": Exploding()}, path)
    with pytest.raises(jw.errors.DTypeError):
        jw.save_file({"a": np.zeros(4, np.float32), "b": np.array(["text"])}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ({"\ud800": np.ones(1)}, None, r"Tensor name '\\ud800' is not valid Unicode text"),
        ({"w": np.ones(1)}, {"k\udcff": "v"}, r"A metadata key 'k\\udcff' is not valid"),
        ({"w": np.ones(1)}, {"k": "\udfff"}, r"The metadata value of 'k' '\\udfff' is not valid"),
    ],
)
def test_writer_refuses_text_that_is_not_unicode(
    tmp_path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None, match: str
) -> None:
    with pytest.raises(jw.errors.ArgumentError, match=match) as caught:
        jw.save_file(tensors, tmp_path / "m.safetensors", metadata=metadata)
    str(caught.value).encode("utf-8")
    assert os.listdir(tmp_path) == []


def test_writer_never_mutates_the_callers_dict(tmp_path: Path) -> None:
    values: dict[str, np.ndarray] = {"b": np.arange(4, dtype=np.float32), "a": np.ones(2, np.int8)}
    snapshot = {k: v.copy() for k, v in values.items()}
    jw.save_file(values, tmp_path / "m.safetensors")
    assert list(values) == ["b", "a"]
    for name in values:
        np.testing.assert_array_equal(values[name], snapshot[name])


def test_mutated_files_load_or_raise_a_jaxweights_error(tmp_path: Path) -> None:
    """Random byte flips, truncations and header edits: never a crash, never another exception type."""
    rng = np.random.default_rng(7)
    values = {
        "a.w": np.arange(24, dtype=np.float32).reshape(4, 6),
        "a.b": np.arange(5, dtype=np.int8),
        "c": np.ones(3, np.float16),
    }
    original = jw.save_file(values, tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(original)
        kind = trial % 3
        if kind == 0:  # flip bytes, mostly inside the header
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, header_end))] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate anywhere
            data = data[: int(rng.integers(0, len(data)))]
        else:  # rewrite the length prefix
            data[:8] = int(rng.integers(0, 2 * len(data))).to_bytes(8, "little")
        path = tmp_path / f"mutant{trial}.safetensors"
        path.write_bytes(bytes(data))
        try:
            weights = jw.load_weights(path)
            for _, accessor in weights.items():
                accessor.data()
                accessor.allocate()
            outcomes["loaded"] += 1
        except jw.errors.WeightsError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and sum(outcomes.values()) == 300
