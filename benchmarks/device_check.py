"""The one GPU check (issue 15): GPU-relevant tests, then a ~4 GB bf16 load to the GPU against its peers.

    PYTHONPATH=. python3 benchmarks/device_check.py --out DIR [--quick]

(b) Measured first, each method in a fresh process, rounds interleaved and shuffled, medians of 3: the
host-to-device limit (one large ``device_put`` from pinned host memory, plus pageable and
``cudaHostRegister``-ed numpy for reference), ``jw.load_weights(path).allocate_all(device=GPU(0))``,
``safetensors.flax.load_file`` and ``safe_open(numpy)`` + ``jax.device_put``; GB/s, the ratio to the
limit, and peak host RSS growth (VmHWM after resetting it). (a) Then the GPU-relevant test files, one
pytest run each (``-x -q -p no:cacheprovider``), without the caller's XLA_FLAGS. (c) ``DIR/device_check.md``
and ``DIR/device_check.json``, printed too. A global deadline (~7 minutes) stops measuring and writes what
it has. ``--quick`` uses small sizes and runs on a CPU-only machine (the "GPU" is then the CPU device, and
the table header says so).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_gpu.py", "tests/test_transfer.py"]
"""The GPU-relevant tests: placement, GPU meshes, the staged path, graph functions, restore, dequantization
and stacking on the GPU (tests/test_gpu.py, skipped without one), and the staging scheduler. The other test
files fake 8 CPU devices and test what the CPU runs."""

WORKER = r"""
import json, sys, time
import numpy as np, jax
method, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
gpus = [d for d in jax.devices() if d.platform != "cpu"]
device = gpus[0] if gpus else jax.devices("cpu")[0]
jax.device_put(np.zeros(4), device).block_until_ready()

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def timed(put):
    best = None
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(put())
        best = min(best or 1e9, time.perf_counter() - start)
    return best

result = {"device": str(device)}
if method == "limit":
    from jax.sharding import SingleDeviceSharding
    host = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    on_device = SingleDeviceSharding(device)
    result["pageable_s"] = timed(lambda: jax.device_put(host, on_device))
    try:
        pinned = jax.device_put(host, SingleDeviceSharding(device, memory_kind="pinned_host"))
        pinned.block_until_ready()
        result["pinned_s"] = timed(lambda: jax.device_put(pinned, on_device))
    except Exception as error:
        result["pinned_error"] = str(error)[:200]
    from jaxweights._transfer import StagingPool
    pool = StagingPool(size, buffer_bytes=size, pin=True)
    buffer = pool.acquire(size)
    buffer[:] = host
    result["registered"] = bool(pool.pinned[0])
    result["registered_s"] = timed(lambda: jax.device_put(buffer, on_device))
    pool.release(buffer)
    pool.close()
    print(json.dumps(result))
    sys.exit()

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS watermark
base = rss_kib("VmRSS")
start = time.perf_counter()
if method == "jaxweights":
    import jaxweights as jw
    ref = jw.DeviceRef.GPU(0) if gpus else jw.DeviceRef.CPU(0)
    arrays = list(jw.load_weights(path).allocate_all(device=ref).values())
elif method == "flax":
    from safetensors.flax import load_file
    arrays = list(load_file(path).values())
elif method == "safe_open":
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        arrays = [jax.device_put(f.get_tensor(k), device) for k in f.keys()]
else:
    raise SystemExit(f"unknown method {method}")
