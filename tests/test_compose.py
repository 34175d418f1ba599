"""Composite tensors (jaxweights/_compose.py): stacked layers, concat, windows, placed reading only shard rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxweights as jw
from jaxweights import DType
from jaxweights._compose import (
    Composite,
    as_composite,
    concat,
    layer_groups,
    place_composite,
    split_bounds,
    stack,
    stack_layers,
    window,
)
from jaxweights.errors import ArgumentError, DTypeError, ShapeMismatchError, StructureMismatchError
from jaxweights.formats import Checkpoint, open_checkpoint

Reads = list[tuple[str, str, Any]]


def mesh_sharding(
    spec: PartitionSpec, shape: tuple[int, ...] = (8,), axes: tuple[str, ...] = ("x",)
) -> NamedSharding:
    devices = np.array(jax.devices()).reshape(shape)
    return NamedSharding(Mesh(devices, axes), spec)


ONE = SingleDeviceSharding(jax.devices()[0])


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    """Records every copy out of a file: ("into", tensor, (offset, bytes)) or ("block", tensor, key)."""
    log: Reads = []
    into, block = Checkpoint.copy_into, Checkpoint.copy_block

    def spy_into(self: Checkpoint, info: jw.TensorInfo, out: np.ndarray, offset: int = 0) -> None:
        log.append(("into", info.name, (offset, out.nbytes)))
        into(self, info, out, offset)

    def spy_block(
        self: Checkpoint, info: jw.TensorInfo, out: np.ndarray, key: tuple[tuple[int, int], ...], **kw: bool
    ) -> None:
        log.append(("block", info.name, key))
        block(self, info, out, key, **kw)

    monkeypatch.setattr(Checkpoint, "copy_into", spy_into)
    monkeypatch.setattr(Checkpoint, "copy_block", spy_block)
    yield log


def layers(
    count: int = 3, shape: tuple[int, ...] = (8, 16), dtype: type = np.float32
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(count)
    out: dict[str, np.ndarray] = {}
    for i in range(count):
        out[f"model.layers.{i}.w"] = (rng.standard_normal(shape) * 100).astype(dtype)
        out[f"model.layers.{i}.b"] = (rng.standard_normal(shape[-1:]) * 100).astype(dtype)
    return out


def stacked(tensors: dict[str, np.ndarray], rest: str, count: int) -> np.ndarray:
    return np.stack([tensors[f"model.layers.{i}.{rest}"] for i in range(count)])


def placed(
    path: Path,
    composite_of: Callable[[Checkpoint], Composite],
    sharding: jax.sharding.Sharding,
    dtype: DType = DType.float32,
    **options: bool,
) -> tuple[np.ndarray, jax.Array, int]:
    with open_checkpoint(path, **options) as checkpoint:
        composite = composite_of(checkpoint)
        before = checkpoint.bytes_copied
        array = place_composite(checkpoint, composite, dtype, sharding)
        return np.asarray(array), array, checkpoint.bytes_copied - before


# -- stacking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "preadv"])
def test_stack_layers_on_one_device(write_reference: Callable[..., Path], mmap: bool) -> None:
    tensors = layers()
    path = write_reference(tensors)
    with open_checkpoint(path, mmap=mmap) as checkpoint:
        composites = stack_layers(checkpoint, "model.layers")
        assert list(composites) == ["model.layers.b", "model.layers.w"]
        for name, composite in composites.items():
            before = checkpoint.bytes_copied
            array = place_composite(checkpoint, composite, DType.float32, ONE)
            expected = stacked(tensors, name.rsplit(".", 1)[1], 3)
            np.testing.assert_array_equal(np.asarray(array), expected)
            assert array.sharding == ONE and checkpoint.bytes_copied - before == expected.nbytes


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "preadv"])
def test_each_device_reads_only_its_rows_of_every_layer(
    write_reference: Callable[..., Path], reads: Reads, mmap: bool
) -> None:
    tensors = layers()
    path = write_reference(tensors)
    sharding = mesh_sharding(PartitionSpec(None, "x"))
    values, array, copied = placed(
        path, lambda c: stack_layers(c, "model.layers")["model.layers.w"], sharding, mmap=mmap
    )
    expected = stacked(tensors, "w", 3)
    np.testing.assert_array_equal(values, expected)
    assert array.sharding == sharding and copied == expected.nbytes  # every distinct block once, nothing more
    row = 16 * 4
    # each read is one layer's run of one device's row (or a chunk of it): never a whole layer
    assert reads and all(kind == "into" for kind, _, _ in reads)
    assert sorted(part for _, _, part in reads) == sorted((r * row, row) for r in range(8) for _ in range(3))
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_layer_axis_sharded_reads_whole_layers(write_reference: Callable[..., Path], reads: Reads) -> None:
    tensors = layers(8)
    path = write_reference(tensors)
    sharding = mesh_sharding(PartitionSpec("x"))
    values, array, copied = placed(
        path, lambda c: stack_layers(c, "model.layers")["model.layers.w"], sharding
    )
    expected = stacked(tensors, "w", 8)
    np.testing.assert_array_equal(values, expected)
    assert copied == expected.nbytes and sorted(reads) == sorted(
        ("into", f"model.layers.{i}.w", (0, 8 * 16 * 4)) for i in range(8)
    )
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "preadv"])
def test_two_dimensional_mesh_gathers_strided_blocks(
    write_reference: Callable[..., Path], reads: Reads, mmap: bool
) -> None:
    tensors = layers(4)
    path = write_reference(tensors)
    sharding = mesh_sharding(PartitionSpec("a", None, "b"), (2, 4), ("a", "b"))
    values, array, copied = placed(
        path, lambda c: stack_layers(c, "model.layers")["model.layers.w"], sharding, mmap=mmap
    )
    expected = stacked(tensors, "w", 4)
    np.testing.assert_array_equal(values, expected)
    assert copied == expected.nbytes
    # every copy names only the columns of one device block
    assert reads and all(kind == "block" for kind, _, _ in reads)
    for _, _, key in reads:
        assert isinstance(key, tuple) and key[1][1] - key[1][0] == 4
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_replicated_reads_once_and_sharded_reads_the_same_total(write_reference: Callable[..., Path]) -> None:
    tensors = layers()
    path = write_reference(tensors)

    def composite_of(c: Checkpoint) -> Composite:
        return stack_layers(c, "model.layers")["model.layers.w"]

    replicated = placed(path, composite_of, mesh_sharding(PartitionSpec()))
    sharded = placed(path, composite_of, mesh_sharding(PartitionSpec(None, None, "x")))
    assert replicated[2] == sharded[2] == stacked(tensors, "w", 3).nbytes
    np.testing.assert_array_equal(replicated[0], sharded[0])


# -- concat, window, split --------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_matches_numpy(write_reference: Callable[..., Path], axis: int) -> None:
    rng = np.random.default_rng(1)
    parts = {n: rng.standard_normal((8, 16), dtype=np.float32) for n in "qkv"}
    path = write_reference(parts)
    for sharding in (ONE, mesh_sharding(PartitionSpec("x")), mesh_sharding(PartitionSpec(None, "x"))):
        values, _, copied = placed(path, lambda c: concat("qkv", [c[n] for n in "qkv"], axis), sharding)
        expected = np.concatenate([parts[n] for n in "qkv"], axis=axis)
        np.testing.assert_array_equal(values, expected)
        assert copied == expected.nbytes


def part_of(name: str, start: int, stop: int, checkpoint: Checkpoint) -> Composite:
    return window(name, checkpoint["c_attn"], -1, start, stop)


def test_window_splits_a_fused_tensor(write_reference: Callable[..., Path], reads: Reads) -> None:
    c_attn = np.arange(4 * 24, dtype=np.float32).reshape(4, 24)
    path = write_reference({"c_attn": c_attn})
    bounds = split_bounds(24, 3)
    assert bounds == [(0, 8), (8, 16), (16, 24)]
    for part, (start, stop) in enumerate(bounds):
        reads.clear()
        values, _, copied = placed(path, partial(part_of, f"p{part}", start, stop), ONE)
        np.testing.assert_array_equal(values, c_attn[:, start:stop])
        assert copied == values.nbytes and [key for _, _, key in reads] == [((0, 4), (start, stop))]
    rows, _, copied = placed(path, lambda c: window("top", c["c_attn"], 0, 1, 3), ONE)
    np.testing.assert_array_equal(rows, c_attn[1:3])
    assert copied == rows.nbytes


def test_window_of_a_concat_and_of_a_stack() -> None:
    info = jw.TensorInfo("a", DType.float32, (2, 3), Path("m"), 0, 24)
    other = info._replace(name="b")
    joined = concat("ab", [info, other], axis=1)
    right = window("r", joined, 1, 2, 5)
    assert right.info.shape == (2, 3)
    assert [(p.source.name, p.region, p.origin) for p in right.pieces] == [
        ("a", ((0, 2), (0, 1)), (0, 2)),
        ("b", ((0, 2), (1, 3)), (0, 0)),
    ]
    layer = window("l1", stack("s", [info, other]), 0, 1, 2)
    assert [p.source.name for p in layer.pieces] == ["b"] and layer.info.shape == (1, 2, 3)
    assert as_composite(joined) is joined and joined.sources == (info, other)


def test_stack_of_fused_qkv(write_reference: Callable[..., Path]) -> None:
    rng = np.random.default_rng(2)
    tensors = {f"h.{i}.{n}": rng.standard_normal((8, 16), dtype=np.float32) for i in range(3) for n in "qkv"}
    path = write_reference(tensors)

    def fused(c: Checkpoint) -> Composite:
        count, groups = layer_groups(c, "h")
        return stack("h.qkv", [concat(f"h.{i}.qkv", [groups[n][i] for n in "qkv"], -1) for i in range(count)])

    expected = np.stack([np.concatenate([tensors[f"h.{i}.{n}"] for n in "qkv"], -1) for i in range(3)])
    for sharding in (
        ONE,
        mesh_sharding(PartitionSpec(None, "x")),
        mesh_sharding(PartitionSpec(None, None, "x")),
    ):
        values, array, copied = placed(path, fused, sharding)
        np.testing.assert_array_equal(values, expected)
        assert copied == expected.nbytes and array.shape == (3, 8, 48)


# -- dtypes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, PartitionSpec(None, "x"), PartitionSpec(None, None, "x")])
def test_cast_in_the_same_pass(write_reference: Callable[..., Path], spec: PartitionSpec | None) -> None:
    tensors = layers()
    path = write_reference(tensors)
    sharding = ONE if spec is None else mesh_sharding(spec)
    values, array, copied = placed(
        path, lambda c: stack_layers(c, "model.layers")["model.layers.w"], sharding, DType.bfloat16
    )
    expected = stacked(tensors, "w", 3)
    assert array.dtype == ml_dtypes.bfloat16 and copied == expected.nbytes
    np.testing.assert_array_equal(values, expected.astype(ml_dtypes.bfloat16))


def test_integer_narrowing_is_checked(write_reference: Callable[..., Path]) -> None:
    small = {f"ids.{i}": np.arange(4, dtype=np.int64) + i for i in range(2)}
    path = write_reference(small)
    values, array, _ = placed(path, lambda c: stack_layers(c, "ids")["ids"], ONE, DType.int32)
    assert array.dtype == np.int32 and values.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
    big = write_reference({"ids.0": np.array([1, 2**40], np.int64)}, name="big.safetensors")
    with pytest.raises(DTypeError, match=r"'ids' .* holds int64 value 1099511627776, which int32 cannot"):
        placed(big, lambda c: stack_layers(c, "ids")["ids"], ONE, DType.int32)


# -- quantized --------------------------------------------------------------------------------------


def test_gguf_quantized_stack_dequantizes_on_the_device(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    encoding = jw.QuantizationEncoding.Q8_0
    rng = np.random.default_rng(3)
    rows, cols = 8, 2 * encoding.elements_per_block
    raw = {}
    for i in range(3):
        blocks = rng.integers(0, 256, (rows, 2 * encoding.block_size), dtype=np.uint8)
        blocks.reshape(rows, 2, -1)[..., 1] = 0  # keep the float16 scales finite
        blocks.reshape(rows, 2, -1)[..., 0] = 20
        raw[f"blk.{i}.w"] = blocks
    path = write_gguf(
        tmp_path / "q.gguf", {name: (blocks, gguf.GGMLQuantizationType.Q8_0) for name, blocks in raw.items()}
    )
    with open_checkpoint(path) as checkpoint:
        composite = stack_layers(checkpoint, "blk")["blk.w"]
        assert composite.info.shape == (3, rows, cols) and composite.info.encoding is encoding
        for sharding in (ONE, mesh_sharding(PartitionSpec(None, "x"))):
            before = checkpoint.bytes_copied
            blocks_array = place_composite(checkpoint, composite, DType.uint8, sharding)
            np.testing.assert_array_equal(np.asarray(blocks_array), np.stack(list(raw.values())))
            assert checkpoint.bytes_copied - before == sum(b.nbytes for b in raw.values())
            values = np.asarray(place_composite(checkpoint, composite, DType.float32, sharding))
            for i in range(3):
                expected = np.asarray(jw.dequantize(raw[f"blk.{i}.w"], encoding, (rows, cols)))
                np.testing.assert_allclose(values[i], expected, rtol=0, atol=0)
        with pytest.raises(DTypeError, match=r"'blk.w' holds Q8_0 blocks"):
            place_composite(checkpoint, composite, DType.int8, ONE)
        with pytest.raises(ShapeMismatchError, match=r"multiples of it"):
            window("half", composite, -1, 0, 16)


def write_gguf(path: Path, tensors: dict[str, Any], big_endian: bool = False) -> Path:
    pytest.importorskip("gguf")
    from tests.test_gguf import BIG, LITTLE, write

    return write(path, tensors, endian=BIG if big_endian else LITTLE)


def test_swapped_sources_are_read_one_at_a_time(tmp_path: Path) -> None:
    tensors = {f"blk.{i}.w": np.arange(32, dtype=np.float32).reshape(4, 8) * (i + 1) for i in range(3)}
    path = write_gguf(tmp_path / "big.gguf", dict(tensors), big_endian=True)
    expected = np.stack(list(tensors.values()))
    with open_checkpoint(path) as checkpoint:
        assert all(source.swapped for source in stack_layers(checkpoint, "blk")["blk.w"].sources)
    for sharding in (ONE, mesh_sharding(PartitionSpec(None, None, "x"))):
        values, _, copied = placed(path, lambda c: stack_layers(c, "blk")["blk.w"], sharding)
        np.testing.assert_array_equal(values, expected)
        assert copied == expected.nbytes


# -- bad input --------------------------------------------------------------------------------------


def info(name: str, shape: tuple[int, ...] = (2, 3), dtype: DType = DType.float32) -> jw.TensorInfo:
    return jw.TensorInfo(name, dtype, shape, Path("m"), 0, 4 * int(np.prod(shape)))


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["h.0.w", "h.1.w", "h.3.w"], r"h has layers 0, 1, 3: layer 2 is missing"),
        (["h.0.w", "h.x.w"], r"tensor 'h.x.w' sits under child 'x', which is not a layer index"),
        (["h.0.w", "h.01.w"], r"child '01', which is not a layer index"),
        (["h.0.w", "h.0.b", "h.1.w"], r"layer 1 lacks 'h.1.b', which layer 0 has"),
        (["h.0.w", "h.1.w", "h.1.extra"], r"layer 1 has 'h.1.extra', which layer 0 lacks"),
        (["hidden.0.w"], r"stack prefix 'h' matches no tensor; closest: 'hidden"),
    ],
)
def test_layer_group_errors(names: list[str], match: str) -> None:
    with pytest.raises(StructureMismatchError, match=match):
        layer_groups({n: info(n) for n in names}, "h")


def test_a_tensor_directly_at_a_layer_index_is_stacked() -> None:
    count, groups = layer_groups({f"e.{i}": info(f"e.{i}") for i in range(2)}, "e")
    assert count == 2 and list(groups) == [""]
    assert list(stack_layers({f"e.{i}": info(f"e.{i}") for i in range(2)}, "e")) == ["e"]


def test_stack_refuses_differing_tensors() -> None:
    with pytest.raises(
        ShapeMismatchError, match=r"'h.1.w' has shape \(2, 4\) but 'h.0.w' has shape \(2, 3\)"
    ):
        stack_layers({"h.0.w": info("h.0.w"), "h.1.w": info("h.1.w", (2, 4))}, "h")
    with pytest.raises(DTypeError, match=r"'h.1.w' is float16 but 'h.0.w' is float32"):
        stack_layers({"h.0.w": info("h.0.w"), "h.1.w": info("h.1.w", dtype=DType.float16)}, "h")
    with pytest.raises(ArgumentError, match=r"no tensors given"):
        stack("s", [])


def test_concat_and_split_refuse_bad_shapes() -> None:
    with pytest.raises(
        ShapeMismatchError, match=r"'b' has shape \(3, 3\) but 'a' has shape \(2, 3\).*except axis 1"
    ):
        concat("ab", [info("a"), info("b", (3, 3))], axis=1)
    with pytest.raises(ShapeMismatchError, match=r"axis 2 is out of range"):
        concat("ab", [info("a"), info("b")], axis=2)
    with pytest.raises(ShapeMismatchError, match=r"cannot split a dimension of 10 into 3 equal parts"):
        split_bounds(10, 3)
    with pytest.raises(ShapeMismatchError, match=r"sum to the dimension's 10 \(they sum to 9\)"):
        split_bounds(10, [4, 5])
    with pytest.raises(ShapeMismatchError, match=r"bounds \[2, 5\) on axis 1"):
        window("w", info("a"), 1, 2, 5)


# -- the accelerator path, forced onto CPU devices --------------------------------------------------


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes `place_composite` take its accelerator path on CPU devices; records each run's host bytes."""
    import jaxweights._compose as compose

    monkeypatch.setattr(compose, "is_cpu_only", lambda sharding: False)
    sizes: list[int] = []
    fill = compose._fill_blocks

    def spy(*args: Any) -> dict[Any, np.ndarray]:
        buffers = fill(*args)
        sizes.append(sum(buffer.nbytes for buffer in buffers.values()))
        return buffers

    monkeypatch.setattr(compose, "_fill_blocks", spy)
    return sizes


