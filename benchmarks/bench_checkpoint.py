"""Save and restore a ~1 GB params + Adam state pytree, sharded over 8 CPU devices: jaxweights vs Orbax.

Each (method, phase) runs in a fresh process, methods shuffled each round. Save: from placed, sharded
arrays to durable files; restore: into abstract targets (`jax.ShapeDtypeStruct`s with the same shardings).
Peak RSS during save is reported over the baseline (the tree already in memory), as a multiple of the
largest tensor.

Training checkpoints (``*-manager``): `jw.CheckpointManager` against Orbax's ``ocp.CheckpointManager``, both
asynchronous, in a training loop of `LOOP_STEPS` saves, each followed by a jitted update that donates the
state's buffers. Blocked: how long ``save`` holds the loop; durable: from ``save`` until
``wait_until_finished`` returns (waited at once, so the write runs alone); the first save (with its
one-time setup) and the later ones are reported apart. Restore: the latest step into abstract targets, in
a fresh process.

    python benchmarks/bench_checkpoint.py [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402

WORKER = r"""
import json, sys, time, os
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np, jax.numpy as jnp, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
method, phase, folder, kind = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
LOOP_STEPS = 3
mesh = Mesh(np.array(jax.devices()), ("x",))
D, F, L = 1024, 4096, 8

def init():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 4 * L + 1))
    params = {"embed": jax.random.normal(next(keys), (32000, D))}
    for i in range(L):
        params[f"layer_{i}"] = {"attn": jax.random.normal(next(keys), (D, 4 * D)),
                                "mlp_in": jax.random.normal(next(keys), (D, F)),
                                "mlp_out": jax.random.normal(next(keys), (F, D)), "norm": jnp.ones(D)}
    return params

def shard(tree):
    return jax.tree.map(lambda x: NamedSharding(mesh, P("x") if x.ndim == 2 else P()), tree)

def make_state():
    # "trained": Adam's moments hold real values; "fresh": they are zeros, as at step 0.
    params = init()
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    if kind == "trained":
        grads = jax.tree.map(lambda p: p * 0.01 + 0.001, params)
        _, opt_state = tx.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": 0}

abstract = jax.eval_shape(make_state)
shardings = shard(abstract)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

if phase == "loop":
    state = jax.jit(make_state, out_shardings=shardings)()
    arrays = {"params": state["params"], "opt_state": state["opt_state"]}
    update = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    if method == "jaxweights":
        import jaxweights as jw
        manager = jw.CheckpointManager(folder, max_to_keep=2)
        save = lambda step, tree: manager.save(step, tree)
    else:
        import orbax.checkpoint as ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
        manager = ocp.CheckpointManager(folder, options=options)
        save = lambda step, tree: manager.save(step, args=ocp.args.StandardSave(tree))
    blocked, durable = [], []
    for step in range(1, LOOP_STEPS + 1):
        jax.block_until_ready(arrays)
        start = time.perf_counter()
        save(step, {**arrays, "step": 1000})
        blocked.append((time.perf_counter() - start) * 1e3)
        manager.wait_until_finished()
        durable.append((time.perf_counter() - start) * 1e3)
        arrays = update(arrays)  # reuses (donates) the buffers just saved
    jax.block_until_ready(arrays)
    manager.close()
    print(json.dumps({"blocked_first": blocked[0], "durable_first": durable[0],
                      "blocked": sum(blocked[1:]) / (LOOP_STEPS - 1), "durable": sum(durable[1:]) / (LOOP_STEPS - 1)}))
