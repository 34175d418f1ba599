"""The notebooks are stored without outputs: `make test` executes them, and the repository keeps only sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01-explore-a-checkpoint.ipynb",
        "02-minilm-embeddings-in-jax.ipynb",
        "03-sharding-and-training-restore.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_stored_without_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    for number, cell in enumerate(code, 1):
        assert cell.get("outputs") == [], f"{path.name}, code cell {number}: clear its outputs"
        assert cell.get("execution_count") is None, f"{path.name}, code cell {number}: execution_count set"
    assert "widgets" not in notebook.get("metadata", {}), f"{path.name}: widget state stored"
