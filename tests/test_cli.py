from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
import jaxweights._weights
import jaxweights.cli
from jaxweights.cli import default_checkpoint, main


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jaxweights", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _read_one_line_then_close(*args: str) -> tuple[int, str]:
    """Runs ``python -m jaxweights ARGS | head -1``: reads one line, closes the pipe, returns (status, stderr)."""
    with subprocess.Popen(
        [sys.executable, "-m", "jaxweights", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline()
        process.stdout.close()
        stderr = process.stderr.read()
        return process.wait(timeout=120), stderr


def test_inspect(transformer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(transformer)]) == 0
    out = capsys.readouterr().out
    assert "37 tensors" in out and "(x12: 0..11 share this layout)" in out
    assert main(["inspect", "--full", str(transformer)]) == 0
    assert "── 11  [3 tensors" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxweights: ") and "bad.safetensors" in err and err.count("\n") == 1


def test_convert_writes_an_aligned_copy(transformer: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "aligned.safetensors"
    assert main(["convert", str(transformer), str(target)]) == 0
    original, converted = jw.load_weights(transformer), jw.load_weights(target)
    assert original.keys() == converted.keys()
    for name in original.keys():  # noqa: SIM118 - keys() is the accessor method
        np.testing.assert_array_equal(original[name].data().data, converted[name].data().data)
        if original[name].info.nbytes % 64 == 0:
            assert converted[name].info.is_aligned()


def test_demo_uses_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "tensors" in out and "allocated" in out
    assert default_checkpoint().name == "model.safetensors"


def test_malformed_file_is_one_line_naming_it_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(os.urandom(100))
    result = _run_cli("inspect", str(bad))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("jaxweights: ") and "x.safetensors" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert main(["inspect", str(missing)]) == 2
    assert main(["convert", str(missing), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("jaxweights: ") and str(missing) in line for line in err)


def test_os_errors_from_paths_are_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = str(tmp_path / "locked.safetensors")

    def refuse(paths: object) -> None:
        raise PermissionError(13, "Permission denied", locked)

    monkeypatch.setattr(jaxweights.cli, "load_weights", refuse)
    assert main(["inspect", locked]) == 2
    assert capsys.readouterr().err == (
        f"jaxweights: cannot use {locked}: Permission denied. Check the path and its permissions.\n"
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file_exits_2(transformer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformer.chmod(0)
    try:
        assert main(["inspect", str(transformer)]) == 2
    finally:
        transformer.chmod(0o644)
    err = capsys.readouterr().err
    assert err.startswith("jaxweights: ") and transformer.name in err and err.count("\n") == 1


def test_directory_as_convert_target_exits_2(
    transformer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", str(transformer), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxweights: ") and err.count("\n") == 1


def test_keyboard_interrupt_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxweights.cli, "_demo", interrupt)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "jaxweights: interrupted\n"


def test_usage_errors_exit_2_and_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out == f"jaxweights {jw.__version__}\n"


def test_reader_closing_early_ends_quietly(tmp_path: Path) -> None:
    # More output than a pipe holds, so the writer is sure to find the pipe closed.
    path = jw.save_file(
        {f"tensor_{i:05d}.weight": np.zeros(2, np.float32) for i in range(3000)},
        tmp_path / "many.safetensors",
    )
    status, stderr = _read_one_line_then_close("inspect", "--full", str(path))
    assert status == 1 and stderr == ""
    status, stderr = _read_one_line_then_close("demo")  # small output: may all fit before the close
    assert status in (0, 1) and "Traceback" not in stderr and "BrokenPipeError" not in stderr


# -- GGUF: inspect and convert ----------------------------------------------------------------


def _gguf_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "token_embd.weight": rng.standard_normal((8, 64), dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((300, 64), dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(64, dtype=np.float32),
        "positions": np.arange(5, dtype=np.int32),
    }


def _q8(value: np.ndarray) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0))


def _q8_reference(value: np.ndarray) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.dequantize(_q8(value), gguf.GGMLQuantizationType.Q8_0), np.float32)


def _write_gguf(path: Path, tensors: dict[str, np.ndarray], quantized: set[str]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(8)
    writer.add_name("tiny llama")
    writer.add_float32("tiny.ratio", 0.5)
    writer.add_bool("tiny.flag", True)
    writer.add_token_list([f"tok{i}" for i in range(7)])
    for name, value in tensors.items():
        if name in quantized:
            writer.add_tensor(name, _q8(value), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint with one Q8_0 tensor, built without the GGUF reader: raw blocks in a file and their
    `TensorInfo`s, handed to the CLI in place of `open_checkpoint`."""
    tensors = _gguf_tensors()
    path = tmp_path / "fake.gguf"
    blobs = {
        name: (_q8(value) if name == "blk.0.attn_q.weight" else np.ascontiguousarray(value)).tobytes()
        for name, value in tensors.items()
    }
    infos, start = {}, 0
    for name, blob in blobs.items():
        encoding = jw.QuantizationEncoding.Q8_0 if name == "blk.0.attn_q.weight" else None
        dtype = jw.DType.uint8 if encoding else jw.DType.from_any(tensors[name].dtype)
        infos[name] = jw.TensorInfo(
            name, dtype, tensors[name].shape, path, start, start + len(blob), encoding
        )
        start += len(blob)
    path.write_bytes(b"".join(blobs.values()))
    metadata = {"general.architecture": "llama", "llama.attention.head_count": 8, "vocab": ["a", "b"]}
    monkeypatch.setattr(  # what load_weights opens, for every command
        jaxweights._weights,
        "open_checkpoint",
        lambda paths, mmap=True: jw.Checkpoint(jw.WeightsFormat.gguf, dict(infos), [path], metadata=metadata),
    )
    return path


def test_convert_refuses_quantized_tensors_without_dequantize(
    fake_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.safetensors"
    assert main(["convert", str(fake_gguf), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 quantized tensor(s) (Q8_0 x1" in err and "--dequantize" in err
    assert not target.exists()


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float64"])
def test_convert_dequantizes(fake_gguf: Path, tmp_path: Path, dtype: str | None) -> None:
    target = tmp_path / "out.safetensors"
    assert (
        main(["convert", str(fake_gguf), str(target), "--dequantize", *(["--dtype", dtype] if dtype else [])])
        == 0
    )
    tensors, want = _gguf_tensors(), jw.DType.from_any(dtype or "float32")
    with jw.open_checkpoint(target) as converted:
        assert list(converted) == list(tensors)  # every tensor, in order
        q = converted.view(converted["blk.0.attn_q.weight"])
        assert converted["blk.0.attn_q.weight"].dtype is want
        reference = _q8_reference(tensors["blk.0.attn_q.weight"]).astype(want.to_numpy())
        np.testing.assert_array_equal(q, reference)
        norm = converted["blk.0.attn_norm.weight"]  # plain floats: --dtype only if given
        assert norm.dtype is (want if dtype else jw.DType.float32)
        np.testing.assert_array_equal(converted.view(norm), tensors[norm.name].astype(norm.dtype.to_numpy()))
        np.testing.assert_array_equal(
            converted.view(converted["positions"]), tensors["positions"]
        )  # ints kept
        assert dict(converted.metadata) == {
            "general.architecture": "llama",
            "llama.attention.head_count": "8",
        }


def test_convert_in_row_chunks_is_the_same(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, chunked = tmp_path / "whole.safetensors", tmp_path / "chunked.safetensors"
    assert main(["convert", str(fake_gguf), str(whole), "--dequantize", "--dtype", "float16"]) == 0
    monkeypatch.setattr(jaxweights.cli, "_CHUNK_BYTES", 64 * 2 * 7)  # 7 rows at a time: 300 = 42 x 7 + 6
    assert main(["convert", str(fake_gguf), str(chunked), "--dequantize", "--dtype", "float16"]) == 0
    assert whole.read_bytes() == chunked.read_bytes()


def test_convert_dtype_for_safetensors_and_bad_dtypes(
    transformer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "half.safetensors"
    assert main(["convert", str(transformer), str(target), "--dtype", "bf16"]) == 0
    original, converted = jw.load_weights(transformer), jw.load_weights(target)
    for name in original.keys():  # noqa: SIM118 - keys() is the accessor method
        assert converted[name].dtype is jw.DType.bfloat16
        expected = np.asarray(original[name].data().data).astype(jw.DType.bfloat16.to_numpy())
        np.testing.assert_array_equal(converted[name].data().data, expected)
    capsys.readouterr()
    assert main(["convert", str(transformer), str(target), "--dtype", "int8"]) == 2
    assert main(["convert", str(transformer), str(target), "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "--dtype int8: converted tensors need a float type" in err[0] and "ambiguous" in err[1]


def test_inspect_prints_sorted_metadata_with_arrays_summarised(
    write_reference: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_reference({"w": np.zeros(2, np.float32)}, metadata={"b": "two", "a": "one"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("metadata (2 keys):\n  a  one\n  b  two\n")
    lazy = jaxweights.cli._metadata_lines({"n": 3, "v": ["x", "y"], "s": np.zeros(4, np.uint32)})
    assert lazy == ["  n  3", "  s  [uint32 x 4]", "  v  [string x 2]"]


def test_inspect_and_convert_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = _gguf_tensors()
    path = _write_gguf(tmp_path / "tiny.gguf", tensors, {"blk.0.attn_q.weight"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q8_0[300, 64]" in out and "float32[64]" in out
    lines = out[out.index("metadata (") :].splitlines()[1:]
    keys = [line.split()[0] for line in lines]
    assert keys == sorted(keys) and "general.architecture" in keys
    shown = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert shown["tokenizer.ggml.tokens"] == "[string x 7]" and shown["llama.attention.head_count"] == "8"
    assert shown["general.name"] == "tiny llama" and shown["tiny.flag"] == "True"

    target = tmp_path / "tiny.safetensors"
    assert main(["convert", str(path), str(target)]) == 2
    assert "--dequantize" in capsys.readouterr().err
    assert main(["convert", str(path), str(target), "--dequantize"]) == 0
    with jw.open_checkpoint(target) as converted:
        np.testing.assert_array_equal(
            converted.view(converted["blk.0.attn_q.weight"]), _q8_reference(tensors["blk.0.attn_q.weight"])
        )
        for name in ("token_embd.weight", "blk.0.attn_norm.weight", "positions"):
            np.testing.assert_array_equal(converted.view(converted[name]), tensors[name])
        metadata = dict(converted.metadata)
    assert metadata["llama.attention.head_count"] == "8" and metadata["general.name"] == "tiny llama"
    assert metadata["tiny.flag"] == "true" and metadata["tiny.ratio"] == "0.5"
    assert "tokenizer.ggml.tokens" not in metadata


def test_inspect_prefix_and_json(transformer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["inspect", str(transformer), "--prefix", "transformer.layers.3"]) == 0
    out = capsys.readouterr().out
    assert "layers.4" not in out and "3 tensors" in out
    assert main(["inspect", str(transformer), "--json", "--prefix", "transformer.layers.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "safetensors" and report["count"] == 3 == len(report["tensors"])
    first = report["tensors"][0]
    assert first["name"].startswith("transformer.layers.3.") and set(first) == {
        "name",
        "dtype",
        "shape",
        "nbytes",
        "file",
        "encoding",
    }
    assert report["nbytes"] == sum(t["nbytes"] for t in report["tensors"])
    assert main(["inspect", str(transformer), "--prefix", "no.such"]) == 2
    assert "--prefix 'no.such' names nothing" in capsys.readouterr().err


def test_diff_names_layouts_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    base: dict[str, np.ndarray] = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(3, np.int32),
        "c": np.zeros(2),
    }
    changed = {**base, "a": base["a"] + np.float32(0.5), "b": np.ones(4, np.int32), "d": np.ones(1)}
    del changed["c"]
    first = jw.save_file(base, tmp_path / "a.safetensors")
    second = jw.save_file(changed, tmp_path / "b.safetensors")
    assert main(["diff", str(first), str(first), "--values"]) == 0
    assert "identical names, dtypes, shapes and values: 3 tensor(s)" in capsys.readouterr().out
    assert main(["diff", str(first), str(second)]) == 1
    out = capsys.readouterr().out
    assert "only in A" in out and "  c" in out and "only in B" in out and "  d" in out
    assert "b: int32[3] -> int32[4]" in out and "different values" not in out
    assert main(["diff", str(first), str(second), "--values", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["only_in_a"] == ["c"] and report["only_in_b"] == ["d"]
    assert report["values"] == [{"name": "a", "max_abs_difference": 0.5}] and not report["identical"]
    nan = jw.save_file({"x": np.array([np.nan, 1.0], np.float32)}, tmp_path / "n1.safetensors")
    other = jw.save_file({"x": np.array([np.nan, 2.0], np.float32)}, tmp_path / "n2.safetensors")
    assert main(["diff", str(nan), str(nan), "--values"]) == 0  # NaNs in the same places are equal
    assert main(["diff", str(nan), str(other), "--values"]) == 1
    assert "x: 1" in capsys.readouterr().out
    assert main(["diff", str(first), str(tmp_path / "missing.safetensors")]) == 2


def test_long_work_draws_progress_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jaxweights._progress import Progress

    def shown(total: int, count: int, label: str) -> Progress:  # as on a terminal, whatever the size
        return Progress(total, count, enabled=True, label=label)

    monkeypatch.setattr(jaxweights.cli, "_progress", shown)
    source = jw.save_file(
        {f"w{i}": np.full(256, i, np.float32) for i in range(3)}, tmp_path / "a.safetensors"
    )
    assert main(["convert", str(source), str(tmp_path / "b.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "jaxweights convert: 100% 3.1 kB / 3.1 kB, 3/3 tensors" in err and err.endswith("\n")
    assert main(["diff", str(source), str(tmp_path / "b.safetensors"), "--values"]) == 0
    assert "jaxweights diff: 100%" in capsys.readouterr().err
