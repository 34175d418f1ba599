from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
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
