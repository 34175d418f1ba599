"""Fuzz every parser at scale: the strategies of ``tests/test_fuzz.py`` (`INPUTS`), 100,000 inputs each.

Each parser runs in its own process under a time limit, in chunks of inputs with their own Hypothesis
seed (generation only: no shrinking, no example database). Every input is opened, listed, read and
placed as in the tests (`exercise`), under the same 2-second watchdog. Prints one row per parser:
inputs run, inputs accepted, refused with a jaxweights error, other exceptions (must be 0), hangs (must
be 0), the slowest input, and the process's peak memory. Inputs that raised something else are saved
to ``--save`` for replay.

    python benchmarks/fuzz_parsers.py [--examples 100000] [--parsers safetensors,index,gguf,torch]
                                      [--chunk 2000] [--seed 0] [--timeout SECONDS] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARSERS = ("safetensors", "index", "gguf", "torch")


def worker(parser: str, examples: int, chunk: int, seed: int, save: Path) -> None:
    """Runs ``examples`` inputs of one parser; prints a JSON summary line after every chunk."""
    import hashlib
    import resource
    import shutil
    import tempfile
    import traceback

    sys.path.insert(0, str(ROOT))
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.test_fuzz import INPUTS, Hang, run_one, warm_up

    if parser == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            print(json.dumps({"skipped": "torch is not installed"}), flush=True)
            return
    inputs = INPUTS[parser]
    counts = {"inputs": 0, "accepted": 0, "refused": 0, "other": 0, "hangs": 0}
    state: dict[str, Any] = {"max_seconds": 0.0, "failures": []}
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{parser}-"))
    warm_up(inputs, folder)  # jax's start and first compilations are not the parser's time
    start = time.perf_counter()

    def record(content: bytes, error: BaseException) -> None:
        where = traceback.extract_tb(error.__traceback__)[-1]
        digest = hashlib.sha256(content).hexdigest()[:16]
        save.mkdir(parents=True, exist_ok=True)
        (save / f"{parser}-{digest}.bin").write_bytes(content)
        if len(state["failures"]) < 10:
            state["failures"].append(
                f"{type(error).__name__}: {str(error)[:160]} at {Path(where.filename).name}:{where.lineno} "
                f"(input {parser}-{digest}.bin)"
            )

    def one(content: bytes) -> None:
        case = folder / "case"
        case.mkdir(exist_ok=True)
        began = time.perf_counter()
        try:
            counts[run_one(inputs, case, content)] += 1
        except Hang as error:
            counts["hangs"] += 1
            record(content, error)
        except Exception as error:
            counts["other"] += 1
            record(content, error)
        finally:
            state["max_seconds"] = max(state["max_seconds"], time.perf_counter() - began)
            counts["inputs"] += 1
            shutil.rmtree(case, ignore_errors=True)

    done = 0
    number = 0
    while done < examples:
        size = min(chunk, examples - done)
        run = settings(
            max_examples=size,
            phases=[Phase.generate],
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(hypothesis_seed(seed * 1_000_003 + number)(given(inputs.strategy())(one)))
        run()
        done += size
        number += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        elapsed = time.perf_counter() - start
        print(json.dumps({**counts, **state, "seconds": elapsed, "peak_mib": peak}), flush=True)
    shutil.rmtree(folder, ignore_errors=True)


def run_parser(parser: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", parser, "--examples", str(args.examples), "--chunk",
        str(args.chunk), "--seed", str(args.seed), "--save", str(args.save),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    timeout = args.timeout or max(600.0, args.examples * 0.05)
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        stdout, status = (
            out.stdout,
            "" if out.returncode == 0 else f"exit {out.returncode}: {out.stderr[-400:]}",
        )
    except subprocess.TimeoutExpired as expired:
        raw = expired.stdout or b""
        stdout = raw.decode() if isinstance(raw, bytes) else raw
        status = f"timed out after {timeout:.0f} s"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if status:
        result["status"] = status
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100_000, help="inputs per parser")
    parser.add_argument("--parsers", default=",".join(PARSERS))
    parser.add_argument("--chunk", type=int, default=2000, help="inputs per Hypothesis run (one seed each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="seconds per parser (default: 0.05 s/input)")
    parser.add_argument(
        "--save", type=Path, default=Path("/tmp/jaxweights-fuzz"), help="where failing inputs go"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.examples, args.chunk, args.seed, args.save)
        return

    header = f"{'parser':<12} {'inputs':>8} {'accepted':>9} {'refused':>9} {'other':>6} {'hangs':>6} {'max s':>7} {'inputs/s':>9} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    problems = []
    for name in args.parsers.split(","):
        result = run_parser(name, args)
        if "skipped" in result:
            print(f"{name:<12} skipped: {result['skipped']}")
            continue
        rate = result.get("inputs", 0) / max(result.get("seconds", 0), 1e-9)
        print(
            f"{name:<12} {result.get('inputs', 0):>8} {result.get('accepted', 0):>9} {result.get('refused', 0):>9} "
            f"{result.get('other', 0):>6} {result.get('hangs', 0):>6} {result.get('max_seconds', 0):>7.3f} "
            f"{rate:>9.0f} {result.get('peak_mib', 0):>9.0f}",
            flush=True,
        )
        if result.get("status"):
            problems.append(f"{name}: {result['status']}")
        problems += [f"{name}: {failure}" for failure in result.get("failures", [])]
    for problem in problems:
        print(problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
