"""Load a 24-layer ~1.3 GB llama-like float32 checkpoint into stacked arrays (leading axis = layer),
sharded over 8 fake CPU devices: jaxweights against the hand-written converter.

The checkpoint (``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``mlp.{gate,up,down}_proj.weight``,
two norms per layer, ``model.embed_tokens.weight``, ``model.norm.weight``) is written once into
``benchmarks/_data`` with `safetensors.numpy`. The mesh is ``(8,)`` over axis ``"model"``; q/k/v/gate/up
are sharded on their output axis, o/down on their input axis, norms replicated. Methods, each in a fresh
process (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported), shuffled
round by round, page cache warm:

- ``stacked``: ``weights.model.layers.to_pytree(stack=True, mesh=mesh, rules=rules)``.
- ``peer``: every layer tensor through ``safe_open(framework="numpy")``, ``np.stack`` per kind, then
  ``jax.device_put(stacked, NamedSharding(mesh, spec))`` (the hand-written converter); with 2 processes
  ``jax.make_array_from_callback`` instead, since ``device_put`` of a host value onto a multi-process
  mesh first compares the value across processes (about 25 ms/MB on 2 CPU cores: a minute here).
- ``allocate_all``: the same tensors unstacked, ``weights.model.layers.allocate_all(mesh=..., rules=...)``
  with the specs minus their leading ``None`` (the time baseline: stacked should take <= 1.2x).

Every process blocks on every leaf, then checks the leaf count and shapes and compares one element per
kind of its first addressable shard with the file. Reported (medians): wall time, peak RSS growth over
the process's baseline after imports and mesh creation (VmHWM after resetting it) against the bytes of
the layers loaded, the anonymous memory and mapped file pages still held at the end, jaxweights' own
``bytes_copied`` and ``rchar`` of ``/proc/self/io``. A last section runs 2 processes x 4 devices with
`jax.distributed` on 127.0.0.1 over a mesh of all 8 devices: each process should read and hold about
half.

    python benchmarks/bench_stack.py [--runs 3] [--layers 24] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_job  # noqa: E402

# hidden, MLP width, vocabulary: 24 layers of 50.6 MB + 131 MB of embeddings = 1.35 GB in float32
FULL = (1024, 2816, 32000)
QUICK = (256, 512, 1000)
KINDS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)

WORKER = r"""
import json, os, re, sys, time
method, path, layers, procs, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // procs}"
import jax
if procs > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=procs, process_id=pid,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=120)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
import jaxweights as jw

mesh = Mesh(np.array(jax.devices()), ("model",))
assert mesh.size == 8, mesh
STACKED = [(r"(q|k|v|gate|up)_proj\.weight$", P(None, "model", None)),
           (r"(o|down)_proj\.weight$", P(None, None, "model"))]
UNSTACKED = [(pattern, P(*spec[1:])) for pattern, spec in STACKED]
jax.device_put(np.zeros(4)).block_until_ready()

def spec_for(name):
    return next((spec for pattern, spec in STACKED if re.search(pattern, name)), P())

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def rchar():
    for line in open("/proc/self/io"):
        if line.startswith("rchar"):
            return int(line.split()[1])

def dotted(key_path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS watermark
base, base_anon, base_file, base_rchar = status_kib("VmRSS"), status_kib("RssAnon"), status_kib("RssFile"), rchar()
start = time.perf_counter()
copied = None
if method == "stacked":
    weights = jw.load_weights(path)
    tree = weights.model.layers.to_pytree(stack=True, mesh=mesh, rules=STACKED)
    copied = weights.checkpoint.bytes_copied
elif method == "allocate_all":
    weights = jw.load_weights(path)
    tree = weights.model.layers.allocate_all(mesh=mesh, rules=UNSTACKED)
    copied = weights.checkpoint.bytes_copied
elif method == "peer":
    per_layer = [{} for _ in range(layers)]
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            if key.startswith("model.layers."):
                index, kind = key[len("model.layers."):].split(".", 1)
                per_layer[int(index)][kind] = f.get_tensor(key)
    stacked = {kind: np.stack([layer[kind] for layer in per_layer]) for kind in per_layer[0]}
    if procs == 1:
        tree = {kind: jax.device_put(x, NamedSharding(mesh, spec_for(kind))) for kind, x in stacked.items()}
    else:  # device_put of a host value onto a multi-process mesh first checks across processes that all
        # passed the same value (about 25 ms/MB here); the multi-host idiom is a callback per block
        tree = {kind: jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec_for(kind)), lambda i, x=x: x[i])
                for kind, x in stacked.items()}
