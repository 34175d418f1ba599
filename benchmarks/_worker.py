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


def free_port() -> str:
    """A free TCP port on 127.0.0.1, for a multi-process job's coordinator."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run_job(
    code: str, args: list[str], procs: int, env: dict[str, str], timeout: float = 600
) -> list[dict[str, Any]]:
    """Runs ``procs`` fresh interpreters of ``code`` at once (one multi-process job), each given ``args``
    then its process id and the coordinator port; returns their JSON results in process order."""
    port = free_port() if procs > 1 else "0"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args, str(pid), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for pid in range(procs)
    ]
    results = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=timeout)
            if worker.returncode:
                raise RuntimeError(f"{' '.join(args)} x{procs} failed:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return results
