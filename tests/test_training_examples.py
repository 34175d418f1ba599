"""examples/train_flax.py and examples/train_equinox.py: a run checkpointed every step and restarted from
its latest step follows an uninterrupted run bit for bit, and every step is a plain safetensors folder."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path
from types import ModuleType

import pytest
import safetensors.numpy

import jaxweights as jw

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_flax", "train_equinox"])
def test_restart_follows_an_uninterrupted_run(tmp_path: Path, name: str) -> None:
    module = example(name)
    result = module.main(str(tmp_path / "restarted"))
    uninterrupted = module.train(str(tmp_path / "uninterrupted"), steps=10)
    assert result["first"] + result["resumed"] == uninterrupted  # bit for bit: the same floats
    assert result["steps"] == [8, 9, 10]  # max_to_keep=3
    for step in (8, 9, 10):
        folder = tmp_path / "restarted" / str(step)
        tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
        again = safetensors.numpy.load_file(str(tmp_path / "uninterrupted" / str(step) / "model.safetensors"))
        assert tensors.keys() == again.keys() and len(tensors) > 4
        assert all((tensors[key] == again[key]).all() for key in tensors)
        assert len(list(jw.load_weights(folder).items())) == len(tensors)


@pytest.mark.parametrize("name", ["train_flax", "train_equinox"])
def test_the_examples_run_as_scripts(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "losses after the restart:" in printed and "steps kept: [8, 9, 10]" in printed


@pytest.mark.parametrize("name", ["train_flax", "train_equinox"])
def test_the_guide_shows_the_tested_code(name: str) -> None:
    """docs/training.md quotes each example from its imports to its ``main``, verbatim."""
    source = (ROOT / "examples" / f"{name}.py").read_text()
    body = source[source.index("from __future__") : source.index("def main(")].rstrip() + "\n"
    assert f"```python\n{body}```" in (ROOT / "docs" / "training.md").read_text()
