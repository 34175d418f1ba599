from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights.cli import default_checkpoint, main


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
