"""Quantized, big-endian and strided tensors through the accessor and placement, whatever format holds them.

The catalogue is built by hand here (raw GGML blocks written to a file), so these tests pin down what
`data()`, `allocate()` and bulk loads do with a `TensorInfo` that carries an encoding or a byte order;
tests/test_gguf.py covers reading them from real GGUF files.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights import DType, QuantizationEncoding
from jaxweights._weights import Weights, _Store
from jaxweights.errors import DTypeError, QuantizationError, ShapeMismatchError, ShardingError
from jaxweights.formats import Checkpoint, TensorInfo, WeightsFormat

ROWS, COLS = 16, 256


def catalogue(path: Path, tensors: dict[str, tuple[bytes, TensorInfo]]) -> Weights:
    """A checkpoint over one file holding ``tensors``' bytes back to back, 64-byte aligned + 8."""
    infos: dict[str, TensorInfo] = {}
    with open(path, "wb") as out:
        out.write(b"\0" * 72)
        for name, (data, info) in tensors.items():
            start = out.tell()
            out.write(data)
            infos[name] = info._replace(name=name, file=path, start=start, end=start + len(data))
    checkpoint = Checkpoint(WeightsFormat.gguf, infos, [path], file_sizes={path: path.stat().st_size})
    return Weights(_Store(checkpoint))


@pytest.fixture
def q8(tmp_path: Path) -> tuple[Weights, np.ndarray, np.ndarray]:
    values = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    info = TensorInfo("", DType.uint8, (ROWS, COLS), Path(), 0, 0, QuantizationEncoding.Q8_0)
    weights = catalogue(tmp_path / "q.gguf", {"blk.0.w": (blocks.tobytes(), info)})
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(ROWS, COLS)
    return weights, blocks, expected


def test_blocks_in_their_byte_shape_as_max_gives_them(q8: tuple[Weights, np.ndarray, np.ndarray]) -> None:
    weights, blocks, _ = q8
    byte_shape = (ROWS, COLS // 32 * 34)
    data = weights.blk[0].w.data()
    assert data.shape == byte_shape and data.dtype is DType.uint8
    assert data.quantization_encoding is QuantizationEncoding.Q8_0
    np.testing.assert_array_equal(data.data, blocks.reshape(byte_shape))
    weight = weights.blk[0].w.allocate(shape=(ROWS, COLS), quantization_encoding="q8_0")  # logical units
    assert weight.shape == byte_shape and weight.quantization_encoding is QuantizationEncoding.Q8_0
    np.testing.assert_array_equal(np.asarray(weight.array), blocks.reshape(byte_shape))
    assert weights.blk[0].w.shape == (ROWS, COLS)  # the accessor's metadata is logical
    with pytest.raises(ShapeMismatchError, match=r"has shape \(16, 256\)"):
        weights.blk[0].w.allocate(shape=byte_shape)
    with pytest.raises(QuantizationError, match=r"has Q8_0.*asked for Q4_K"):
        weights.blk[0].w.allocate(quantization_encoding=QuantizationEncoding.Q4_K)
    with pytest.raises(DTypeError, match=r"Q8_0 blocks.*int32"):
        weights.blk[0].w.allocate(dtype="int32")


@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16, DType.float16])
def test_a_float_dtype_dequantizes_on_the_device(
    q8: tuple[Weights, np.ndarray, np.ndarray], dtype: DType
) -> None:
    weights, _, expected = q8
    weight = weights.blk[0].w.allocate(dtype=dtype)
    assert weight.shape == (ROWS, COLS) and weight.dtype is dtype and weight.original_dtype is DType.uint8
    np.testing.assert_array_equal(np.asarray(weight.array), expected.astype(dtype.to_numpy()))


def test_row_shards_read_only_their_blocks_then_dequantize(
    q8: tuple[Weights, np.ndarray, np.ndarray],
) -> None:
    weights, _, expected = q8
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    arrays = weights.allocate_all(mesh=mesh, rules=[(r"\.w$", P("x"))], dtype="float32")
    array = arrays["blk.0.w"]
    assert array.sharding == NamedSharding(mesh, P("x"))
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    blocks = weights.allocate_all(mesh=mesh, rules=[(r"\.w$", P("x"))])["blk.0.w"]  # no dtype: blocks
    assert blocks.dtype == np.uint8 and blocks.shape == (ROWS, COLS // 32 * 34)
    assert weights.checkpoint.bytes_copied == 2 * weights.checkpoint["blk.0.w"].nbytes  # no extra reads


def test_column_shards_must_not_split_a_block(tmp_path: Path) -> None:
    values = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)  # 2 blocks per row
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    info = TensorInfo("", DType.uint8, (4, 64), Path(), 0, 0, QuantizationEncoding.Q8_0)
    weights = catalogue(tmp_path / "q.gguf", {"w": (blocks.tobytes(), info)})
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    with pytest.raises(ShardingError, match=r"Q8_0 blocks of 32 values.*16 of them, splitting a block"):
        weights.allocate_all(mesh=mesh, rules=[("w", P(None, "x"))])
    two = Mesh(np.array(jax.devices()[:2]), ("x",))  # 32 values each: whole blocks
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(4, 64)
    array = weights.w.allocate(dtype="float32", device=NamedSharding(two, P(None, "x"))).array
    np.testing.assert_array_equal(np.asarray(array), expected)


