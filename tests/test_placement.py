from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxweights as jw
from jaxweights import DType
from jaxweights.errors import ShardingError
from jaxweights.formats import Checkpoint


def mesh_sharding(
    spec: PartitionSpec, shape: tuple[int, ...] = (8,), axes: tuple[str, ...] = ("x",)
) -> NamedSharding:
    devices = np.array(jax.devices()).reshape(shape)
    return NamedSharding(Mesh(devices, axes), spec)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """Records every (tensor, offset, bytes) copied out of a file."""
    log: list[tuple[str, int, int]] = []
    original = Checkpoint.copy_into

    def spy(self: Checkpoint, info: jw.TensorInfo, out: np.ndarray, offset: int = 0) -> None:
        log.append((info.name, offset, out.nbytes))
        original(self, info, out, offset)

    monkeypatch.setattr(Checkpoint, "copy_into", spy)
    yield log


def unaligned(write_reference: Callable[..., Path], tensors: dict[str, np.ndarray]) -> Path:
    """A reference-written file whose data section is deliberately not 64-byte aligned."""
    for pad in range(64):
        path = write_reference(tensors, metadata={"pad": "x" * pad})
        with jw.open_checkpoint(path) as checkpoint:
            if all(info.start % 64 for info in checkpoint.values()):
                return path
    raise AssertionError("could not make an unaligned file")


def test_aligned_tensors_alias_the_file_map(tmp_path: Path) -> None:
    values = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    weights = jw.load_weights(jw.save_file({"w": values}, tmp_path / "m.safetensors"))
    view = weights.w.data().data
    array = weights.w.allocate().array
    assert array.unsafe_buffer_pointer() == view.ctypes.data  # zero-copy
    weights.checkpoint.close()  # the map outlives the checkpoint while arrays alias it
    np.testing.assert_array_equal(np.asarray(array), values)


def test_unaligned_tensors_are_copied_once_into_aligned_buffers(
    write_reference: Callable[..., Path], reads: list[tuple[str, int, int]]
) -> None:
    values = np.random.default_rng(0).standard_normal((3 << 20,), dtype=np.float32)  # 12 MiB: parallel chunks
    weights = jw.load_weights(unaligned(write_reference, {"w": values}))
    array = weights.w.allocate().array
    np.testing.assert_array_equal(np.asarray(array), values)
    assert array.unsafe_buffer_pointer() % 64 == 0
    assert sum(n for _, _, n in reads) == values.nbytes and len(reads) > 1
    assert sorted(offset for _, offset, _ in reads)[0] == 0
    assert weights.checkpoint.bytes_copied == values.nbytes


