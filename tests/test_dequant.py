"""dequantize: bit-exact against gguf-py's numpy reference, under jit, traced and sharded."""

from __future__ import annotations

from functools import partial
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxweights import DType, QuantizationEncoding
from jaxweights._dequant import dequantize
from jaxweights.errors import DTypeError, QuantizationError, ShapeMismatchError

# Byte offsets of the float16 scale fields (d, dmin) in each block, from ggml-common.h's block structs.
SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
TYPES = sorted(SCALE_OFFSETS)


def random_blocks(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes in ``shape``'s byte shape, with finite float16 scales from 2**-20 (subnormal in
    float16) to 2**4, either sign."""
    encoding = QuantizationEncoding[name]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // encoding.elements_per_block
    blocks = rng.integers(0, 256, (n_blocks, encoding.block_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scale = rng.choice([-1.0, 1.0], n_blocks) * 2.0 ** rng.uniform(-20, 4, n_blocks)
        blocks[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    row_bytes = shape[-1] // encoding.elements_per_block * encoding.block_size
    return blocks.reshape(*shape[:-1], row_bytes)


def reference(blocks: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]))


def assert_bits_equal(actual: Any, expected: np.ndarray) -> None:
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = np.dtype(f"u{expected.dtype.itemsize}")
    np.testing.assert_array_equal(actual.view(bits), expected.view(bits))


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", TYPES)
def test_bit_exact_against_gguf(name: str, jitted: bool) -> None:
    shape = (4, 512)
    blocks = random_blocks(name, shape)
    expected = reference(blocks, name)
    assert expected.shape == shape
    if jitted:
        actual = jax.jit(partial(dequantize, encoding=name, shape=shape))(blocks)
    else:
        with jax.disable_jit():  # op by op: nothing fused
            actual = dequantize(blocks, name, shape)
    assert_bits_equal(actual, expected)


@pytest.mark.parametrize("dtype", [DType.bfloat16, DType.float16])
@pytest.mark.parametrize("name", TYPES)
def test_half_outputs_are_the_cast_of_float32(name: str, dtype: DType) -> None:
    shape = (4, 512)
    blocks = random_blocks(name, shape, seed=1)
    expected = reference(blocks, name).astype(dtype.to_numpy())
    assert_bits_equal(dequantize(blocks, name, shape, dtype), expected)


def test_dtype_spellings() -> None:
    blocks = random_blocks("Q8_0", (2, 64))
    assert dequantize(blocks, "q8_0", (2, 64), "bf16").dtype == jnp.bfloat16
    assert dequantize(blocks, "q8_0", (2, 64), np.float16).dtype == jnp.float16
    assert dequantize(blocks, "q8_0", (2, 64), ml_dtypes.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q3_K", "Q6_K"])
@pytest.mark.parametrize("shape", [(512,), (2, 3, 256), (2, 1, 3, 512)], ids=["1d", "3d", "4d"])
def test_any_rank_and_flat_input(name: str, shape: tuple[int, ...]) -> None:
    blocks = random_blocks(name, shape, seed=2)
    expected = reference(blocks, name)
    assert_bits_equal(dequantize(blocks, name, shape), expected)
    assert_bits_equal(dequantize(blocks.reshape(-1), QuantizationEncoding[name], list(shape)), expected)
    assert_bits_equal(dequantize(jnp.asarray(blocks), name, shape), expected)


def test_traced_input_inside_jit() -> None:
    shape = (8, 256)
    blocks = random_blocks("Q4_K", shape, seed=3)
    weight = reference(blocks, "Q4_K")
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)

    @jax.jit
    def project(quantized: jax.Array, x: jax.Array) -> jax.Array:
        return x @ dequantize(quantized, "Q4_K", shape).T

    assert_bits_equal(project(blocks, x), np.asarray(jax.jit(lambda w, x: x @ w.T)(weight, x)))
    static = jax.jit(dequantize, static_argnames=("encoding", "shape", "dtype"))
    assert_bits_equal(static(blocks, encoding="Q4_K", shape=shape), weight)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_row_sharded_input_stays_row_sharded(name: str) -> None:
    mesh = jax.make_mesh((8,), ("rows",))
    rows = NamedSharding(mesh, P("rows", None))
    shape = (16, 512)
    blocks = random_blocks(name, shape, seed=5)
    sharded = jax.device_put(blocks, rows)
    expand = jax.jit(partial(dequantize, encoding=name, shape=shape), out_shardings=rows)
    program = expand.lower(sharded).compile().as_text()
    assert program is not None and "all-gather" not in program  # each device expands its own rows
    out = expand(sharded)
    assert out.sharding.is_equivalent_to(rows, out.ndim)
    assert_bits_equal(out, reference(blocks, name))
    eager = dequantize(sharded, name, shape)
    assert eager.sharding.is_equivalent_to(rows, eager.ndim)


def test_expert_axis_sharded() -> None:
    mesh = jax.make_mesh((8,), ("experts",))
    experts = NamedSharding(mesh, P("experts", None, None))
    shape = (8, 2, 256)
    blocks = random_blocks("Q5_K", shape, seed=6)
    out = jax.jit(partial(dequantize, encoding="Q5_K", shape=shape), out_shardings=experts)(
        jax.device_put(blocks, experts)
    )
    assert out.sharding.is_equivalent_to(experts, out.ndim)
    assert_bits_equal(out, reference(blocks, "Q5_K"))


def test_wrong_byte_count() -> None:
    blocks = random_blocks("Q4_K", (4, 512))
    with pytest.raises(
        ShapeMismatchError,
        match=r"Q4_K blocks for shape \(4, 512\) must hold 1152 bytes.*\(4, 288\).*found an array of shape \(4, 144\)",
    ):
        dequantize(blocks[:, :144], "Q4_K", (4, 512))
    with pytest.raises(ShapeMismatchError, match=r"flat \(1152,\); found an array of shape \(2, 576\)"):
        dequantize(blocks.reshape(2, 576), "Q4_K", (4, 512))


def test_last_dim_not_whole_blocks() -> None:
    with pytest.raises(QuantizationError, match=r"Q4_K to shape \(4, 100\).*multiple of 256.*logical shape"):
        dequantize(np.zeros(1, np.uint8), "Q4_K", (4, 100))
    with pytest.raises(QuantizationError, match=r"Q8_0 to shape \(\)"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", ())


def test_not_a_ggml_encoding() -> None:
    with pytest.raises(QuantizationError, match=r"GPTQ \(tensor of shape \(4, 8\)\): it is not a GGML.*Q4_0"):
        dequantize(np.zeros(16, np.uint8), QuantizationEncoding.GPTQ, (4, 8))
    with pytest.raises(
        QuantizationError, match=r"shape \(4, 512\) as 'Q4_X'.*Pass one of the GGML block types"
    ):
        dequantize(np.zeros(1152, np.uint8), "Q4_X", (4, 512))


def test_output_dtype_must_be_float() -> None:
    blocks = np.zeros((4, 68), np.uint8)
    with pytest.raises(
        DTypeError, match=r"Q8_0 \(tensor of shape \(4, 64\)\) to int8.*float32, bfloat16, float16"
    ):
        dequantize(blocks, "Q8_0", (4, 64), DType.int8)
    with pytest.raises(DTypeError, match=r"to float64"):
        dequantize(blocks, "Q8_0", (4, 64), np.float64)
    with pytest.raises(DTypeError, match=r"to 'floaty'.*Pass one of"):
        dequantize(blocks, "Q8_0", (4, 64), "floaty")


def test_blocks_must_be_bytes() -> None:
    with pytest.raises(
        DTypeError, match=r"Q8_0 blocks for shape \(4, 64\) must be raw bytes \(uint8\); found int8"
    ):
        dequantize(np.zeros((4, 68), np.int8), "Q8_0", (4, 64))