else:
    raise SystemExit(f"unknown method {method}")
leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
jax.block_until_ready([leaf for _, leaf in leaves])
elapsed = time.perf_counter() - start
peak = status_kib("VmHWM")
anon, held, read = status_kib("RssAnon") - base_anon, status_kib("RssFile") - base_file, rchar() - base_rchar

# checks, outside the timing: every leaf present with its shape, one element per kind equal to the file
named = {dotted(key): leaf for key, leaf in leaves}
if method == "allocate_all":  # names relative to the subtree, or full
    named = {n if n.startswith("model.") else f"model.layers.{n}": leaf for n, leaf in named.items()}
checked = 0
with safe_open(path, framework="numpy") as f:
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.startswith("model.layers.")}
    if method == "allocate_all":
        assert sorted(named) == sorted(shapes), (sorted(named)[:3], sorted(shapes)[:3])
    else:  # stacked leaves: one per kind, named with or without the "model.layers." prefix
        kinds = {k.split(".", 3)[3] for k in shapes}
        assert sorted(n.removeprefix("model.layers.") for n in named) == sorted(kinds), sorted(named)
    for name, leaf in named.items():
        kind = name.removeprefix("model.layers.")
        if method == "allocate_all":
            assert list(leaf.shape) == shapes[name], (name, leaf.shape)
        else:
            assert list(leaf.shape) == [layers, *shapes[f"model.layers.0.{kind}"]], (name, leaf.shape)
        shard = leaf.addressable_shards[0]
        at = tuple(s.start or 0 for s in shard.index)
        local = np.asarray(shard.data)
        if method == "allocate_all":
            if not name.startswith(f"model.layers.{layers - 1}."):
                continue
            want = f.get_slice(name)[tuple(slice(i, i + 1) for i in at)].reshape(-1)[0]
            assert local.reshape(-1)[0] == want, (name, at, local.reshape(-1)[0], want)
            checked += 1
            continue
        # layers 0, 2 and the last of the stack (in file order, not name order), at the first element
        # of this process's first shard
        for i in sorted({0, min(2, layers - 1), layers - 1}):
            source = f"model.layers.{at[0] + i}.{kind}"
            want = f.get_slice(source)[tuple(slice(j, j + 1) for j in at[1:])].reshape(-1)[0]
            assert local[i].reshape(-1)[0] == want, (name, source, at, local[i].reshape(-1)[0], want)
        checked += 1
assert checked >= 9, checked
print(json.dumps({"s": elapsed, "peak": (peak - base) * 1024, "anon": anon * 1024, "file": held * 1024,
                  "rchar": read, "copied": copied, "checked": checked}))
if procs > 1:
    jax.distributed.shutdown()
