"""Sharded loads of the ~1.3 GB checkpoint over 8 fake CPU devices: jaxweights against its peers.

Every 2-D tensor is sharded on its first axis (or, with the column case, its second); 1-D tensors are
replicated. Peers: (a) `safetensors.flax.load_file` + `jax.device_put(x, sharding)`; (b) memmap slices fed
to `jax.make_array_from_callback`. Each method runs in a fresh process, shuffled each round; reported are
median wall time, peak RSS growth / file size, bytes copied / file size and copy calls (jaxweights' own
counters). A last section runs 2 processes x 4 devices with `jax.distributed` on 127.0.0.1.

    python benchmarks/bench_sharded.py [--runs 5]
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

from _worker import run_job  # noqa: E402
from bench_load import make_checkpoints  # noqa: E402

WORKER = r"""
import json, mmap, os, sys, time, struct
method, path, axis, procs, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
import jax
if procs > 1:
    jax.config.update("jax_num_cpu_devices", 8 // procs)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=procs, process_id=pid,
                               initialization_timeout=120)
else:
    jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxweights as jw
from safetensors.flax import load_file
mesh = Mesh(np.array(jax.devices()), ("x",))
split = P("x") if axis == 0 else P(None, "x")
def sharding_for(ndim):
    return NamedSharding(mesh, split if ndim == 2 else P())
jax.device_put(np.zeros(4)).block_until_ready()

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss_kib("VmRSS")
start = time.perf_counter()
copied = calls = None
if method == "jaxweights":
    weights = jw.load_weights(path)
    arrays = list(weights.allocate_all(mesh=mesh, rules=lambda n, i: split if len(i.shape) == 2 else None).values())
    copied, calls = weights.checkpoint.bytes_copied, weights.checkpoint.copy_calls
elif method == "flax":
    arrays = [jax.device_put(x, sharding_for(x.ndim)) for x in load_file(path).values()]
elif method == "callback":
    fd = open(path, "rb")
    mm = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    n = struct.unpack("<Q", mm[:8])[0]
    header = json.loads(mm[8:8 + n]); header.pop("__metadata__", None)
    arrays = []
    for k, v in header.items():
        b, e = v["data_offsets"]
        view = np.frombuffer(mm, np.float32, count=(e - b) // 4, offset=8 + n + b).reshape(v["shape"])
        arrays.append(jax.make_array_from_callback(view.shape, sharding_for(view.ndim), lambda idx, view=view: view[idx]))
for a in arrays:
    a.block_until_ready()
elapsed = time.perf_counter() - start
print(json.dumps({"ms": elapsed * 1e3, "peak_growth_mb": (rss_kib("VmHWM") - base) / 1024,
                  "copied": copied, "calls": calls}))
if procs > 1:
    jax.distributed.shutdown()
"""


def run(method: str, path: Path, axis: int, procs: int = 1) -> list[dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return run_job(WORKER, [method, str(path), str(axis), str(procs)], procs, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    args = parser.parse_args()
    unaligned, aligned, _ = make_checkpoints(args.data, args.layers)
    size_mb = unaligned.stat().st_size / 2**20
    cases = [
        ("(a) flax load_file + device_put, rows", "flax", unaligned, 0),
        ("(b) memmap + make_array_from_callback, rows", "callback", unaligned, 0),
        ("jaxweights allocate_all, rows", "jaxweights", unaligned, 0),
        ("(b) memmap callback, rows, aligned file", "callback", aligned, 0),
        ("jaxweights, rows, aligned file", "jaxweights", aligned, 0),
        ("(b) memmap callback, columns", "callback", unaligned, 1),
        ("jaxweights, columns", "jaxweights", unaligned, 1),
    ]
    for path in (unaligned, aligned):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in cases}
    shuffler, started = random.Random(0), time.time()
    for round_ in range(args.runs):
        for label, method, path, axis in shuffler.sample(cases, len(cases)):
            results[label] += run(method, path, axis)
        print(f"round {round_ + 1}/{args.runs} ({time.time() - started:.0f} s)", file=sys.stderr)
    multi = [run("jaxweights", unaligned, 0, procs=2) for _ in range(max(1, args.runs // 2))]

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    flax, callback = med(cases[0][0], "ms"), med(cases[1][0], "ms")
    print(f"\nfile: {size_mb:.0f} MiB float32, 8 CPU devices, {args.runs} runs (medians)")
    print(
        f"{'method':46} {'ms':>8} {'vs (a)':>7} {'vs (b)':>7} {'RSS/file':>9} {'copied/file':>12} {'copies':>7}"
    )
    for label, *_ in cases:
        ms = med(label, "ms")
        copied = results[label][0]["copied"]
        ratio = f"{copied / 2**20 / size_mb:11.2f}x" if copied is not None else f"{'-':>12}"
        calls = f"{results[label][0]['calls']:7d}" if copied is not None else f"{'-':>7}"
        rss = med(label, "peak_growth_mb") / size_mb
        print(f"{label:46} {ms:8.1f} {flax / ms:6.2f}x {ms / callback:6.2f}x {rss:8.2f}x {ratio} {calls}")
    print("\n2 processes x 4 devices, rows (jaxweights, per process):")
    for pid in range(2):
        copied = statistics.median(m[pid]["copied"] for m in multi) / 2**20 / size_mb
        growth = statistics.median(m[pid]["peak_growth_mb"] for m in multi) / size_mb
        ms = statistics.median(m[pid]["ms"] for m in multi)
        print(f"  process {pid}: {ms:7.1f} ms, copied {copied:.2f}x the file, peak RSS growth {growth:.2f}x")


if __name__ == "__main__":
    main()
