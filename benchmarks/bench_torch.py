"""PyTorch checkpoints: open one and get every tensor as an array, jaxweights (no torch) against torch.

Every method runs in a fresh process, methods interleaved round by round, page cache warm. Two
checkpoints written by ``torch.save``: a 5,000-tensor state dict of small tensors, and a ~1 GB one.

Host tensors, what `torch.load` gives:

- jaxweights ``data()``: ``weights[name].data()`` for every tensor: numpy views of the mapped file.
- ``torch.load(path, weights_only=True)``: every tensor read into memory.
- ``torch.load(path, mmap=True, weights_only=True)``: every tensor a view of the mapped file.

`jax.Array`s, what a JAX program needs:

- jaxweights: ``load_weights(path).allocate_all()``: every tensor a `jax.Array` on ``cpu:0``, ready.
- ``torch.load(mmap=True)`` + ``jax.device_put``: the same without jaxweights (torch installed).

A `jax.Array` costs ~2.7 KB of host memory of its own (JAX's C++ buffer and Python objects), so 5,000
arrays hold ~13 MB whatever made them; the memory rows say how far above that floor each method is.

Reported: median wall time and peak RSS growth over the process's baseline, as a multiple of the file.

    python benchmarks/bench_torch.py [--runs 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402

WORKER = r"""
import json, sys, time
method, path = sys.argv[1], sys.argv[2]
import numpy as np
if method.startswith("jaxweights") or method.endswith("jax"):
    import jax
    jax.device_put(np.zeros(4)).block_until_ready()
    import jaxweights as jw
if method.startswith("torch"):
    import torch

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss_kib("VmRSS")
start = time.perf_counter()
if method == "jaxweights":
    arrays = jw.load_weights(path).allocate_all()
    count = len(arrays)
elif method == "jaxweights_data":
    weights = jw.load_weights(path)
    views = [weight.data().data for _, weight in weights.items()]
    count = len(views)
elif method == "torch":
    count = len(torch.load(path, weights_only=True))
elif method == "torch_mmap":
    count = len(torch.load(path, mmap=True, weights_only=True))
else:
    state = torch.load(path, mmap=True, weights_only=True)
    device = jax.devices("cpu")[0]
    arrays = jax.device_put([tensor.numpy() for tensor in state.values()], device)
    jax.block_until_ready(arrays)
    count = len(arrays)
elapsed = time.perf_counter() - start
print(json.dumps({"ms": elapsed * 1e3, "peak_mb": (rss_kib("VmHWM") - base) / 1024, "tensors": count}))
"""


def make_files(folder: Path) -> tuple[Path, Path]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    many, big = folder / "torch-5000.pt", folder / "torch-1gb.pt"
    if not many.exists():
        generator = torch.Generator().manual_seed(0)
        torch.save(
            {
                f"blocks.{i // 50}.layer.{i % 50}.weight": torch.randn(16, 16, generator=generator)
                for i in range(5000)
            },
            many,
        )
    if not big.exists():
        generator = torch.Generator().manual_seed(1)
        state = {"embed.weight": torch.randn(32000, 1024, generator=generator)}
        for i in range(12):
            state[f"layers.{i}.mlp.up.weight"] = torch.randn(4096, 1024, generator=generator)
            state[f"layers.{i}.mlp.down.weight"] = torch.randn(1024, 4096, generator=generator)
            state[f"layers.{i}.attn.qkv.weight"] = torch.randn(3072, 1024, generator=generator)
            state[f"layers.{i}.norm.weight"] = torch.ones(1024)
        torch.save(state, big)
    return many, big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    args = parser.parse_args()
    many, big = make_files(args.data)
    cases = [
        (f"{label}, {kind}", method, path)
        for kind, path in (("5,000 tensors", many), ("1 GB", big))
        for label, method in (
            ("jaxweights data() (host views)", "jaxweights_data"),
            ("torch.load(weights_only=True)", "torch"),
            ("torch.load(mmap=True, weights_only=True)", "torch_mmap"),
            ("jaxweights allocate_all (jax.Arrays)", "jaxweights"),
            ("torch.load(mmap=True) + jax.device_put", "torch_mmap_jax"),
        )
    ]
    for path in (many, big):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in cases}
    shuffler = random.Random(0)
    started = time.time()
    for round_ in range(args.runs):
        for label, method, path in shuffler.sample(cases, len(cases)):
            results[label].append(run_worker(WORKER, method, str(path), timeout=600))
        print(f"round {round_ + 1}/{args.runs} done ({time.time() - started:.0f} s)", file=sys.stderr)
    print(f"\n{args.runs} runs (medians)")
    print(f"{'method':58} {'median ms':>10} {'peak RSS / file':>16}")
    for label, _, path in cases:
        ms = statistics.median(r["ms"] for r in results[label])
        peak = statistics.median(r["peak_mb"] for r in results[label]) / (path.stat().st_size / 2**20)
        print(f"{label:58} {ms:10.1f} {peak:15.2f}x")


if __name__ == "__main__":
    main()