jax.block_until_ready(arrays)
result["s"] = time.perf_counter() - start
result["peak_growth_mb"] = (rss_kib("VmHWM") - base) / 1024
result["on"] = sorted({str(next(iter(a.devices()))) for a in arrays})[:2]
print(json.dumps(result))
"""


def write_checkpoint(path: Path, layers: int, hidden: int, ff: int, vocab: int) -> int:
    """A llama-like bf16 safetensors file laid out as the reference writer does (8-byte aligned data)."""
    import numpy as np

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.up_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ff)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if (8 + len(raw)) % 64 == 0:  # keep the data section off 64-byte alignment, as most HF files are
        raw += b" " * 8
    pool = np.random.default_rng(0).integers(0x3C00, 0x3E00, 32 << 20, dtype=np.uint16)  # finite bf16
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            count = int(np.prod(shape))
            for begin in range(0, count, pool.size):
                f.write(pool[: min(pool.size, count - begin)].tobytes())
    return offset


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(method: str, path: Path, size: int, timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, method, str(path), str(size)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=max(5.0, timeout),
        cwd=ROOT,
    )
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else "failed"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_tests(files: list[str], deadline: float, per_run: float) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in files:
        left = deadline - time.time()
        if left < 10:
            results[name] = {"status": "skipped (deadline)"}
            continue
        if not (ROOT / name).exists():
            results[name] = {"status": "missing"}
            continue
        command = [sys.executable, "-m", "pytest", name, "-x", "-q", "-p", "no:cacheprovider"]
        try:
            env = clean_env() | {"JAXWEIGHTS_TEST_ACCELERATORS": "1"}  # tests/conftest.py: keep the GPU
            out = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=min(per_run, left), cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            results[name] = {"status": "timeout"}
            continue
        tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
        first = re.search(r"^(FAILED|ERROR) (\S+)", out.stdout, re.MULTILINE)
        results[name] = {
            "status": "ok" if out.returncode == 0 else f"rc {out.returncode}",
            **counts,
            "first_failure": first.group(2) if first else None,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes; runs on CPU-only machines")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds before writing what it has")
    args = parser.parse_args()
    started = time.time()
    deadline = started + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        layers, hidden, ff, vocab, limit_bytes = 2, 256, 704, 2000, 32 << 20
    else:  # ~4.1 GB: 9 llama-7B-width layers, embeddings and head
        layers, hidden, ff, vocab, limit_bytes = 9, 4096, 11008, 32000, 2 << 30
    report: dict[str, Any] = {"quick": args.quick, "rounds": {}, "measurements": {}, "tests": {}}
    # the tests first (a minute or two), so that a slow measurement cannot crowd them out
    report["tests"] = run_tests(TEST_FILES, started + 150, 60 if args.quick else 140)
    with tempfile.TemporaryDirectory(prefix="device_check-") as folder:
        path = Path(folder) / "model.safetensors"
        nbytes = write_checkpoint(path, layers, hidden, ff, vocab)
        report["checkpoint_bytes"] = nbytes
        with open(path, "rb") as f:  # warm the page cache: the disk is not what is measured
            while f.read(1 << 26):
                pass
        methods = ["limit", "jaxweights", "flax", "safe_open"]
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        shuffler = random.Random(0)
        for round_ in range(args.rounds):
            for method in shuffler.sample(methods, len(methods)):
                left = deadline - time.time() - 20  # keep time for the report
                if left < 10:
                    break
                try:
                    runs[method].append(run_worker(method, path, limit_bytes, left))
                except subprocess.TimeoutExpired:
                    runs[method].append({"error": "timeout"})
            report["rounds"][round_] = time.time() - started
            print(f"round {round_ + 1}/{args.rounds} done ({time.time() - started:.0f} s)", file=sys.stderr)
        report["measurements"] = runs
    table = render(report, nbytes, limit_bytes)
    (args.out / "device_check.md").write_text(table)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(table)
    print(f"total {time.time() - started:.0f} s", file=sys.stderr)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def render(report: dict[str, Any], nbytes: int, limit_bytes: int) -> str:
    runs = report["measurements"]
    devices = {r.get("device") for rs in runs.values() for r in rs if "device" in r}
    device = ", ".join(sorted(str(d) for d in devices)) or "unknown"
    on_cpu = all("cpu" in str(d).lower() for d in devices)
    head = "CPU ONLY (no GPU here: 'GPU' figures are the CPU device)" if on_cpu else "GPU"
    limit = runs.get("limit", [])
    pinned = _median(limit, "pinned_s")
    limit_gbs = limit_bytes / pinned / 1e9 if pinned else None
    lines = [
        f"### device check: {head}; device {device}; checkpoint {nbytes / 1e9:.2f} GB bf16"
        + (" (--quick)" if report["quick"] else ""),
        "",
        "| method | median s | GB/s | x limit | peak RSS growth MB | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("pageable_s", "numpy (pageable) device_put"),
        ("registered_s", "staging buffer (registered if CUDA) device_put"),
    ):
        value = _median(limit, key)
        if value:
            ratio = f"{limit_bytes / value / 1e9 / limit_gbs:.2f}" if limit_gbs else "-"
            lines.append(
                f"| {label}, {limit_bytes >> 20} MiB | {value:.4f} | {limit_bytes / value / 1e9:.2f} | {ratio} | - | {len(limit)} |"
            )
    if pinned:
        lines.append(
            f"| **limit**: pinned_host device_put, {limit_bytes >> 20} MiB | {pinned:.4f} | {limit_gbs:.2f} | 1.00 | - | {len(limit)} |"
        )
    else:
        pinned_errors = {r.get("pinned_error") for r in limit}
        lines.append(
            f"| limit: pinned_host unavailable ({'; '.join(str(e) for e in pinned_errors)[:120]}) | - | - | - | - | {len(limit)} |"
        )
    for method, label in (
        ("jaxweights", "jaxweights allocate_all(GPU(0))"),
        ("flax", "safetensors.flax.load_file"),
        ("safe_open", "safe_open(numpy) + device_put"),
    ):
        seconds = _median(runs.get(method, []), "s")
        rss = _median(runs.get(method, []), "peak_growth_mb")
        errors = [r["error"] for r in runs.get(method, []) if "error" in r]
        if seconds is None:
            lines.append(f"| {label} | failed: {errors[:1]} | - | - | - | 0 |")
            continue
        gbs = nbytes / seconds / 1e9
        ratio = f"{gbs / limit_gbs:.2f}" if limit_gbs else "-"
        lines.append(f"| {label} | {seconds:.3f} | {gbs:.2f} | {ratio} | {rss:.0f} | {len(runs[method])} |")
    lines += [
        "",
        "| test file | status | passed | failed | skipped | first failure |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, result in report["tests"].items():
        lines.append(
            f"| {name} | {result.get('status')} | {result.get('passed', 0)} | {result.get('failed', 0)} | "
            f"{result.get('skipped', 0)} | {result.get('first_failure') or ''} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
