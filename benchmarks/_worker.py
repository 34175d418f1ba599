"""Shared by the benchmarks: run a worker script in a fresh Python process and read its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_worker(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Runs ``code`` with ``args`` in a fresh interpreter (without the caller's XLA_FLAGS unless ``env``
    says otherwise) and returns the JSON object on its last stdout line."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if out.returncode:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
