"""The staged accelerator path (`_transfer`), forced onto the faked CPU devices: reuse, budget, results,
release after transfer, error paths. No timing or thread-schedule assertions."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

import jaxweights as jw
from jaxweights._dtypes import DType
from jaxweights._loader import Job, load_all
from jaxweights._transfer import StagingPool, _pieces, device_put, load_staged
from jaxweights.errors import CheckpointReadError, DeviceError
from jaxweights.formats import Checkpoint

P = PartitionSpec
BUDGET = 4096  # four 1 KiB buffers: every tensor below spans several pieces


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.standard_normal((64, 48)).astype(np.float32),  # 12 KiB: 12 row pieces
        "b.bf16": rng.standard_normal((32, 24)).astype(ml_dtypes.bfloat16),
        "c.i32": rng.integers(-(2**31), 2**31 - 1, (16, 40), dtype=np.int32),
        "d.small": np.arange(8, dtype=np.float32),
        "e.scalar": np.array(3.5, np.float32),
    }


@pytest.fixture
def checkpoint(write_reference: Any) -> Iterator[Checkpoint]:
    path: Path = write_reference(tensors())  # 8-byte aligned, as Hugging Face writes
    with jw.open_checkpoint(path) as opened:
        yield opened


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    return Mesh(np.array(jax.devices("cpu")[: int(np.prod(shape))]).reshape(shape), names)


def sharding_for(kind: str, ndim: int) -> Sharding:
    if kind == "single":
        return SingleDeviceSharding(jax.devices("cpu")[1])
    if kind == "mesh8":
        return NamedSharding(mesh((8,), ("x",)), P("x") if ndim else P())
    if kind == "mesh2x4":
        return NamedSharding(mesh((2, 4), ("a", "b")), P(*("a", "b")[:ndim]))
    return NamedSharding(mesh((2, 4), ("a", "b")), P())  # replicated


def jobs(checkpoint: Checkpoint, kind: str, dtype: DType | None = None) -> list[Job]:
    return [
        Job(info, dtype or info.dtype, sharding_for(kind, len(info.shape)))
        for info in (checkpoint[name] for name in tensors())
    ]


def bits(array: Any) -> np.ndarray:
    host = np.asarray(array)
    return host.view(np.dtype(f"u{host.dtype.itemsize}")) if host.dtype.itemsize > 1 else host


@pytest.mark.parametrize("kind", ["single", "mesh8", "mesh2x4", "replicated"])
def test_staged_equals_plain_bit_for_bit(checkpoint: Checkpoint, kind: str) -> None:
    work = jobs(checkpoint, kind)
    staged = load_all(checkpoint, work, max_inflight_bytes=BUDGET, staged=True)
    plain = load_all(checkpoint, work, max_inflight_bytes=BUDGET, staged=False)
    assert list(staged) == list(plain) == list(tensors())
    for job in work:
        got, want = staged[job.info.name], plain[job.info.name]
        assert got.sharding == job.sharding and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(bits(got), bits(want))
        np.testing.assert_array_equal(bits(got), bits(tensors()[job.info.name]))


@pytest.mark.parametrize("target", [DType.bfloat16, DType.float16, DType.float32])
def test_conversion_on_the_device_is_exact(checkpoint: Checkpoint, target: DType) -> None:
    work = [job for job in jobs(checkpoint, "mesh8", target) if job.info.dtype.is_float()]
    staged = load_all(checkpoint, work, max_inflight_bytes=BUDGET, staged=True)
    plain = load_all(checkpoint, work, max_inflight_bytes=BUDGET, staged=False)  # converts on the host
    for job in work:
        assert staged[job.info.name].dtype == target.to_numpy()
        np.testing.assert_array_equal(bits(staged[job.info.name]), bits(plain[job.info.name]))


def test_integer_widening_is_exact(checkpoint: Checkpoint) -> None:
    info = checkpoint["c.i32"]
    (array,) = load_staged(
        checkpoint,
        [(info, DType.float32, SingleDeviceSharding(jax.devices("cpu")[0]))],
        max_inflight_bytes=BUDGET,
    )
    np.testing.assert_array_equal(np.asarray(array), tensors()["c.i32"].astype(np.float32))


def test_buffers_are_reused_within_the_budget(checkpoint: Checkpoint) -> None:
    pool = StagingPool(BUDGET)
    work = jobs(checkpoint, "mesh2x4")
    requests = [(job.info, job.dtype, job.sharding) for job in work]
    arrays = load_staged(checkpoint, requests, max_inflight_bytes=BUDGET, pool=pool)
    assert len(arrays) == len(work)
    assert pool.count == 4 and pool.count * pool.buffer_bytes <= BUDGET
    assert pool.peak_bytes <= BUDGET
    assert all(uses > 1 for uses in pool.uses)  # every buffer served several pieces
    assert pool.free == pool.count and pool.in_flight == 0


def test_pieces_fit_one_buffer_each() -> None:
    info = TensorInfoLike.make((64, 48), DType.float32)
    from jaxweights._placement import plan_for

    plan = plan_for(info, SingleDeviceSharding(jax.devices("cpu")[0]))
    pieces = _pieces(0, plan.blocks, 1024)
    assert all(piece.nbytes <= 1024 for piece in pieces)
    assert sum(piece.nbytes for piece in pieces) == info.nbytes
    assert [piece.key[0] for piece in pieces][:2] == [(0, 5), (5, 10)]


class TensorInfoLike:
    @staticmethod
    def make(shape: tuple[int, ...], dtype: DType) -> Any:
        from jaxweights.formats import TensorInfo

        nbytes = int(np.prod(shape)) * dtype.size_in_bytes
        return TensorInfo("t", dtype, shape, Path("x"), 0, nbytes)


def test_an_oversize_tensor_runs_alone(write_reference: Any) -> None:
    values = {"big": np.arange(4096, dtype=np.float32).reshape(2, 2048), "small": np.ones((4, 4), np.float32)}
    with jw.open_checkpoint(write_reference(values)) as checkpoint:
        pool = StagingPool(BUDGET)
        requests = [
            (checkpoint[n], checkpoint[n].dtype, SingleDeviceSharding(jax.devices("cpu")[0])) for n in values
        ]
        big, small = load_staged(checkpoint, requests, max_inflight_bytes=BUDGET, pool=pool)
    assert pool.peak_bytes == 16384  # rows of 8 KiB > one buffer: it ran alone, nothing else in flight
    np.testing.assert_array_equal(np.asarray(big), values["big"])
    np.testing.assert_array_equal(np.asarray(small), values["small"])


class _Pending:
    """A transfer whose completion the test controls; it reads the host buffer only when it completes,
    as a DMA would, so a buffer reused too early would corrupt the result."""

    def __init__(self, host: np.ndarray, sharding: Sharding, done: threading.Event) -> None:
        self.host, self.sharding, self.done = host, sharding, done

    def block_until_ready(self) -> jax.Array:
        assert self.done.wait(timeout=60)
        return jax.device_put(np.array(self.host), self.sharding)


def test_buffer_is_held_until_its_transfer_completes(checkpoint: Checkpoint) -> None:
    pool = StagingPool(2048, buffer_bytes=1024)
    started, done = threading.Event(), threading.Event()

    def put(host: np.ndarray, shardings: Sequence[Sharding]) -> list[_Pending]:
        started.set()
        return [_Pending(host, sharding, done) for sharding in shardings]

    info = checkpoint["d.small"]
    results: list[jax.Array] = []
    loader = threading.Thread(
        target=lambda: results.extend(
            load_staged(
                checkpoint,
                [(info, info.dtype, SingleDeviceSharding(jax.devices("cpu")[0]))],
                max_inflight_bytes=2048,
                put=put,
                pool=pool,
            )
        )
    )
    loader.start()
    assert started.wait(timeout=60)
    assert pool.free == 1 and pool.in_flight == info.nbytes  # leased while the transfer is pending
    done.set()
    loader.join(timeout=60)
    assert not loader.is_alive()
    assert pool.free == 2 and pool.in_flight == 0
    np.testing.assert_array_equal(np.asarray(results[0]), tensors()["d.small"])


def test_transfers_read_buffers_only_after_they_are_filled(checkpoint: Checkpoint) -> None:
    done = threading.Event()
    done.set()

    def put(host: np.ndarray, shardings: Sequence[Sharding]) -> list[_Pending]:
        return [_Pending(host, sharding, done) for sharding in shardings]

    work = jobs(checkpoint, "mesh8")
    pool = StagingPool(BUDGET)
    arrays = load_staged(
        checkpoint,
        [(j.info, j.dtype, j.sharding) for j in work],
        max_inflight_bytes=BUDGET,
        put=put,
        pool=pool,
    )
    for job, array in zip(work, arrays, strict=True):
        np.testing.assert_array_equal(bits(array), bits(tensors()[job.info.name]))


def stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("jaxweights-stage")]


def test_a_read_error_stops_the_load_and_leaves_the_pool_intact(
    checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, calls, lock = checkpoint.copy_into, [0], threading.Lock()

    def failing(info: Any, out: np.ndarray, offset: int = 0) -> None:
        with lock:
            calls[0] += 1
            fail = calls[0] == 3
        if fail:
            raise CheckpointReadError("disk gone", file=info.file, tensor=info.name)
        original(info, out, offset)

    monkeypatch.setattr(checkpoint, "copy_into", failing)
    pool = StagingPool(BUDGET)
    requests = [(j.info, j.dtype, j.sharding) for j in jobs(checkpoint, "single")]
    with pytest.raises(CheckpointReadError, match="disk gone"):
        load_staged(checkpoint, requests, max_inflight_bytes=BUDGET, pool=pool)
    assert not stage_threads()
    assert pool.free == pool.count and pool.in_flight == 0
    monkeypatch.setattr(checkpoint, "copy_into", original)
    arrays = load_staged(checkpoint, requests, max_inflight_bytes=BUDGET, pool=pool)  # the pool still works
    np.testing.assert_array_equal(np.asarray(arrays[0]), tensors()["a.f32"])


def test_a_failing_transfer_is_a_device_error(checkpoint: Checkpoint) -> None:
    calls, lock = [0], threading.Lock()

    def put(host: np.ndarray, shardings: Sequence[Sharding]) -> Sequence[Any]:
        with lock:
            calls[0] += 1
            fail = calls[0] == 4
        if fail:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return device_put(host, shardings)

    pool = StagingPool(BUDGET)
    requests = [(j.info, j.dtype, j.sharding) for j in jobs(checkpoint, "mesh8")]
    with pytest.raises(DeviceError, match="RESOURCE_EXHAUSTED") as caught:
        load_staged(checkpoint, requests, max_inflight_bytes=BUDGET, put=put, pool=pool)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "a.f32" in str(caught.value) or "b.bf16" in str(caught.value)
    assert not stage_threads()
    assert pool.free == pool.count and pool.in_flight == 0


def test_load_all_reports_progress_and_order_through_the_staged_path(checkpoint: Checkpoint) -> None:
    from jaxweights._progress import Progress

    work = jobs(checkpoint, "single")
    bar = Progress(sum(j.nbytes for j in work), len(work), enabled=False)
    arrays = load_all(checkpoint, work, max_inflight_bytes=BUDGET, progress=bar, staged=True)
    assert list(arrays) == [j.info.name for j in work]
    assert bar.done_count == len(work) and bar.done_bytes == sum(j.nbytes for j in work)


def test_quantized_blocks_dequantize_on_the_device_and_others_fall_back(tmp_path: Path) -> None:
    import gguf

    from jaxweights import QuantizationEncoding
    from jaxweights.formats import TensorInfo
    from tests.test_quantized import catalogue

    values = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    quantized = TensorInfo("", DType.uint8, (16, 256), Path(), 0, 0, QuantizationEncoding.Q8_0)
    big_endian = TensorInfo("", DType.float32, (8, 6), Path(), 0, 0, None, ">")
    weights = catalogue(
        tmp_path / "q.gguf",
        {"q": (blocks.tobytes(), quantized), "be": (values[:8, :6].astype(">f4").tobytes(), big_endian)},
    )
    checkpoint = weights.checkpoint
    rows = NamedSharding(mesh((8,), ("x",)), P("x"))
    work = [
        Job(checkpoint["q"], DType.float32, rows),
        Job(checkpoint["q"], DType.uint8, rows),
        Job(checkpoint["be"], DType.float32, rows),  # big-endian: placed by `place`, in order
    ]
    for job in work:
        (staged,) = load_staged(checkpoint, [(job.info, job.dtype, job.sharding)], max_inflight_bytes=1024)
        (plain,) = load_all(checkpoint, [job], staged=False).values()
        assert staged.sharding == job.sharding and staged.dtype == plain.dtype
        np.testing.assert_array_equal(bits(staged), bits(plain))


@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
def test_a_gpu_target_loads_through_the_staged_path(write_reference: Any) -> None:
    values = tensors()
    weights = jw.load_weights(write_reference(values))
    arrays = weights.allocate_all(device=jw.DeviceRef.GPU(0), max_inflight_bytes=BUDGET)
    for name, array in arrays.items():
        assert next(iter(array.devices())).platform == "gpu"
        np.testing.assert_array_equal(bits(array), bits(values[name]))
