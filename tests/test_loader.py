from __future__ import annotations

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxweights as jw
import jaxweights._loader as loader
from jaxweights._loader import Job, load_all, planned_bytes

P = PartitionSpec


@pytest.fixture
def weights(tmp_path: Path) -> jw.Weights:
    tensors = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(8)}  # 16 KiB each
    return jw.load_weights(jw.save_file(tensors, tmp_path / "m.safetensors"))


def jobs_for(weights: jw.Weights, sharding: jax.sharding.Sharding) -> list[Job]:
    return [Job(acc.info, acc.info.dtype, sharding) for _, acc in weights.items()]


def test_budget_bounds_bytes_in_flight(weights: jw.Weights, monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight, peak, calls, lock = [0], [0], [0], threading.Lock()
    original = loader.place  # type: ignore[attr-defined]
    together = threading.Barrier(2, timeout=30)  # the first two jobs must run at the same time

    def spy(*args: object, **kwargs: object) -> jax.Array:
        with lock:
            in_flight[0] += 1
            calls[0] += 1
            first_two = calls[0] <= 2
            peak[0] = max(peak[0], in_flight[0])
        if first_two and together.parties:
            together.wait()  # a serial loader would never get past this (BrokenBarrierError)
        try:
            return original(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(loader, "place", spy)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = load_all(
        weights.checkpoint, jobs_for(weights, device), max_inflight_bytes=2 * 64 * 64 * 4, workers=4
    )
    assert peak[0] <= 2  # parallel (the barrier), but never more than the budget allows
    assert [int(a[0, 0]) for a in arrays.values()] == list(range(8))
    calls[0] = 2  # no more barrier
    # a tensor larger than the budget still loads, alone
    peak[0] = 0
    arrays = load_all(weights.checkpoint, jobs_for(weights, device), max_inflight_bytes=1, workers=4)
    assert len(arrays) == 8 and peak[0] == 1
    peak[0] = 0
    arrays = load_all(weights.checkpoint, jobs_for(weights, device))  # CPU targets: batched, in order
    assert peak[0] <= 1 and [int(a[0, 0]) for a in arrays.values()] == list(range(8))


def test_first_failure_is_raised_and_the_rest_cancelled(
    weights: jw.Weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = loader.place  # type: ignore[attr-defined]

    def flaky(checkpoint: jw.Checkpoint, info: jw.TensorInfo, *rest: object, **kwargs: object) -> jax.Array:
        calls.append(info.name)
        if info.name == "w0":
            raise OSError("disk went away")
        return original(checkpoint, info, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "place", flaky)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(OSError, match=r"disk went away"):
        load_all(weights.checkpoint, jobs_for(weights, device), max_inflight_bytes=1, workers=4)
    assert len(calls) < 8
    # CPU targets are placed in one batch: a failure while it is prepared ends the load too
    original_views = jw.Checkpoint.views

    def failing_views(self: jw.Checkpoint, infos: list[jw.TensorInfo]) -> list[np.ndarray]:
        if any(info.name == "w3" for info in infos):
            raise OSError("disk went away")
        return original_views(self, infos)

    monkeypatch.setattr(jw.Checkpoint, "views", failing_views)
    with pytest.raises(OSError, match=r"disk went away"):
        load_all(weights.checkpoint, jobs_for(weights, device))


def test_planned_bytes_counts_each_distinct_block(weights: jw.Weights) -> None:
    info = weights.w0.info
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    assert planned_bytes(info, NamedSharding(mesh, P("x"))) == info.nbytes
    assert planned_bytes(info, NamedSharding(mesh, P())) == info.nbytes