def test_dequantize_runs_inside_jitted_code(q8: tuple[Weights, np.ndarray, np.ndarray]) -> None:
    weights, _, expected = q8
    blocks = weights.blk[0].w.allocate().array

    @jax.jit
    def matvec(b: jax.Array, x: jax.Array) -> jax.Array:
        return jw.dequantize(b, QuantizationEncoding.Q8_0, (ROWS, COLS), jnp.float32) @ x

    x = np.ones(COLS, np.float32)
    np.testing.assert_allclose(np.asarray(matvec(blocks, x)), expected @ x, rtol=1e-5, atol=1e-4)


def test_big_endian_elements_read_as_native_values(tmp_path: Path) -> None:
    values = np.random.default_rng(2).standard_normal((8, 6)).astype(np.float32)
    ids = np.arange(8, dtype=np.int32) * 1000
    weights = catalogue(
        tmp_path / "be.gguf",
        {
            "w": (
                values.astype(">f4").tobytes(),
                TensorInfo("", DType.float32, (8, 6), Path(), 0, 0, None, ">"),
            ),
            "ids": (ids.astype(">i4").tobytes(), TensorInfo("", DType.int32, (8,), Path(), 0, 0, None, ">")),
        },
    )
    np.testing.assert_array_equal(weights.w.data().data, values)
    np.testing.assert_array_equal(np.asarray(weights.w.allocate().array), values)
    np.testing.assert_array_equal(np.asarray(weights.ids.allocate().array), ids)
    half = np.asarray(weights.w.allocate(dtype="bfloat16").array)
    np.testing.assert_array_equal(half, values.astype(jnp.bfloat16))
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    rows = weights.w.allocate(device=NamedSharding(mesh, P("x"))).array
    np.testing.assert_array_equal(np.asarray(rows), values)
    cols = weights.w.allocate(device=NamedSharding(Mesh(np.array(jax.devices()[:2]), ("x",)), P(None, "x")))
    np.testing.assert_array_equal(np.asarray(cols.array), values)


def test_a_graph_function_takes_blocks_or_dequantized_weights(
    q8: tuple[Weights, np.ndarray, np.ndarray],
) -> None:
    weights, _, expected = q8
    graph = jw.Graph("q", weights=weights)
    x = np.ones(COLS, np.float32)

    @graph.function
    def on_blocks(v: jax.Array) -> jax.Array:  # stays quantized on the device, expanded in the program
        blocks = weights.blk[0].w.allocate()
        return jw.dequantize(blocks.array, "Q8_0", (ROWS, COLS)) @ v

    np.testing.assert_allclose(np.asarray(on_blocks(x)), expected @ x, rtol=1e-5, atol=1e-4)
    assert graph.declared["blk.0.w"].shape == (ROWS, COLS // 32 * 34)
    other = jw.Graph("f", weights=weights)

    @other.function
    def floats(v: jax.Array) -> jax.Array:
        return weights.blk[0].w.allocate(dtype="float32").array @ v

    np.testing.assert_allclose(np.asarray(floats(x)), expected @ x, rtol=1e-5, atol=1e-4)
    assert other.declared["blk.0.w"].shape == (ROWS, COLS) and other.declared["blk.0.w"].dtype == np.float32


def test_strided_views_into_a_storage_are_gathered(tmp_path: Path) -> None:
    storage = np.arange(48, dtype=np.float32).reshape(6, 8)
    transposed = TensorInfo("", DType.float32, (8, 6), Path(), 0, 0, strides=(1, 8))
    weights = catalogue(tmp_path / "s.bin", {"t": (storage.tobytes(), transposed)})
    np.testing.assert_array_equal(weights.t.data().data, storage.T)
    np.testing.assert_array_equal(np.asarray(weights.t.allocate().array), storage.T)
    np.testing.assert_array_equal(
        np.asarray(weights.t.allocate(dtype="bfloat16").array), storage.T.astype(jnp.bfloat16)
    )
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    rows = weights.t.allocate(device=NamedSharding(mesh, P("x"))).array
    np.testing.assert_array_equal(np.asarray(rows), storage.T)
    assert weights.checkpoint["t"].contiguous is False
    plain = TensorInfo("", DType.float32, (6, 8), Path(), 0, 0, strides=(8, 1))
    assert (
        plain.contiguous and TensorInfo("", DType.float32, (1, 8), Path(), 0, 0, strides=(99, 1)).contiguous
    )
