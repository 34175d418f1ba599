"""examples/minilm.py against sentence-transformers' own vectors (stored by tests/data/make_minilm_reference.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from jaxweights._compat import program_constants

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def minilm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_example", ROOT / "examples" / "minilm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["minilm_example"] = module
    spec.loader.exec_module(module)
    return module


def test_embeddings_match_sentence_transformers(minilm: ModuleType) -> None:
    reference = json.loads((ROOT / "tests" / "data" / "minilm_reference.json").read_text())
    sentences, expected = reference["sentences"], np.asarray(reference["vectors"], np.float32)
    assert "" in sentences and max(reference["untruncated_tokens"]) > 256
    vectors = minilm.embed(sentences)
    assert vectors.shape == (len(sentences), 384) and vectors.dtype == np.float32
    cosines = (vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.9999, f"sentence {sentences[worst][:60]!r}: cosine {cosines[worst]}"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_weights_stay_outside_the_compiled_function(minilm: ModuleType) -> None:
    model = minilm.MiniLM()
    ids, mask = model.tokenize(["one sentence", "and another, a little longer"])
    traced = model.forward.trace(ids, mask)
    weights_in, *_ = traced.args_info[0]
    assert len(weights_in) == len(model.graph.declared) == 101  # every parameter is a named input
    baked = sum(int(np.size(c)) * np.dtype(c.dtype).itemsize for c in program_constants(traced.jaxpr))
    assert baked < 1024  # nothing of the 90 MB of weights is a constant


def test_batches_and_order_do_not_change_results(minilm: ModuleType) -> None:
    model = minilm.MiniLM()
    sentences = ["a", "b c d", "a much longer sentence than the others, by far", "b c d"]
    together = model.embed(sentences)
    alone = np.stack([model.embed([s])[0] for s in sentences])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together[1], together[3], atol=1e-6)