elif phase == "latest":
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    target["step"] = 0
    start = time.perf_counter()
    if method == "jaxweights":
        import jaxweights as jw
        restored = jw.CheckpointManager(folder).restore(target)
    else:
        import orbax.checkpoint as ocp
        target["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
        manager = ocp.CheckpointManager(folder)
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    jax.block_until_ready(restored)
    ms = (time.perf_counter() - start) * 1e3
    assert int(restored["step"]) == 1000
    print(json.dumps({"ms": ms}))
elif phase == "save":
    state = jax.jit(make_state, out_shardings=shardings)()
    state["step"] = 1000
    jax.block_until_ready(state)
    largest = max(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    total = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    start = time.perf_counter()
    if method == "jaxweights":
        import jaxweights as jw
        jw.save(state, folder)
    else:
        import orbax.checkpoint as ocp
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(folder, state)
        checkpointer.wait_until_finished()
    ms = (time.perf_counter() - start) * 1e3
    print(json.dumps({"ms": ms, "peak_over_largest": (rss("VmHWM") - base) / largest, "bytes": total}))
else:
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    target["step"] = 0
    start = time.perf_counter()
    if method == "jaxweights":
        import jaxweights as jw
        restored = jw.restore(folder, target)
    else:
        import orbax.checkpoint as ocp
        target["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
        restored = ocp.StandardCheckpointer().restore(folder, target)
    jax.block_until_ready(restored)
    ms = (time.perf_counter() - start) * 1e3
    assert int(restored["step"]) == 1000
    print(json.dumps({"ms": ms}))
"""

USER_CODE = {
    "jaxweights": ["restored = jw.restore(folder, target)"],
    "orbax": ["checkpointer = ocp.StandardCheckpointer()", "restored = checkpointer.restore(folder, target)"],
}


def run(method: str, phase: str, folder: Path, kind: str) -> dict[str, float]:
    return run_worker(WORKER, method, phase, str(folder), kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=HERE / "_data" / "checkpoints")
    parser.add_argument(
        "--state",
        choices=["trained", "fresh"],
        default="trained",
        help="Adam moments real (trained) or zero (fresh)",
    )
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    shuffler, started = random.Random(0), time.time()
    for round_ in range(args.runs):
        for method in shuffler.sample(["jaxweights", "orbax", "jaxweights-manager", "orbax-manager"], 4):
            folder = (args.data / method).resolve()
            if method.endswith("manager"):
                shutil.rmtree(folder, ignore_errors=True)  # a fresh run of training steps
                name = method.removesuffix("-manager")
                results.setdefault((method, "loop"), []).append(run(name, "loop", folder, args.state))
                results.setdefault((method, "latest"), []).append(run(name, "latest", folder, args.state))
                continue
            if method == "orbax":
                shutil.rmtree(folder, ignore_errors=True)  # Orbax refuses to overwrite
            results.setdefault((method, "save"), []).append(run(method, "save", folder, args.state))
            results.setdefault((method, "restore"), []).append(run(method, "restore", folder, args.state))
        print(f"round {round_ + 1}/{args.runs} ({time.time() - started:.0f} s)", file=sys.stderr)

    def med(method: str, phase: str, key: str = "ms") -> float:
        return statistics.median(r[key] for r in results[(method, phase)])

    size = results[("jaxweights", "save")][0]["bytes"] / 2**30
    print(
        f"\n{size:.2f} GiB params + {args.state} Adam state, 8 CPU devices, rows sharded, {args.runs} runs (medians)"
    )
    print(
        f"{'':12} {'save ms':>9} {'restore ms':>11} {'save peak RSS / largest tensor':>31} {'restore lines':>14}"
    )
    for method in ("orbax", "jaxweights"):
        print(
            f"{method:12} {med(method, 'save'):9.0f} {med(method, 'restore'):11.0f} "
            f"{med(method, 'save', 'peak_over_largest'):30.2f}x {len(USER_CODE[method]):14d}"
        )
    print(
        f"jaxweights vs orbax: save {med('orbax', 'save') / med('jaxweights', 'save'):.1f}x faster, "
        f"restore {med('orbax', 'restore') / med('jaxweights', 'restore'):.1f}x faster"
    )
    print("\nTraining checkpoints, async CheckpointManager (ms; first save, then the mean of the later ones)")
    print(
        f"{'':20} {'blocked 1st':>11} {'blocked':>8} {'durable 1st':>11} {'durable':>8} {'restore latest':>15}"
    )
    for method in ("orbax-manager", "jaxweights-manager"):
        print(
            f"{method:20} {med(method, 'loop', 'blocked_first'):11.0f} {med(method, 'loop', 'blocked'):8.0f} "
            f"{med(method, 'loop', 'durable_first'):11.0f} {med(method, 'loop', 'durable'):8.0f} "
            f"{med(method, 'latest'):15.0f}"
        )
    ours, theirs = "jaxweights-manager", "orbax-manager"
    print(
        f"jaxweights vs orbax: blocked {med(ours, 'loop', 'blocked') / med(theirs, 'loop', 'blocked'):.2f}x "
        f"(first {med(ours, 'loop', 'blocked_first') / med(theirs, 'loop', 'blocked_first'):.2f}x), "
        f"durable {med(ours, 'loop', 'durable') / med(theirs, 'loop', 'durable'):.2f}x "
        f"(first {med(ours, 'loop', 'durable_first') / med(theirs, 'loop', 'durable_first'):.2f}x), "
        f"restore {med(theirs, 'latest') / med(ours, 'latest'):.1f}x faster; blocked vs a synchronous jw.save "
        f"{med(ours, 'loop', 'blocked') / med('jaxweights', 'save'):.3f}x"
    )


if __name__ == "__main__":
    main()
