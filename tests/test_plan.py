from __future__ import annotations

import itertools
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxweights import DType, TensorInfo
from jaxweights._plan import block_key, plan_reads
from jaxweights.errors import ShardingError


def info(shape: tuple[int, ...], dtype: DType = DType.float32, start: int = 1000) -> TensorInfo:
    nbytes = int(np.prod(shape)) * dtype.size_in_bytes
    return TensorInfo("t", dtype, shape, Path("m.safetensors"), start, start + nbytes)


def sharding(spec: PartitionSpec, mesh_shape: tuple[int, ...], axes: tuple[str, ...]) -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()).reshape(mesh_shape), axes), spec)


def brute_force_runs(tensor: TensorInfo, key: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Byte offsets of the block's elements, merged into maximal contiguous runs."""
    itemsize = tensor.dtype.size_in_bytes
    offsets = np.arange(int(np.prod(tensor.shape)), dtype=np.int64).reshape(tensor.shape)
    picked = offsets[tuple(slice(a, b) for a, b in key)].reshape(-1) * itemsize
    runs: list[tuple[int, int]] = []
    for offset in picked.tolist():
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + itemsize)
        else:
            runs.append((offset, itemsize))
    return runs


def test_block_key_normalises_slices() -> None:
    assert block_key(None, (2, 3)) == ((0, 2), (0, 3))
    assert block_key((slice(1, 2),), (2, 3)) == ((1, 2), (0, 3))
    assert block_key((), ()) == ()
    with pytest.raises(ShardingError, match=r"steps through axis 0 \(slice\(0, 4, 2\)\)"):
        block_key((slice(0, 4, 2),), (4,))


def test_row_blocks_are_single_runs() -> None:
    tensor = info((16, 24))
    plan = plan_reads(
        tensor, sharding(PartitionSpec("x"), (8,), ("x",)).addressable_devices_indices_map((16, 24))
    )
    assert [(b.offset, b.run, b.num_runs) for b in plan.blocks] == [(i * 192, 192, 1) for i in range(8)]
    assert plan.nbytes == tensor.nbytes and plan.num_runs == 8


def test_replicated_indices_are_read_once() -> None:
    tensor = info((16, 24))
    partial = sharding(PartitionSpec("x"), (4, 2), ("x", "y")).addressable_devices_indices_map((16, 24))
    plan = plan_reads(tensor, partial)
    assert len(plan.blocks) == 4 and all(len(b.devices) == 2 for b in plan.blocks)
    assert plan.nbytes == tensor.nbytes
    full = plan_reads(
        tensor, sharding(PartitionSpec(), (8,), ("x",)).addressable_devices_indices_map((16, 24))
    )
    assert len(full.blocks) == 1 and len(full.blocks[0].devices) == 8 and full.nbytes == tensor.nbytes


def test_column_blocks_are_strided_runs() -> None:
    tensor = info((4, 16))
    plan = plan_reads(
        tensor, sharding(PartitionSpec(None, "x"), (8,), ("x",)).addressable_devices_indices_map((4, 16))
    )
    block = plan.blocks[1]
    assert (block.offset, block.run, block.counts, block.strides) == (8, 8, (4,), (64,))
    assert list(block.runs()) == [(8, 8), (72, 8), (136, 8), (200, 8)]


@pytest.mark.parametrize(
    ("shape", "spec", "mesh_shape", "axes"),
    [
        ((16, 24), PartitionSpec("x", "y"), (4, 2), ("x", "y")),
        ((8, 6, 4), PartitionSpec(None, "y", None), (4, 2), ("x", "y")),
        ((8, 6, 4), PartitionSpec("x", None, "y"), (4, 2), ("x", "y")),
        ((8, 4, 2, 6), PartitionSpec(("x", "y")), (4, 2), ("x", "y")),
        ((2, 8, 1, 4), PartitionSpec(None, "x"), (8,), ("x",)),
        ((0, 8), PartitionSpec(None, "x"), (8,), ("x",)),
        ((), PartitionSpec(), (8,), ("x",)),
    ],
)
def test_runs_match_brute_force(
    shape: tuple[int, ...], spec: PartitionSpec, mesh_shape: tuple[int, ...], axes: tuple[str, ...]
) -> None:
    for dtype in (DType.float32, DType.bfloat16, DType.uint8):
        tensor = info(shape, dtype)
        indices = sharding(spec, mesh_shape, axes).addressable_devices_indices_map(shape)
        plan = plan_reads(tensor, indices)
        covered: set[object] = set()
        for block in plan.blocks:
            assert list(block.runs()) == brute_force_runs(tensor, block.key)
            assert block.nbytes == int(np.prod(block.shape)) * dtype.size_in_bytes
            covered.update(block.devices)
        assert covered == set(indices)
        distinct = {block_key(index, shape) for index in indices.values()}
        assert len(plan.blocks) == len(distinct)


def test_adjacent_runs_merge() -> None:
    # Rows 2..3 of a (4, 3, 5) tensor with dims 1 and 2 whole: one run of 2 * 3 * 5 elements.
    tensor = info((4, 3, 5))
    (block,) = plan_reads(tensor, {"d": (slice(2, 4),)}).blocks
    assert (block.offset, block.run, block.counts) == (2 * 15 * 4, 30 * 4, ())
    # A singleton leading dimension never splits runs.
    (block,) = plan_reads(info((1, 4, 6)), {"d": (slice(None), slice(1, 3))}).blocks
    assert (block.run, block.counts) == (2 * 6 * 4, ())


def test_packed_and_quantized_tensors_are_not_planned() -> None:
    with pytest.raises(ShardingError, match=r"Tensor 't' is packed \(float4\).*cannot be planned per device"):
        plan_reads(info((4,), DType.float4_e2m1fn), {"d": None})


def test_random_layouts_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(rng.integers(1, 6)) for _ in range(ndim))
        key = tuple((a, b) for a, b in (sorted(rng.integers(0, n + 1, 2).tolist()) for n in shape))
        index = tuple(slice(a, b) for a, b in key)
        tensor = info(shape, DType.int16)
        (block,) = plan_reads(tensor, {"d": index}).blocks
        expected = brute_force_runs(tensor, key)
        assert list(block.runs()) == expected, (shape, key)
        assert block.num_runs == len(expected)
        assert list(itertools.chain.from_iterable(range(o, o + n) for o, n in block.runs())) == list(
            itertools.chain.from_iterable(range(o, o + n) for o, n in expected)
        )