def test_bulk_loads_let_xla_copy_in_chunks_and_release_the_pages(
    write_reference: Callable[..., Path], reads: list[tuple[str, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jaxweights._placement import place_many

    released: list[str] = []
    original = Checkpoint.release

    def spy(self: Checkpoint, info: jw.TensorInfo, offset: int = 0, length: int | None = None) -> None:
        released.append(info.name)
        original(self, info, offset, length)

    monkeypatch.setattr(Checkpoint, "release", spy)
    values = {f"w{i}": np.full((1 << 10,), i, np.float32) for i in range(6)}  # 4 KiB each
    weights = jw.load_weights(unaligned(write_reference, values))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    infos = [weights[name].info for name in values]
    arrays = place_many(
        weights.checkpoint, [(info, info.dtype, device) for info in infos], chunk_bytes=8 << 10
    )
    assert [int(a[0]) for a in arrays] == list(range(6)) and all(a.is_fully_replicated for a in arrays)
    assert reads == [] and sorted(released) == sorted(values)  # XLA copied them; every page released
    assert weights.checkpoint.bytes_copied == sum(v.nbytes for v in values.values())


@pytest.mark.parametrize(
    "target", [DType.bfloat16, DType.float16, DType.float8_e4m3fn, DType.float8_e5m2, DType.int8, DType.bool]
)
def test_conversion_matches_numpy(write_reference: Callable[..., Path], target: DType) -> None:
    values = np.random.default_rng(1).standard_normal((300, 700), dtype=np.float32) * 40
    weights = jw.load_weights(unaligned(write_reference, {"w": values}))
    array = weights.w.allocate(dtype=target).array
    assert array.dtype == target.to_numpy()
    expected = values.astype(target.to_numpy())
    np.testing.assert_array_equal(np.asarray(array).view(np.uint8), expected.view(np.uint8))


def test_float4_and_empty_tensors(tmp_path: Path) -> None:
    values = np.array([0.5, 1.0, -6.0, 0.0], dtype=ml_dtypes.float4_e2m1fn)
    path = jw.save_file({"f4": values, "empty": np.zeros((0, 3), np.float32)}, tmp_path / "m.safetensors")
    weights = jw.load_weights(path)
    assert weights.f4.allocate(dtype=DType.float32).array.tolist() == [0.5, 1.0, -6.0, 0.0]
    assert weights.f4.allocate().array.dtype == ml_dtypes.float4_e2m1fn
    assert weights.empty.allocate().array.shape == (0, 3)


def test_64_bit_follows_jax_enable_x64(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(write_reference({"ids": np.arange(5, dtype=np.int64)}))
    narrow = weights.ids.allocate()
    assert narrow.dtype is DType.int32 and narrow.original_dtype is DType.int64
    jax.config.update("jax_enable_x64", True)
    try:
        wide = weights.ids.allocate()
        assert wide.array.dtype == np.int64 and wide.array.tolist() == [0, 1, 2, 3, 4]
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize(
    ("spec", "mesh_shape", "axes"),
    [
        (PartitionSpec("x"), (8,), ("x",)),
        (PartitionSpec(None, "x"), (8,), ("x",)),
        (PartitionSpec("x", "y"), (4, 2), ("x", "y")),
        (PartitionSpec("x"), (4, 2), ("x", "y")),  # replicated over y
        (PartitionSpec(), (8,), ("x",)),
    ],
)
def test_sharded_values(
    write_reference: Callable[..., Path],
    spec: PartitionSpec,
    mesh_shape: tuple[int, ...],
    axes: tuple[str, ...],
) -> None:
    values = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    weights = jw.load_weights(unaligned(write_reference, {"w": values}))
    sharding = mesh_sharding(spec, mesh_shape, axes)
    array = weights.w.allocate(device=sharding, dtype="bfloat16").array
    assert array.sharding == sharding and array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(array), values.astype(ml_dtypes.bfloat16))
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index].astype(ml_dtypes.bfloat16))


def test_row_sharding_reads_each_distinct_block_once(
    write_reference: Callable[..., Path], reads: list[tuple[str, int, int]]
) -> None:
    values = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    weights = jw.load_weights(unaligned(write_reference, {"w": values}))
    array = weights.w.allocate(device=mesh_sharding(PartitionSpec("x"), (4, 2), ("x", "y"))).array  # 4 blocks
    # the 4 adjacent row blocks share one arena, filled by one copy; each byte is read exactly once
    assert reads == [("w", 0, values.nbytes)]
    assert weights.checkpoint.bytes_copied == values.nbytes
    pointers = {shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards}
    assert len(pointers) == 4  # devices sharing a block alias one buffer
    np.testing.assert_array_equal(np.asarray(array), values)


def test_aligned_row_shards_are_zero_copy(tmp_path: Path) -> None:
    values = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    weights = jw.load_weights(jw.save_file({"w": values}, tmp_path / "m.safetensors"))
    view = weights.w.data().data
    array = weights.w.allocate(device=mesh_sharding(PartitionSpec("x"))).array
    base = view.ctypes.data
    for shard in array.addressable_shards:
        assert shard.data.unsafe_buffer_pointer() == base + shard.index[0].start * 64 * 4


def test_indivisible_and_rank_mismatched_shardings(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(
        write_reference({"w": np.ones((6, 4), np.float32), "b": np.ones(6, np.float32)})
    )
    with pytest.raises(
        ShardingError,
        match=r"Tensor 'w' of shape \(6, 4\) .*: dimension 0 \(size 6\) does not divide evenly over mesh axes \('x',\) \(8 devices\) of mesh \{'x': 8\}",
    ):
        weights.w.allocate(device=mesh_sharding(PartitionSpec("x")))
    with pytest.raises(ShardingError, match=r"Tensor 'b' of shape \(6,\) .* has 1 dimension\(s\), but"):
        weights.b.allocate(device=mesh_sharding(PartitionSpec(None, "x")))
    with pytest.raises(
        ShardingError, match=r"dimension 1 \(size 4\) does not divide evenly over mesh axes \('x', 'y'\)"
    ):
        weights.w.allocate(device=mesh_sharding(PartitionSpec(None, ("x", "y")), (4, 2), ("x", "y")))
    assert weights.allocated_weights == {}


def test_the_process_exits_cleanly_while_copies_are_in_flight(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    tensors = {f"w{i}": np.full((1 << 20,), i, np.float32) for i in range(24)}  # 96 MiB of XLA copies
    path = unaligned(write_reference, tensors)
    script = (
        "import jaxweights as jw\n"
        f"w = jw.load_weights({str(path)!r})\n"
        "arrays = [acc.allocate().array for _, acc in w.items()]\n"
        "more = w.allocate_all()\n"
    )
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
