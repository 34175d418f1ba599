"""Stream a ~1.2 GB 24-layer float32 checkpoint layer by layer through a forward pass, against loading
every layer first, with the file memory-mapped (``mmap=True``) and read into owned memory (``mmap=False``).

Every case runs in a fresh process, cases shuffled round by round, page cache warm. Each process opens
the checkpoint, compiles one transformer block (RMS norm, attention over a 16-token batch, GELU MLP)
ahead of time, resets its peak-RSS watermark, then runs 16 tokens through the 24 layers. Reported:
median peak RSS growth over that baseline (VmHWM after resetting it) in MB and in layers (one layer is
48 MiB), the anonymous memory and mapped file pages still held after the loop, and the wall time.

Cases:

- ``all``: ``weights.layers.to_pytree()`` (one `allocate_all`), then the forward pass.
- ``stream``: ``jw.stream_layers(weights.layers)``: each layer's arrays deleted and its file pages
  released when the loop advances.
- ``delete only``: a hand-written loop that deletes each layer's arrays but does not release pages.
- ``del only``: a hand-written loop that only drops its own reference (``del layer``).

    python benchmarks/bench_stream.py [--runs 3]
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
from bench_load import make_checkpoints  # noqa: E402

WORKER = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
jax.device_put(np.zeros(4)).block_until_ready()
import jaxweights as jw
from jaxweights._stream import stream_layers

method, mapped, path = sys.argv[1], sys.argv[2] == "1", sys.argv[3]

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def rms(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale

def block(x, layer):
    attn, mlp = layer["self_attn"], layer["mlp"]
    h = rms(x, layer["input_layernorm"]["weight"])
    q, k, v = (h @ attn[n]["weight"].T for n in ("q_proj", "k_proj", "v_proj"))
    x = x + jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]), axis=-1) @ v @ attn["o_proj"]["weight"].T
    h = rms(x, layer["post_attention_layernorm"]["weight"])
    return x + jax.nn.gelu(h @ mlp["up_proj"]["weight"].T) @ mlp["down_proj"]["weight"].T

weights = jw.load_weights(path, mmap=mapped)
x = jax.random.normal(jax.random.key(0), (16, 1024), jnp.float32)
forward = jax.jit(block).lower(x, weights.layers[0].to_pytree(shapes_only=True)).compile()
zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), weights.layers[0].to_pytree(shapes_only=True))
forward(x, zeros).block_until_ready()  # warm the executable, then free its inputs before the baseline
for array in jax.tree.leaves(zeros):
    array.delete()
del zeros

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS watermark
base, base_anon, base_file = rss_kib("VmRSS"), rss_kib("RssAnon"), rss_kib("RssFile")
start = time.perf_counter()
if method == "all":
    layers = weights.layers.to_pytree()
    for layer in layers:
        x = forward(x, layer)
elif method == "stream":
    for _, layer in stream_layers(weights.layers):
        x = forward(x, layer).block_until_ready()
elif method == "delete":
    for child in weights.layers:
        layer = child.to_pytree()
        x = forward(x, layer).block_until_ready()
        for array in jax.tree.leaves(layer):
            array.delete()
elif method == "del":
    for child in weights.layers:
        layer = child.to_pytree()
        x = forward(x, layer).block_until_ready()
        del layer
else:
    raise SystemExit(f"unknown method {method}")
x.block_until_ready()
elapsed = time.perf_counter() - start
peak = rss_kib("VmHWM")
anon, held = rss_kib("RssAnon") - base_anon, rss_kib("RssFile") - base_file
print(json.dumps({"ms": elapsed * 1e3, "peak_mb": (peak - base) / 1024, "anon_mb": anon / 1024,
                  "file_mb": held / 1024, "checksum": float(jnp.sum(x))}))
"""

LAYER_MIB = (4 * 1024 * 1024 + 2 * 4096 * 1024 + 2 * 1024) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    args = parser.parse_args()

    unaligned, aligned, _ = make_checkpoints(args.data, 24)
    cases = [
        (f"{label}, {mode}, {kind}", method, flag, path)
        for kind, path, methods in (
            ("aligned", aligned, ("all", "stream", "delete", "del")),
            ("unaligned", unaligned, ("all", "stream")),
        )
        for mode, flag in (("mmap=True", "1"), ("mmap=False", "0"))
        for label, method in (
            ("allocate_all, then forward", "all"),
            ("stream_layers", "stream"),
            ("loop: delete(), no release", "delete"),
            ("loop: del only", "del"),
        )
        if method in methods
    ]
    for path in (unaligned, aligned):  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in cases}
    shuffler, started = random.Random(0), time.time()
    for round_ in range(args.runs):
        for label, method, flag, path in shuffler.sample(cases, len(cases)):
            results[label].append(run_worker(WORKER, method, flag, str(path), env=env, timeout=600))
        print(f"round {round_ + 1}/{args.runs} done ({time.time() - started:.0f} s)", file=sys.stderr)

    checksums = {round(r["checksum"], 1) for rs in results.values() for r in rs}
    print(
        f"\nfile: {aligned.stat().st_size / 1e6:.0f} MB float32, 24 layers of {LAYER_MIB:.1f} MiB, "
        f"{args.runs} fresh processes per case (medians); forward checksums {sorted(checksums)}"
    )
    print(f"{'case':52} {'peak MB':>8} {'layers':>7} {'anon MB':>8} {'mapped MB':>10} {'ms':>7}")
    for label, *_ in cases:
        rs = results[label]
        peak, anon, held, ms = (
            statistics.median(r[k] for r in rs) for k in ("peak_mb", "anon_mb", "file_mb", "ms")
        )
        print(f"{label:52} {peak:8.0f} {peak / LAYER_MIB:7.1f} {anon:8.0f} {held:10.0f} {ms:7.0f}")


if __name__ == "__main__":
    main()
