"""Real multi-process jobs: 2 and 4 CPU processes on 127.0.0.1, each reading only its own shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_job(count: int, checkpoint: Path, scenario: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Starts ``count`` worker processes, waits (with a timeout) and returns their results."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    outputs = [tmp_path / f"{scenario}-{count}-{i}.json" for i in range(count)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(i),
                str(count),
                str(port),
                str(checkpoint),
                scenario,
                str(outputs[i]),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]
    logs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=180)
            logs.append(out.decode(errors="replace")[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for output, log in zip(outputs, logs, strict=True):
        assert output.exists(), f"a worker died without a result:\n{log}"
        results.append(json.loads(output.read_text()))
    return results


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        "rows.weight": rng.standard_normal((64, 32), dtype=np.float32),
        "cols.weight": rng.standard_normal((16, 64), dtype=np.float32),
        "grid.weight": rng.standard_normal((32, 32), dtype=np.float32),
        "norm.bias": rng.standard_normal(32, dtype=np.float32),
        "ids": np.arange(16, dtype=np.int32),
    }
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path))  # the reference writer: unaligned, as HF's
    tensors["extra"] = np.ones(4, np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model-other.safetensors"))
    return path


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_reads_exactly_its_share(count: int, checkpoint: Path, tmp_path: Path) -> None:
    results = run_job(count, checkpoint, "load", tmp_path)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert result["local_devices"] == 8 // count
        assert result["shards_ok"]
        assert result["gathered"] == dict.fromkeys(safetensors.numpy.load_file(str(checkpoint)), True)
        assert result["bytes_copied"] == result["expected_bytes"]
        assert result["bytes_copied"] < result["checkpoint_bytes"]


@pytest.mark.parametrize("scenario", ["mismatch", "mismatch_without_kv_store"])
def test_a_process_with_another_checkpoint_gets_an_error_not_a_hang(
    checkpoint: Path, tmp_path: Path, scenario: str
) -> None:
    for result in run_job(2, checkpoint, scenario, tmp_path):
        assert result.get("error") == "CheckpointError", result
        assert "loading different checkpoints" in result["message"]


def test_a_mesh_without_this_process_devices_is_an_error(checkpoint: Path, tmp_path: Path) -> None:
    first, second = run_job(2, checkpoint, "foreign_mesh", tmp_path)
    assert "error" not in first, first.get("trace")
    assert second.get("error") == "ShardingError"
    assert "holds none of process 1's devices" in second["message"]


def test_a_sharded_multi_process_save(checkpoint: Path, tmp_path: Path) -> None:
    results = run_job(2, checkpoint, "save", tmp_path)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert result["fully_addressable"] is False  # every array spans both processes
    import jaxweights as jw

    saved, source = jw.load_weights(results[0]["saved"]), safetensors.numpy.load_file(str(checkpoint))
    assert sorted(saved.params.keys()) == sorted(source)
    for name, want in source.items():
        got = saved.params[name].data().data
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), name
    assert saved.restore({"step": 0}, strict=False)["step"] == 7
