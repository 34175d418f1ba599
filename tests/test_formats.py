from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
import jaxweights.formats as formats
from jaxweights import DType
from jaxweights.errors import CheckpointError, CheckpointNotFoundError, UnsupportedFormatError
from jaxweights.formats import Checkpoint, FormatPlugin, TensorInfo, WeightsFormat


def test_weights_format_is_a_string_enum() -> None:
    assert WeightsFormat("safetensors") is WeightsFormat.safetensors
    assert WeightsFormat("safetensors") == "safetensors" and isinstance(WeightsFormat.gguf, str)
    assert f"{WeightsFormat.pytorch}" == "pytorch"
    assert repr(WeightsFormat.gguf) == "<WeightsFormat.gguf: 'gguf'>"


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("model.gguf", b"GGUF" + struct.pack("<I", 3) + b"\0" * 4),
        ("weights.safetensors", b"GGUF" + struct.pack("<I", 3) + b"{" * 4),  # magic bytes beat suffixes
    ],
)
def test_gguf_files_are_recognised_by_their_magic_bytes(tmp_path: Path, name: str, head: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(head)  # a truncated GGUF header: its own parser says what is wrong
    assert jw.weights_format(path) is WeightsFormat.gguf
    assert formats.sniff_format(path).name is WeightsFormat.gguf
    with pytest.raises(CheckpointError, match=rf"{name}"):
        jw.open_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("pytorch_model.bin", b"PK\x03\x04" + b"\0" * 26),
        ("old.pt", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."),
    ],
)
def test_pytorch_files_are_recognised_and_a_truncated_one_named(
    tmp_path: Path, name: str, head: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(head)
    assert jw.weights_format(path) is WeightsFormat.pytorch
    with pytest.raises(CheckpointError, match=rf"{name}") as caught:
        jw.open_checkpoint(path)
    assert caught.value.file == str(path)
    assert formats.sniff_format(path).name is WeightsFormat.pytorch


def test_a_folder_of_gguf_files_is_read_as_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    (tmp_path / "config.json").write_text("{}")
    assert formats.expand_paths(tmp_path) == [tmp_path / "model.gguf"]
    with pytest.raises(UnsupportedFormatError, match=r"model.gguf is GGUF version 0"):
        jw.open_checkpoint(tmp_path)


def test_a_folder_prefers_safetensors_over_other_formats(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    write_reference({"w": np.ones(2, np.float32)})
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 26)
    assert formats.expand_paths(tmp_path) == [tmp_path / "model.safetensors"]
    assert jw.weights_format(tmp_path) is WeightsFormat.safetensors


def test_a_folder_with_no_weights_names_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.txt").write_text("a b c")
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"holds no weight files \(looked for \*.safetensors, \*.safetensors.index.json, \*.gguf, "
        r"\*.bin, \*.pt, \*.pth, \*.bin.index.json\); it holds: config.json, tokenizer.txt\.",
    ):
        jw.open_checkpoint(tmp_path)


def test_unknown_files_are_refused_and_empty_ones_said_to_be(tmp_path: Path) -> None:
    empty = tmp_path / "data.bin"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match=r"data.bin is not a PyTorch checkpoint \(it is empty\)"):
        jw.open_checkpoint(empty)


def test_the_index_belongs_to_the_safetensors_plugin(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    write_reference({"w": np.ones(2, np.float32)}, "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "model-00001-of-00001.safetensors"}}')
    assert formats.sniff_format(index) is formats.plugin_for("safetensors")
    assert formats.expand_paths(tmp_path) == [index]


def test_plugin_for_an_unknown_format() -> None:
    with pytest.raises(UnsupportedFormatError, match=r"'onnx' is not a checkpoint format jaxweights knows"):
        formats.plugin_for("onnx")
    with pytest.raises(UnsupportedFormatError, match=r"cannot write GGUF files"):
        formats.plugin_for("gguf").require_writer()


def test_a_new_format_is_one_plugin_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toy "GGUF" reader: magic, then one little-endian float32 tensor named ``w`` from byte 8."""

    def open_toy(paths: Sequence[Path]) -> Checkpoint:
        (path,) = paths
        count = (path.stat().st_size - 8) // 4
        info = TensorInfo("w", DType.float32, (count,), path, 8, 8 + 4 * count)
        return Checkpoint(WeightsFormat.gguf, {"w": info}, [path])

    toy = FormatPlugin(
        WeightsFormat.gguf, "toy GGUF", (".gguf",), lambda head, path: head[:4] == b"GGUF", open=open_toy
    )
    registry = tuple(toy if plugin.name is WeightsFormat.gguf else plugin for plugin in formats.FORMATS)
    monkeypatch.setattr(formats, "FORMATS", registry)

    path = tmp_path / "toy.gguf"
    path.write_bytes(b"GGUF\x03\0\0\0" + np.arange(3, dtype="<f4").tobytes())
    with jw.open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.format is WeightsFormat.gguf
        assert checkpoint.view(checkpoint["w"]).tolist() == [0.0, 1.0, 2.0]
    assert jw.load_weights(path).w.data().data.tolist() == [0.0, 1.0, 2.0]
    assert dataclasses.replace(toy, open=None).open is None  # plugins are frozen values


def test_the_registry_lists_each_format_once_and_safetensors_first() -> None:
    names = [plugin.name for plugin in formats.FORMATS]
    assert names[0] is WeightsFormat.safetensors and sorted(names) == sorted(WeightsFormat)
    assert formats.plugin_for(WeightsFormat.safetensors).writer is not None
