"""Kill -9 loop, long run: each writer (``jw.save`` of a sharded folder, ``jw.save_file``, the CLI's
``convert``) is SIGKILLed at random points of hundreds of saves; after every kill the target must load
bit-identical to the previous or the new version, and after the next complete save no temporary entry
may remain beside it. The same loop, with 20 kills a writer, is ``tests/test_crash_safety.py``.

    python benchmarks/crash_loop.py [--kills 300] [--seed 0] [--writers save,save_file,convert]

Prints, per writer: kills, each outcome's count, and the stray entries left (must be 0). Exits 1 when a
check fails or a stray entry is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from tests.test_crash_safety import WRITERS, kill_loop  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=300, help="kills per writer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", default=",".join(WRITERS))
    args = parser.parse_args()
    failed = False
    for writer in args.writers.split(","):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="crash-loop-") as folder:
            outcomes = kill_loop(writer, Path(folder) / writer, args.kills, args.seed, log=print)
        print(f"{writer}: {args.kills} kills in {time.perf_counter() - start:.1f} s")
        for name in (
            "previous version",
            "new version",
            "completed before the kill",
            "kills that left temporary entries",
        ):
            print(f"  {name:<36}{outcomes[name]:>6}")
        print(f"  {'stray entries left':<36}{outcomes['stray entries left']:>6}")
        failed |= outcomes["stray entries left"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
