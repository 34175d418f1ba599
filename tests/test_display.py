"""Text views: natural order, prefixes by whole segments, and nothing read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

import jaxweights as jw


def test_summary_lists_layers_in_natural_order(write_reference: Callable[..., Path]) -> None:
    tensors = {f"layers.{i}.w": np.ones(i + 1, np.float32) for i in (0, 1, 2, 10, 11)}
    tensors["layers10.w"] = np.ones(1, np.float32)
    weights = jw.load_weights(write_reference(tensors))
    text = weights.summary(collapse=False)
    labels = [line.split("── ")[1].split()[0] for line in text.splitlines() if "── " in line]
    rows = [label.split(".")[0] for label in labels if label[:1].isdigit()]
    assert rows == ["0", "1", "2", "10", "11"]
    assert "layers10" not in weights.layers.summary()  # a view of layers holds layers.* only
    assert weights.checkpoint.bytes_copied == 0


def test_summary_of_names_thousands_of_segments_deep(write_reference: Callable[..., Path]) -> None:
    """Display builds and walks its tree without recursion (1,000 dots once raised RecursionError)."""
    deep = "." * 1000
    tensors = {f"{deep}w": np.ones(1, np.float32), f"{deep}v": np.ones(2, np.int8)}
    tensors.update({f"a.{'.' * n}x": np.ones(1, np.int8) for n in range(0, 1500, 100)})
    tensors[f"n.{'9' * 5000}"] = np.ones(1, np.int8)
    weights = jw.load_weights(write_reference(tensors))
    text = weights.summary(collapse=False)
    assert text.startswith("model.safetensors: 18 tensors") and "float32[1]  4 B" in text
    assert "9" * 5000 in text and len(text.splitlines()) < 3100
    assert "18 tensors" in weights._repr_html_()
