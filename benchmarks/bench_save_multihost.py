"""Multi-process saves without a gather: 2 processes x 4 CPU devices save a ~1.5 GB params + Adam-like
state, row-sharded over all 8 devices, with `jax.distributed` on 127.0.0.1.

Two methods, each in a fresh job: ``distributed`` (every process writes its own shards, the default) and
``gathered`` (the path taken without a key-value store: process 0 gathers each array and writes it all).
Reported per process: tensor bytes it wrote (jaxweights' `last_save_stats`), bytes it passed to write
system calls (``wchar`` of ``/proc/self/io``; it counts the gathers' socket traffic too), peak RSS growth during the save (``VmHWM`` after resetting
it) against the whole state, and wall time. The saved folders are compared byte for byte.

    python benchmarks/bench_save_multihost.py [--size-gb 1.5] [--folder /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER = r"""
import json, os, sys, time
method, folder, pid, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxweights as jw
import jaxweights._save

if method == "gathered":  # the path a JAX without the key-value store takes: process 0 gathers
    jaxweights._save.kv_client = lambda: None
rows = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
count = max(1, round(size * 1e9 / 3 / (4096 * 2048 * 4)))  # tensors per part, 32 MiB each

def leaf(seed):
    def block(index):
        start = index[0].start or 0
        rng = np.random.default_rng((seed, start))
        return rng.standard_normal((index[0].stop - start, 2048), dtype=np.float32)
    return jax.make_array_from_callback((4096, 2048), rows, block)

params = {f"layers.{i}.kernel": leaf(i) for i in range(count)}
state = {
    "params": params,
    "opt": {"mu": {k: leaf(1000 + i) for i, k in enumerate(params)},
            "nu": {k: leaf(2000 + i) for i, k in enumerate(params)}},
    "step": 100,
}
jax.block_until_ready(state)
state_bytes = 3 * count * 4096 * 2048 * 4

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def wchar():
    for line in open("/proc/self/io"):
        if line.startswith("wchar"):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base, written = status("VmRSS"), wchar()
start = time.perf_counter()
jw.save(state, folder, max_shard_size="1GB")
seconds = time.perf_counter() - start
stats = jaxweights._save.last_save_stats()
print(json.dumps({
    "process": pid, "seconds": seconds, "state_bytes": state_bytes, "tensor_bytes": stats.tensor_bytes,
    "wchar": wchar() - written, "peak_rss_growth": status("VmHWM") - base,
}))
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_job(method: str, folder: Path, size: float) -> list[dict[str, Any]]:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, method, str(folder), str(pid), port, str(size)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=900)
        if job.returncode:
            raise RuntimeError(f"{method} worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def digest(folder: Path) -> str:
    total = hashlib.sha256()
    for entry in sorted(folder.iterdir()):
        total.update(entry.name.encode())
        with open(entry, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total.update(chunk)
    return total.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-save-", dir=args.folder))
    digests = {}
    try:
        for method in ("distributed", "gathered"):
            folder = root / method
            results = run_job(method, folder, args.size_gb)
            digests[method] = digest(folder)
            shutil.rmtree(folder)
            print(f"{method}:")
            for r in results:
                state = r["state_bytes"]
                print(
                    f"  process {r['process']}: wrote {r['tensor_bytes'] / 1e9:.3f} GB of tensors "
                    f"({r['tensor_bytes'] / state:.2f}x the state), write calls {r['wchar'] / 1e9:.3f} GB, "
                    f"peak RSS growth {r['peak_rss_growth'] / 1e6:.1f} MB "
                    f"({r['peak_rss_growth'] / state:.2f}x the {state / 1e9:.2f} GB state), {r['seconds']:.2f} s"
                )
        print(f"byte-identical folders: {len(set(digests.values())) == 1} ({digests})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
