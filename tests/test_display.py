"""Display: the `Summary` fields, its text tree, the HTML and treescope views, and nothing read."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights._display import Summary, Totals


def _decoder(layers: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {
        f"model.layers.{i}.{p}": np.ones((2, 3), np.float32) for i in range(layers) for p in ("q", "k")
    }
    tensors["model.embed"] = np.ones((4, 2), np.float16)
    tensors["head"] = np.ones(5, np.int8)
    return tensors


def _no_page_mapped(path: Path) -> bool:
    maps = Path("/proc/self/maps")
    return not maps.exists() or str(path) not in maps.read_text()


def test_summary_lists_layers_in_natural_order(write_reference: Callable[..., Path]) -> None:
    tensors = {f"layers.{i}.w": np.ones(i + 1, np.float32) for i in (0, 1, 2, 10, 11)}
    tensors["layers10.w"] = np.ones(1, np.float32)
    weights = jw.load_weights(write_reference(tensors))
    text = str(weights.summary(collapse=False))
    labels = [line.split("── ")[1].split()[0] for line in text.splitlines() if "── " in line]
    rows = [label.split(".")[0] for label in labels if label[:1].isdigit()]
    assert rows == ["0", "1", "2", "10", "11"]
    assert "layers10" not in str(weights.layers.summary())  # a view of layers holds layers.* only
    assert weights.checkpoint.bytes_copied == 0


def test_summary_of_names_thousands_of_segments_deep(write_reference: Callable[..., Path]) -> None:
    """Display builds and walks its tree without recursion (1,000 dots once raised RecursionError)."""
    deep = "." * 1000
    tensors = {f"{deep}w": np.ones(1, np.float32), f"{deep}v": np.ones(2, np.int8)}
    tensors.update({f"a.{'.' * n}x": np.ones(1, np.int8) for n in range(0, 1500, 100)})
    tensors[f"n.{'9' * 5000}"] = np.ones(1, np.int8)
    weights = jw.load_weights(write_reference(tensors))
    text = str(weights.summary(collapse=False))
    assert text.startswith("model.safetensors: 18 tensors") and "float32[1]  4 B" in text
    assert "9" * 5000 in text and len(text.splitlines()) < 3100
    assert "18 tensors" in weights._repr_html_()


def test_summary_fields_count_the_view(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(write_reference(_decoder(3)))
    summary = weights.summary()
    assert isinstance(summary, Summary)
    assert (summary.tensors, summary.parameters, summary.nbytes) == (8, 6 * 6 + 8 + 5, 6 * 24 + 16 + 5)
    assert summary.by_dtype == {
        "float32": Totals(6, 36, 144),
        "float16": Totals(1, 8, 16),
        "int8": Totals(1, 5, 5),
    }
    assert list(summary.by_prefix.items()) == [("head", (1, 5, 5)), ("model", (7, 44, 160))]
    layers = weights.model.layers.summary()
    assert layers.by_prefix == {"0": (2, 12, 48), "1": (2, 12, 48), "2": (2, 12, 48)}
    assert (layers.tensors, layers.by_dtype) == (6, {"float32": (6, 36, 144)})
    assert weights.head.summary().by_prefix == {"": (1, 5, 5)}  # the tensor the prefix names itself
    assert weights.nothing.summary().tensors == 0


def test_summary_prints_the_text_tree(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(write_reference(_decoder(12)))
    summary = weights.summary()
    assert str(summary) == repr(summary) == summary.text
    assert summary.text.splitlines()[0] == (
        "model.safetensors: 26 tensors, 157 parameters, 597 B (float32 x24, float16 x1, int8 x1)"
    )
    assert "(x12: 0..11 share this layout)" in summary.text
    assert len(str(weights.summary(collapse=False)).splitlines()) > len(summary.text.splitlines())
    cut = str(weights.summary(collapse=False, max_lines=3)).splitlines()
    assert len(cut) == 4 and cut[-1].startswith("... ")


def test_html_is_a_foldable_tree_with_folded_layers(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(write_reference(_decoder(12)))
    page = weights._repr_html_()
    assert page == weights.summary()._repr_html_()
    assert page.count("<details") == page.count("</details>") == 3  # model, layers, the folded run
    assert page.count("<summary") == page.count("</summary>") == 3
    assert "0..11<span class='jw-note'>x12, same layout</span>" in page
    assert "2 tensors each" in page and "26 tensors" in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    opened = re.findall(r"<details( open)?>", page)
    assert opened == [" open", " open", ""]  # top levels open, deeper ones closed


def test_html_escapes_names(write_reference: Callable[..., Path]) -> None:
    hostile = "x.<script>alert('hi')</script>&amp"
    weights = jw.load_weights(write_reference({hostile: np.ones(1, np.int8), "y.<b>": np.ones(1, np.int8)}))
    page = weights._repr_html_()
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;hi&#x27;)&lt;/script&gt;&amp;amp" in page


def test_display_reads_no_tensor_data(write_reference: Callable[..., Path]) -> None:
    path = write_reference(_decoder(4))
    weights = jw.load_weights(path)
    str(weights.summary(collapse=False))
    weights._repr_html_()
    weights.model.layers._repr_html_()
    assert weights.checkpoint.bytes_copied == 0 and _no_page_mapped(path)


def test_treescope_renders_the_tree(write_reference: Callable[..., Path]) -> None:
    treescope = pytest.importorskip("treescope")
    path = write_reference(_decoder(12))
    weights = jw.load_weights(path)
    assert "<treescope" in treescope.render_to_html(weights)
    text = treescope.render_to_text(weights)
    assert "<Weights '(root)': 26 tensors>" in text and "26 tensors, 597 B" in text
    assert "(x12: 0..11 share this layout)" in text and "float32[2, 3]" in text
    assert "embed: float16[4, 2]" in text and "head: int8[5]" in text
    assert weights.checkpoint.bytes_copied == 0 and _no_page_mapped(path)
