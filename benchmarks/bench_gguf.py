"""GGUF: open a file with a 150k-token vocabulary, and load a quantized model's blocks, against the peers.

Every method runs in a fresh process, methods interleaved round by round, page cache warm.

- open: ``jw.load_weights(path)`` + listing its tensors, against ``gguf.GGUFReader(path)`` + its tensor
  names (llama.cpp's Python reader, which decodes every metadata array up front).
- load: every tensor's Q8_0 blocks allocated to ``cpu:0`` with ``allocate()`` from the GGUF file, against
  the same bytes stored as uint8 tensors in a safetensors file and allocated the same way.

    python benchmarks/bench_gguf.py [--runs 7] [--layers 12]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402

WORKER = r"""
import json, sys, time
import numpy as np, jax
jax.device_put(np.zeros(4)).block_until_ready()
method, path = sys.argv[1], sys.argv[2]
import jaxweights as jw
import gguf

start = time.perf_counter()
if method in ("open", "open_reader"):
    if method == "open":
        names = [name for name, _ in jw.load_weights(path).items()]
    else:
        names = [tensor.name for tensor in gguf.GGUFReader(path).tensors]
    print(json.dumps({"ms": (time.perf_counter() - start) * 1e3, "tensors": len(names)}))
else:
    weights = jw.load_weights(path)
    arrays = [acc.allocate().array for _, acc in weights.items()]
    for array in arrays:
        array.block_until_ready()
    print(json.dumps({"ms": (time.perf_counter() - start) * 1e3, "tensors": len(arrays)}))
"""


def q8_blocks(rng: Any, rows: int, cols: int) -> Any:
    """Random valid Q8_0 blocks (a finite float16 scale, then 32 int8 values) in their byte shape."""
    import numpy as np

    blocks = rng.integers(0, 256, (rows, cols // 32, 34), dtype=np.uint8)
    scales = (rng.random((rows, cols // 32)) * 0.01 + 0.001).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, cols // 32 * 34)


def make_files(folder: Path, layers: int) -> tuple[Path, Path, Path]:
    import gguf
    import numpy as np
    import safetensors.numpy

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab-150k.gguf"
    model = folder / f"q8-{layers}.gguf"
    same = folder / f"q8-{layers}-bytes.safetensors"
    if not vocab.exists():
        writer = gguf.GGUFWriter(str(vocab), "llama")
        writer.add_token_list([f"token{i:06d}".encode() for i in range(150_000)])
        writer.add_token_scores([float(i) for i in range(150_000)])
        writer.add_token_types([1] * 150_000)
        for i in range(32):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if not model.exists() or not same.exists():
        rng = np.random.default_rng(0)
        d, ff = 2048, 8192
        tensors = {"token_embd.weight": q8_blocks(rng, 32000, d)}
        for i in range(layers):
            for name, (rows, cols) in {
                "attn_q": (d, d),
                "attn_k": (d, d),
                "attn_v": (d, d),
                "attn_output": (d, d),
                "ffn_up": (ff, d),
                "ffn_gate": (ff, d),
                "ffn_down": (d, ff),
            }.items():
                tensors[f"blk.{i}.{name}.weight"] = q8_blocks(rng, rows, cols)
        writer = gguf.GGUFWriter(str(model), "llama")
        for name, blocks in tensors.items():
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        safetensors.numpy.save_file(tensors, str(same))  # the same bytes, as uint8 tensors
    return vocab, model, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    args = parser.parse_args()
    vocab, model, same = make_files(args.data, args.layers)
    cases = [
        ("open: jaxweights load_weights + items()", "open", vocab),
        ("open: gguf.GGUFReader + tensors", "open_reader", vocab),
        ("load: jaxweights, Q8_0 blocks from GGUF", "load", model),
        ("load: jaxweights, same bytes from safetensors", "load", same),
    ]
    for path in (model, same):  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    shuffler = random.Random(0)
    started = time.time()
    for round_ in range(args.runs):
        for label, method, path in shuffler.sample(cases, len(cases)):
            results[label].append(run_worker(WORKER, method, str(path), timeout=600)["ms"])
        print(f"round {round_ + 1}/{args.runs} done ({time.time() - started:.0f} s)", file=sys.stderr)
    med = {label: statistics.median(times) for label, times in results.items()}
    print(f"\nGGUF model: {model.stat().st_size / 1e6:.0f} MB of Q8_0 blocks; {args.runs} runs (medians)")
    print(f"{'method':48} {'median ms':>10} {'ratio':>14}")
    reader = med["open: gguf.GGUFReader + tensors"]
    same_bytes = med["load: jaxweights, same bytes from safetensors"]
    for label, _, _ in cases:
        if label.startswith("open"):
            ratio = f"{reader / med[label]:.1f}x faster" if "jaxweights" in label else ""
        else:
            ratio = f"{med[label] / same_bytes:.2f}x" if "GGUF" in label else "1.00x"
        print(f"{label:48} {med[label]:10.1f} {ratio:>14}")


if __name__ == "__main__":
    main()