@pytest.mark.parametrize(
    "spec", [None, PartitionSpec(None, "x"), PartitionSpec(None, None, "x"), PartitionSpec()], ids=str
)
def test_accelerator_targets_move_in_runs_under_the_host_budget(
    write_reference: Callable[..., Path], accelerator: list[int], spec: PartitionSpec | None
) -> None:
    tensors = layers(count=6)
    sharding = ONE if spec is None else mesh_sharding(spec)
    layer_bytes = tensors["model.layers.0.w"].nbytes
    with open_checkpoint(write_reference(tensors)) as checkpoint:
        composite = stack_layers(checkpoint, "model.layers")["model.layers.w"]
        before = checkpoint.bytes_copied
        array = place_composite(
            checkpoint, composite, DType.bfloat16, sharding, max_host_bytes=2 * layer_bytes
        )
        copied = checkpoint.bytes_copied - before
    expected = stacked(tensors, "w", 6)
    assert array.sharding == sharding and array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(array), expected.astype(ml_dtypes.bfloat16)
    )  # converted on device
    assert max(accelerator) <= 2 * layer_bytes and len(accelerator) >= 3
    assert copied == expected.nbytes  # each distinct block once, whatever the runs


def test_accelerator_path_checks_narrowing_and_dequantizes(
    write_reference: Callable[..., Path], tmp_path: Path, accelerator: list[int]
) -> None:
    big = write_reference({"ids.0": np.array([1, 2**40], np.int64)}, name="big.safetensors")
    with pytest.raises(DTypeError, match=r"holds int64 value 1099511627776"):
        placed(big, lambda c: stack_layers(c, "ids")["ids"], ONE, DType.int32)
    gguf = pytest.importorskip("gguf")
    values = np.random.default_rng(4).standard_normal((8, 64), dtype=np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    raw = {f"blk.{i}.w": (gguf.quants.quantize(values * (i + 1), q8), q8) for i in range(3)}
    path = write_gguf(tmp_path / "q.gguf", raw)
    with open_checkpoint(path) as checkpoint:
        composite = stack_layers(checkpoint, "blk")["blk.w"]
        out = place_composite(checkpoint, composite, DType.float32, mesh_sharding(PartitionSpec(None, "x")))
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(out[i]), gguf.quants.dequantize(raw[f"blk.{i}.w"][0], q8), rtol=1e-6, atol=1e-6
        )
