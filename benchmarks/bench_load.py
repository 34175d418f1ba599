"""Load a ~1.3 GB float32 transformer-like checkpoint to CPU: jaxweights against its peers.

Every method runs in a fresh process, methods interleaved round by round, page cache warm. Each process
allocates every tensor on cpu:0 (one ``allocate()`` at a time, or one ``allocate_all()``) and blocks until
ready. Reported: median wall time, peak RSS growth over
the process's baseline (VmHWM after resetting it) as a multiple of the file size, and what the process
holds once loaded: anonymous memory (RssAnon, the arrays) and mapped file pages (RssFile), both as
multiples of the file size.

    python benchmarks/bench_load.py [--runs 5] [--layers 24] [--no-hugepages]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402

WORKER = r"""
import json, mmap, os, sys, time
import numpy as np, jax
jax.device_put(np.zeros(4)).block_until_ready()
method, path = sys.argv[1], sys.argv[2]
import struct
import jaxweights as jw
from safetensors import safe_open
from safetensors.flax import load_file

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS watermark
base = rss_kib("VmRSS")
base_anon, base_file = rss_kib("RssAnon"), rss_kib("RssFile")
start = time.perf_counter()
if method == "jaxweights":
    weights = jw.load_weights(path)
    arrays = [acc.allocate().array for _, acc in weights.items()]
elif method == "jaxweights_all":
    arrays = list(jw.load_weights(path).allocate_all().values())
elif method == "flax":
    arrays = list(load_file(path).values())
elif method == "safe_open":
    with safe_open(path, framework="numpy") as f:
        arrays = [jax.device_put(f.get_tensor(k)) for k in f.keys()]
elif method == "mmap":
    fd = open(path, "rb")
    mm = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    n = struct.unpack("<Q", mm[:8])[0]
    header = json.loads(mm[8:8 + n])
    header.pop("__metadata__", None)
    codes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    arrays = []
    for k, v in header.items():
        b, e = v["data_offsets"]
        x = np.frombuffer(mm, dtype=codes[v["dtype"]], count=(e - b) // np.dtype(codes[v["dtype"]]).itemsize,
                          offset=8 + n + b).reshape(v["shape"])
        arrays.append(jax.device_put(x))
elif method == "open_items":
    weights = jw.load_weights(path)
    arrays = []
    names = [name for name, _ in weights.items()]
else:
    raise SystemExit(f"unknown method {method}")
for a in arrays:
    a.block_until_ready()
elapsed = time.perf_counter() - start
peak = rss_kib("VmHWM")
time.sleep(0.2)  # let background releases of file pages finish
anon, mapped = rss_kib("RssAnon") - base_anon, rss_kib("RssFile") - base_file
print(json.dumps({"ms": elapsed * 1e3, "peak_growth_mb": (peak - base) / 1024, "anon_mb": anon / 1024,
                  "file_mb": mapped / 1024}))
"""


def make_checkpoints(folder: Path, layers: int) -> tuple[Path, Path, Path]:
    import numpy as np
    import safetensors.numpy

    import jaxweights as jw

    folder.mkdir(parents=True, exist_ok=True)
    unaligned = folder / f"transformer-{layers}.safetensors"
    aligned = folder / f"transformer-{layers}-aligned.safetensors"
    many = folder / "many-10000.safetensors"
    if not unaligned.exists() or not aligned.exists():
        rng = np.random.default_rng(0)
        d, ff = 1024, 4096
        tensors: dict[str, np.ndarray] = {"embed_tokens.weight": rng.standard_normal((32000, d), np.float32)}
        for i in range(layers):
            p = f"layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{name}.weight"] = rng.standard_normal((d, d), np.float32)
            tensors[p + "mlp.up_proj.weight"] = rng.standard_normal((ff, d), np.float32)
            tensors[p + "mlp.down_proj.weight"] = rng.standard_normal((d, ff), np.float32)
            tensors[p + "input_layernorm.weight"] = np.ones(d, np.float32)
            tensors[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        tensors["norm.weight"] = np.ones(d, np.float32)
        # Pad the metadata until the reference writer's data section is NOT 64-byte aligned (as HF files).
        for pad in range(64):
            safetensors.numpy.save_file(tensors, str(unaligned), metadata={"format": "pt", "pad": "x" * pad})
            if (8 + int.from_bytes(unaligned.read_bytes()[:8], "little")) % 64:
                break
        jw.save_file(tensors, aligned, metadata={"format": "pt"})
    if not many.exists():
        import numpy as np

        jw.save_file(
            {f"blocks.{i // 100}.sub.{i % 100}.weight": np.full(4, i, np.float32) for i in range(10_000)},
            many,
        )
    return unaligned, aligned, many


def run(method: str, path: Path, env: dict[str, str]) -> dict[str, float]:
    return run_worker(WORKER, method, str(path), env=env, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    parser.add_argument("--no-hugepages", action="store_true", help="set NUMPY_MADVISE_HUGEPAGE=0")
    args = parser.parse_args()

    unaligned, aligned, many = make_checkpoints(args.data, args.layers)
    size_mb = unaligned.stat().st_size / 1e6
    env = dict(os.environ)
    if args.no_hugepages:
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"
    cases = [
        ("safetensors.flax.load_file", "flax", unaligned),
        ("safe_open(numpy) + device_put", "safe_open", unaligned),
        ("mmap + device_put", "mmap", unaligned),
        ("jaxweights allocate (one by one)", "jaxweights", unaligned),
        ("jaxweights allocate_all", "jaxweights_all", unaligned),
        ("mmap + device_put, aligned file", "mmap", aligned),
        ("jaxweights allocate, aligned file", "jaxweights", aligned),
        ("jaxweights open + items(), 10k tensors", "open_items", many),
    ]
    for path in (unaligned, aligned):  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in cases}
    started = time.time()
    shuffler = random.Random(0)
    for round_ in range(args.runs):
        # A fresh process pays for faulting in fresh memory, and on a VM that price swings with what ran
        # just before: shuffle the order each round so no method always follows the same neighbour.
        for label, method, path in shuffler.sample(cases, len(cases)):
            results[label].append(run(method, path, env))
        print(f"round {round_ + 1}/{args.runs} done ({time.time() - started:.0f} s)", file=sys.stderr)

    med = {label: statistics.median(r["ms"] for r in rs) for label, rs in results.items()}
    rss = {label: statistics.median(r["peak_growth_mb"] for r in rs) for label, rs in results.items()}
    anon = {label: statistics.median(r["anon_mb"] for r in rs) for label, rs in results.items()}
    mapped = {label: statistics.median(r["file_mb"] for r in rs) for label, rs in results.items()}
    flax, peer = med["safetensors.flax.load_file"], med["mmap + device_put"]
    print(
        f"\nfile: {size_mb:.0f} MB float32, {args.runs} runs, hugepages {'off' if args.no_hugepages else 'default'}"
    )
    print(
        f"{'method':42} {'median ms':>10} {'vs flax':>9} {'vs mmap':>9} {'peak RSS / file':>16}"
        f" {'anon / file':>12} {'mapped / file':>14}"
    )
    for label, _, path in cases:
        file_mib = path.stat().st_size / 2**20
        big = file_mib > 100
        ratios = [f"{v[label] / file_mib:.2f}x" if big else "-" for v in (rss, anon, mapped)]
        print(
            f"{label:42} {med[label]:10.1f} {flax / med[label]:8.1f}x {med[label] / peer:8.2f}x "
            f"{ratios[0]:>16} {ratios[1]:>12} {ratios[2]:>14}"
        )


if __name__ == "__main__":
    main()