"""


def make_checkpoint(folder: Path, layers: int, dims: tuple[int, int, int]) -> tuple[Path, int]:
    """Writes the llama-like checkpoint unless present; returns its path and the bytes of its layers."""
    import numpy as np

    hidden, inner, vocab = dims
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (hidden, hidden),
        "self_attn.v_proj.weight": (hidden, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    layer_bytes = layers * sum(int(np.prod(s)) for s in shapes.values()) * 4
    path = folder / f"llama-{layers}x{hidden}x{inner}.safetensors"
    if path.exists():
        return path, layer_bytes
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32)}
    for i in range(layers):
        for kind, shape in shapes.items():
            tensors[f"model.layers.{i}.{kind}"] = rng.standard_normal(shape, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(hidden, np.float32)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.rename(path)
    return path, layer_bytes


def run(method: str, path: Path, layers: int, procs: int = 1) -> list[dict[str, Any]]:
    """One measurement: ``procs`` fresh worker processes (one job); their results in process order."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
    return run_job(WORKER, [method, str(path), str(layers), str(procs)], procs, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="a small 4-layer checkpoint (smoke test)")
    parser.add_argument("--methods", default="stacked,peer,allocate_all")
    parser.add_argument("--data", type=Path, default=HERE / "_data")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    layers = 4 if args.quick else args.layers
    path, layer_bytes = make_checkpoint(args.data, layers, QUICK if args.quick else FULL)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    labels = {
        "stacked": "jaxweights `to_pytree(stack=True)`",
        "peer": "peer: safe_open + `np.stack` + `device_put`",
        "allocate_all": "jaxweights `allocate_all` (unstacked)",
    }
    methods = [m for m in args.methods.split(",") if m]
    cases = [(m, 1) for m in methods] + [(m, 2) for m in methods if m != "allocate_all"]
    results: dict[tuple[str, int], list[list[dict[str, Any]]]] = {case: [] for case in cases}
    shuffler, started = random.Random(0), time.time()
    for round_ in range(args.runs):
        for method, procs in shuffler.sample(cases, len(cases)):
            results[method, procs].append(run(method, path, layers, procs))
        print(f"round {round_ + 1}/{args.runs} ({time.time() - started:.0f} s)", file=sys.stderr)

    def med(method: str, key: str, procs: int = 1, pid: int = 0) -> float:
        return statistics.median(job[pid][key] for job in results[method, procs])

    def seconds(method: str, procs: int = 1, pid: int = 0) -> str:
        values = [job[pid]["s"] for job in results[method, procs]]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value / layer_bytes:.2f}x"

    def versus(method: str, other: str) -> str:
        if other not in methods:
            return "-"
        return f"{med(method, 's') / med(other, 's'):.2f}x"

    lines = [
        f"checkpoint: {path.name}, {path.stat().st_size / 1e9:.2f} GB float32 file, {layers} layers "
        f"= {layer_bytes / 1e9:.3f} GB loaded (the denominator of every ratio); mesh (8,) of fake CPU "
        f"devices; {args.runs} fresh processes per case, medians",
        "",
        "| method | s (min-max) | time vs peer | time vs allocate_all | peak RSS growth | anon held "
        "| file pages held | bytes_copied | rchar |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        copied = results[method, 1][0][0]["copied"]
        lines.append(
            f"| {labels[method]} | {seconds(method)} | {versus(method, 'peer')} "
            f"| {versus(method, 'allocate_all')} | {ratio(med(method, 'peak'))} | {ratio(med(method, 'anon'))} "
            f"| {ratio(med(method, 'file'))} | {ratio(copied)} | {ratio(med(method, 'rchar'))} |"
        )
    lines += [
        "",
        "2 processes x 4 devices (`jax.distributed` on 127.0.0.1), mesh (8,) over both; per process:",
        "",
        "| method | process | s (min-max) | peak RSS growth | anon held | file pages held | bytes_copied | rchar |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        if (method, 2) not in results:
            continue
        for pid in range(2):
            copied = None if results[method, 2][0][pid]["copied"] is None else med(method, "copied", 2, pid)
            lines.append(
                f"| {labels[method].replace('`device_put`', '`make_array_from_callback`')} | {pid} "
                f"| {seconds(method, 2, pid)} "
                f"| {ratio(med(method, 'peak', 2, pid))} | {ratio(med(method, 'anon', 2, pid))} "
                f"| {ratio(med(method, 'file', 2, pid))} | {ratio(copied)} | {ratio(med(method, 'rchar', 2, pid))} |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
