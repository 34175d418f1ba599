"""Dequantize ~256 MiB of GGML blocks on CPU: jitted `dequantize` against gguf-py's numpy reference.

One process, the two methods interleaved round by round on the same random valid blocks (rows of 4096
values, finite float16 scales). `dequantize` is jitted once per type, warmed up, and fed blocks already on
the device; each run blocks until ready. gguf-py's `gguf.quants.dequantize` runs on the numpy array. Reported:
median wall time, output throughput (float32 GB/s) and the speedup; the jax output is checked bit for bit
against gguf-py's on the first round.

Most of either method's time is faulting in its fresh ~2 GB output. numpy asks for transparent huge pages
(``NUMPY_MADVISE_HUGEPAGE``, on by default); XLA's CPU buffers come from glibc's malloc, so the script re-runs
itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` to give both the same footing. ``--no-hugepages``
turns huge pages off for both.

    python benchmarks/bench_dequant.py [--runs 5] [--mib 256] [--types Q4_K Q8_0] [--no-hugepages]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

COLS = 4096

# Byte offsets of the float16 scales d (and dmin) in each block, from ggml-common.h.
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}
SCALE_OFFSETS |= {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, mib: int) -> Any:
    import numpy as np

    from jaxweights import QuantizationEncoding

    encoding = QuantizationEncoding[name]
    row_bytes = COLS // encoding.elements_per_block * encoding.block_size
    rows = (mib << 20) // row_bytes
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows * COLS // encoding.elements_per_block, encoding.block_size), np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scales = rng.uniform(-0.05, 0.05, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, row_bytes)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="size of the quantized blocks per type")
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0"], choices=sorted(SCALE_OFFSETS))
    parser.add_argument("--no-hugepages", action="store_true", help="no transparent huge pages for either")
    args = parser.parse_args()
    env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0" if args.no_hugepages else "1")
    if not args.no_hugepages:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    if env != os.environ:  # glibc reads its tunables, numpy its variable, once at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import gguf
    import jax
    import numpy as np

    from jaxweights._dequant import dequantize

    device = jax.devices()[0]
    pages = "off" if args.no_hugepages else "on for both"
    print(f"device: {device.platform}, jax {jax.__version__}, {args.runs} runs, huge pages {pages}")
    rows_out = []
    started = time.time()
    for name in args.types:
        blocks = random_blocks(name, args.mib)
        shape = (blocks.shape[0], COLS)
        qtype = gguf.GGMLQuantizationType[name]
        expand = jax.jit(partial(dequantize, encoding=name, shape=shape))
        on_device = jax.device_put(blocks, device)
        first = np.asarray(expand(on_device))  # warm-up (compile) and the exactness check
        reference = gguf.quants.dequantize(blocks, qtype)
        assert np.array_equal(first.view(np.uint32), reference.view(np.uint32)), name
        del first, reference
        jax_s, numpy_s = [], []
        for _ in range(args.runs):
            jax_s.append(timed(lambda: expand(on_device).block_until_ready()))  # noqa: B023
            numpy_s.append(timed(lambda: gguf.quants.dequantize(blocks, qtype)))  # noqa: B023
        out_gb = blocks.shape[0] * COLS * 4 / 1e9
        j, n = statistics.median(jax_s), statistics.median(numpy_s)
        rows_out.append((name, blocks.nbytes / 2**20, out_gb, j, n))
        print(f"{name} done ({time.time() - started:.0f} s)", file=sys.stderr)

    print(
        f"\n{'type':6} {'blocks MiB':>10} {'out GB f32':>11} {'jax ms':>9} {'jax GB/s':>9}"
        f" {'gguf-py ms':>11} {'gguf-py GB/s':>13} {'speedup':>8}"
    )
    for name, mib, out_gb, j, n in rows_out:
        print(
            f"{name:6} {mib:10.1f} {out_gb:11.2f} {j * 1e3:9.0f} {out_gb / j:9.2f}"
            f" {n * 1e3:11.0f} {out_gb / n:13.2f} {n / j:7.1f}x"
        )


if __name__ == "__main__":
    main()
