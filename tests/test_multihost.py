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


def run_processes(commands: list[list[str]], env: dict[str, str], timeout: float = 180) -> list[str]:
    """Runs the commands at once (the processes of one job), each under ``timeout``; returns the tail of
    each one's output. A process still running at the end is killed."""
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for command in commands
    ]
    logs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=timeout)
            logs.append(out.decode(errors="replace")[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return logs


def run_job(count: int, checkpoint: Path, scenario: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Starts ``count`` worker processes, waits (with a timeout) and returns their results."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    outputs = [tmp_path / f"{scenario}-{count}-{i}.json" for i in range(count)]
    commands = [
        [
            sys.executable,
            str(WORKER),
            str(i),
            str(count),
            str(port),
            str(checkpoint),
            scenario,
            str(outputs[i]),
        ]
        for i in range(count)
    ]
    logs = run_processes(commands, env)
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


@pytest.fixture
def layers(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(8):
        tensors[f"layers.{i}.rows.weight"] = rng.standard_normal((16, 8), dtype=np.float32)
        tensors[f"layers.{i}.cols.weight"] = rng.standard_normal((4, 16), dtype=np.float32)
        tensors[f"layers.{i}.stage"] = rng.standard_normal(4, dtype=np.float32)
    path = tmp_path / "layers.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("count", [2, 4])
def test_stacked_layers_each_process_reads_its_share(count: int, layers: Path, tmp_path: Path) -> None:
    for result in run_job(count, layers, "stack", tmp_path):
        assert "error" not in result, result.get("trace")
        assert result["processes"] == count
        assert result["equal"] == {"rows.weight": True, "cols.weight": True, "stage": True}
        assert result["bytes_copied"] == result["checkpoint_bytes"] // count


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


# Multi-process saves: each process writes only its own shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def values(tmp_path: Path) -> Path:
    """The tensors the save scenarios shard (`multihost_worker.sharding_of`), by the reference writer."""
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {
        "rows.weight": rng.standard_normal((64, 32), dtype=np.float32),
        "cols.weight": rng.standard_normal((16, 64), dtype=np.float32),
        "grid.weight": rng.standard_normal((32, 32), dtype=np.float32),
        "rows.ids": np.arange(64 * 3, dtype=np.int32).reshape(64, 3),
        "replicated.bias": rng.standard_normal(32, dtype=np.float32),
        "scalar.scale": np.array(0.5, np.float32),
        "host.table": rng.standard_normal((5, 3)).astype(np.float16),
    }
    path = tmp_path / "values.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_writes_only_its_shards_and_the_files_match_a_single_process_save(
    count: int, values: Path, tmp_path: Path
) -> None:
    import jaxweights as jw

    results = run_job(count, values, "write", tmp_path)
    for result in results:
        assert "error" not in result, result.get("trace")
        assert result["fully_addressable"] is False  # every jax leaf spans all processes
        # Sharded leaves: 1/N of their bytes each; leaves every process holds whole: process 0 alone.
        assert result["tensor_bytes"] == result["expected_bytes"]
        assert result["single_tensor_bytes"] == result["expected_bytes"]
    assert sum(r["tensor_bytes"] for r in results) == results[0]["total_bytes"]
    assert results[0]["header_bytes"] > 0 and all(r["header_bytes"] == 0 for r in results[1:])
    # The same values saved by one process, the way every single-process save writes: byte-identical.
    source = safetensors.numpy.load_file(str(values))
    tree = {"params": source, "step": 7}
    folder = jw.save(tree, tmp_path / "reference", max_shard_size="10kB")
    saved = tmp_path / f"saved-{count}"
    assert len(files_of(folder)) > 2  # shards and an index
    assert files_of(saved) == files_of(folder)
    single = jw.save(tree, tmp_path / "reference.safetensors")
    assert (tmp_path / f"single-{count}.safetensors").read_bytes() == single.read_bytes()
    loaded = safetensors.numpy.load_file(str(tmp_path / f"single-{count}.safetensors"))  # reference reader
    assert sorted(loaded) == sorted(f"params.{name}" for name in source)
    for name, want in source.items():
        assert loaded[f"params.{name}"].tobytes() == want.tobytes(), name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.parametrize("count", [1, 2])
def test_a_four_process_save_restores_bit_for_bit_onto_fewer_processes(
    count: int, values: Path, tmp_path: Path
) -> None:
    for result in run_job(4, values, "write", tmp_path):
        assert "error" not in result, result.get("trace")
    for result in run_job(count, tmp_path / "saved-4", "restore", tmp_path):
        assert "error" not in result, result.get("trace")
        assert result["local_devices"] == 8 // count
        assert result["step"] == 7
        assert result["exact"] == dict.fromkeys(safetensors.numpy.load_file(str(values)), True)


def test_a_process_that_fails_to_write_fails_the_save_everywhere(values: Path, tmp_path: Path) -> None:
    first, second = run_job(2, values, "write_fails", tmp_path)
    for result in (first, second):
        assert result.get("error") == "CheckpointWriteError", result
        assert "process 1 was writing its shards: No space left on device" in result["message"]
    assert "(this is process 0)" in first["message"]
    assert not (tmp_path / "saved-2").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_processes_saving_different_trees_get_an_error(values: Path, tmp_path: Path) -> None:
    for result in run_job(2, values, "write_mismatch", tmp_path):
        assert result.get("error") == "CheckpointWriteError", result
        assert "lay out different checkpoints" in result["message"]
    assert not (tmp_path / "saved-2").exists()


def test_a_process_that_never_saves_is_a_timeout_error_not_a_hang(values: Path, tmp_path: Path) -> None:
    first, second = run_job(2, values, "write_absent", tmp_path)
    assert first.get("error") == "CheckpointWriteError", first
    assert "process 1 did not reach step 'planned' within 3 s" in first["message"]
    assert second == {"process": 1, "skipped": True}
    assert not (tmp_path / "saved-2").exists()
