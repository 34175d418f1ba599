"""all-MiniLM-L6-v2 sentence embeddings in JAX, its 6 encoder layers run by one `jax.lax.scan`.

The same model as ``examples/minilm.py`` (whose tokenisation, padding and batching this reuses), but the
checkpoint's ``encoder.layer.0`` .. ``encoder.layer.5`` are read as one pytree whose leaves carry a leading
layer axis of 6 (``to_pytree(stack=True)``), and one BERT layer is written once and scanned over them: the
program holds one layer, not six copies. The weights are arguments of one jitted function, never
constants in it; with ``mesh=`` and ``rules=`` the stacked weights are sharded as they are read (rules
match the stacked name, ``encoder.layer.intermediate.dense.weight``, with the layer index removed).

    python examples/minilm_scan.py "A sentence." "Another one."
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jaxweights as jw

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # examples/ is a folder of scripts, not a package: minilm.py is beside this file
    sys.path.append(_HERE)
from minilm import MiniLM, default_model_dir  # noqa: E402

__all__ = ["MiniLMScan", "default_model_dir", "embed", "encode"]


def _layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + eps) * p["weight"] + p["bias"]


def _dense(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    return x @ p["weight"].T + p["bias"]  # PyTorch layout: weight is (out, in)


def _bert_layer(x: jax.Array, p: Any, bias: jax.Array, heads: int, eps: float) -> jax.Array:
    """One BERT encoder layer; ``p`` is one layer's slice of the stacked tree."""
    batch, length, width = x.shape

    def split(t: jax.Array) -> jax.Array:
        return t.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)

    attention = p["attention"]
    q, k, v = (split(_dense(x, attention["self"][name])) for name in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(width // heads) + bias
    context = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    x = _layer_norm(_dense(context, attention["output"]["dense"]) + x, attention["output"]["LayerNorm"], eps)
    hidden = jax.nn.gelu(_dense(x, p["intermediate"]["dense"]), approximate=False)
    return _layer_norm(_dense(hidden, p["output"]["dense"]) + x, p["output"]["LayerNorm"], eps)


@functools.partial(jax.jit, static_argnames=("heads", "eps"))
def encode(
    embeddings: Any, layers: Any, input_ids: jax.Array, attention_mask: jax.Array, *, heads: int, eps: float
) -> jax.Array:
    """Normalised sentence embeddings: ``embeddings`` and the stacked ``layers`` are pytrees of arrays.

    Every leaf of ``layers`` has the layer axis first; `jax.lax.scan` runs one layer per step over it.
    """
    length = input_ids.shape[1]
    x = (
        embeddings["word_embeddings"]["weight"][input_ids]
        + embeddings["position_embeddings"]["weight"][:length][None]
        + embeddings["token_type_embeddings"]["weight"][0]
    )
    x = _layer_norm(x, embeddings["LayerNorm"], eps)
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)

    def step(hidden: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        return _bert_layer(hidden, layer, bias, heads, eps), None

    x = jax.lax.scan(step, x, layers)[0]
    mask = attention_mask[..., None].astype(x.dtype)
    pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)  # mean over real tokens
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLMScan(MiniLM):
    """all-MiniLM-L6-v2 with its encoder layers stacked and scanned; ``embed`` as in `MiniLM`.

    Args:
        model_dir: a folder with ``model.safetensors``, ``config.json`` and ``tokenizer.json``.
        max_length: tokens per sentence (longer ones are cut, as sentence-transformers does).
        mesh: a device mesh to place the weights on (replicated unless a rule shards them), with Auto
            axes as ``Mesh(devices, names)`` makes (the reshapes here name no ``out_sharding``).
        rules: ``(regex, PartitionSpec)`` pairs on the names, stacked names without the layer index,
            for example ``(r"intermediate\\.dense\\.weight$", P(None, "x", None))``.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        max_length: int = 256,
        mesh: Mesh | None = None,
        rules: Any = None,
    ) -> None:
        super().__init__(model_dir, max_length=max_length)
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        weights = jw.load_weights(folder / "model.safetensors")
        self.embeddings = weights.embeddings.to_pytree(mesh=mesh, rules=rules)
        self.layers = weights.encoder.layer.to_pytree(stack=True, mesh=mesh, rules=rules)
        self.forward = functools.partial(
            encode,
            self.embeddings,
            self.layers,
            heads=self.config["num_attention_heads"],
            eps=self.config["layer_norm_eps"],
        )


@functools.cache
def _model() -> MiniLMScan:
    """The default model, loaded on first use."""
    return MiniLMScan()


def embed(sentences: list[str]) -> np.ndarray:
    """Embeds sentences with the default model (loaded once): shape (len(sentences), 384)."""
    return _model().embed(sentences)


if __name__ == "__main__":
    vectors = embed(sys.argv[1:] or ["Six encoder layers, one scan.", "A sentence embedding."])
    print(vectors.shape, np.round(vectors[:, :6], 4))
