"""Dequantization of GGML blocks in `jax.numpy`, so quantized weights can stay quantized on the device.

`dequantize` expands a tensor's raw GGML blocks (Q4_0 ... Q6_K) to float inside any computation: eagerly,
under `jax.jit`, on traced and on sharded arrays. It is vectorised over all blocks (one fused XLA kernel, no
Python loop over blocks) and works on the leading axes as they are, so a row-sharded input stays row-sharded.

The block layouts are llama.cpp's ``ggml-common.h``; the arithmetic mirrors gguf-py's numpy
``dequantize_blocks`` expression for expression, in float32, and casts once at the end. The result is
bit-exact whatever XLA fuses or reassociates: a float16 scale has 11 significant bits and the integers it
multiplies have at most 8 (the super-block scale) and 6 (the quant), so every product but Q6_K's last is exact
in float32, and only the last operation of each value rounds, once. An FMA in ``d * q - m`` or another
grouping of ``d * sc * q`` rounds the same exact real number the same way, and as every value is a multiple of
2**-24 no intermediate is a float32 subnormal that flush-to-zero could change.

This module never reads files and never places arrays: it only computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._dtypes import DType, DTypeLike
from ._quantization import QuantizationEncoding
from .errors import DTypeError, QuantizationError, ShapeMismatchError

__all__ = ["dequantize"]

_OUTPUT_DTYPES = (DType.float32, DType.bfloat16, DType.float16)


def dequantize(
    blocks: Any,
    encoding: QuantizationEncoding | str,
    shape: Sequence[int],
    dtype: DTypeLike = DType.float32,
) -> jax.Array:
    """Expands GGML-quantized blocks to a float array of the logical ``shape``.

    Args:
        blocks: the tensor's raw blocks as a uint8 array (numpy or jax, traced or concrete), either in its
            byte shape (``shape`` with the last dimension counted in bytes) or flat.
        encoding: a GGML `QuantizationEncoding` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) or its name.
        shape: the logical shape, numpy order; its last dimension is a multiple of the block's element count.
        dtype: float32, bfloat16 or float16. Values are computed in float32 exactly as llama.cpp and gguf-py
            do, then cast once.

    ``encoding``, ``shape`` and ``dtype`` are static: under `jax.jit`, close over them or name them in
    ``static_argnames`` (``shape`` as a tuple).

    Example:
        >>> import jax, numpy as np
        >>> from jaxweights import DType, QuantizationEncoding
        >>> scale = np.array([0.5], np.float16).view(np.uint8)  # one Q8_0 block: a float16 scale, 32 int8s
        >>> block = np.concatenate([scale, np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
        >>> dequantize(block, "q8_0", (32,))[:4]
        Array([-8. , -7.5, -7. , -6.5], dtype=float32)
        >>> dequantize(np.tile(block, 2), QuantizationEncoding.Q8_0, (2, 32), DType.bfloat16).shape
        (2, 32)
        >>> jax.jit(lambda b: dequantize(b, "q8_0", (32,)).sum())(block)  # traced blocks, expanded in place
        Array(-8., dtype=float32)

    Raises:
        QuantizationError: ``encoding`` is not a GGML block type (GPTQ, an unknown name), or the last
            dimension of ``shape`` does not fill whole blocks.
        ShapeMismatchError: ``blocks`` does not hold the bytes ``shape`` needs.
        DTypeError: ``dtype`` is not float32, bfloat16 or float16, or ``blocks`` is not uint8.
    """
    shape = tuple(int(dim) for dim in shape)
    encoding = _ggml_encoding(encoding, shape)
    out_dtype = _output_dtype(dtype, encoding, shape)
    if not isinstance(blocks, np.ndarray | jax.Array):
        blocks = np.asarray(blocks)
    _check_blocks(blocks, encoding, shape)
    expanded: jax.Array = _expand(blocks, encoding, shape, out_dtype)
    return expanded


def _ggml_encoding(encoding: QuantizationEncoding | str, shape: tuple[int, ...]) -> QuantizationEncoding:
    ggml = ", ".join(member.name for member in _DECODERS)
    try:
        member = QuantizationEncoding.from_any(encoding)
    except QuantizationError as e:
        raise QuantizationError(
            f"cannot dequantize a tensor of shape {shape} as {encoding!r}: not a quantization encoding. "
            f"Pass one of the GGML block types: {ggml}."
        ) from e
    if member not in _DECODERS:
        raise QuantizationError(
            f"cannot dequantize {member.name} (tensor of shape {shape}): it is not a GGML block type, its "
            f"scales and zeros live in separate tensors. dequantize expands only {ggml}."
        )
    per_block = member.elements_per_block
    if not shape or shape[-1] % per_block:
        raise QuantizationError(
            f"cannot dequantize {member.name} to shape {shape}: {member.name} packs {per_block} values per "
            f"block, so the shape needs at least one dimension and a last dimension that is a multiple of "
            f"{per_block}. Pass the logical shape the tensor was quantized from."
        )
    return member


def _output_dtype(dtype: DTypeLike, encoding: QuantizationEncoding, shape: tuple[int, ...]) -> DType:
    allowed = ", ".join(d.name for d in _OUTPUT_DTYPES)
    try:
        member = DType.from_any(dtype)
    except DTypeError as e:
        raise DTypeError(
            f"cannot dequantize {encoding.name} (tensor of shape {shape}) to {dtype!r}: {e} "
            f"Pass one of: {allowed}."
        ) from e
    if member not in _OUTPUT_DTYPES:
        raise DTypeError(
            f"cannot dequantize {encoding.name} (tensor of shape {shape}) to {member.name}: the result is "
            f"floating point, computed in float32. Pass dtype as one of: {allowed}."
        )
    return member


def _check_blocks(blocks: Any, encoding: QuantizationEncoding, shape: tuple[int, ...]) -> None:
    if np.dtype(blocks.dtype) != np.uint8:
        raise DTypeError(
            f"{encoding.name} blocks for shape {shape} must be raw bytes (uint8); found {blocks.dtype}. "
            f"Pass the bytes as uint8, e.g. blocks.view(np.uint8)."
        )
    n_bytes = encoding.bytes_for_shape(shape)
    byte_shape = (*shape[:-1], shape[-1] // encoding.elements_per_block * encoding.block_size)
    found = tuple(blocks.shape)
    if found != byte_shape and found != (n_bytes,):
        raise ShapeMismatchError(
            f"{encoding.name} blocks for shape {shape} must hold {n_bytes} bytes, in the byte shape "
            f"{byte_shape} or flat ({n_bytes},); found an array of shape {found} "
            f"({int(np.prod(found))} bytes). Pass the tensor's raw blocks and the logical shape they were "
            f"quantized from."
        )


@partial(jax.jit, static_argnums=(1, 2, 3))
def _expand(
    blocks: jax.Array, encoding: QuantizationEncoding, shape: tuple[int, ...], dtype: DType
) -> jax.Array:
    # Keep the leading axes as they are (a sharded row axis stays a separate axis), blocks on the last two.
    per_row = shape[-1] // encoding.elements_per_block
    x = blocks.reshape(*shape[:-1], per_row, encoding.block_size)
    values = _DECODERS[encoding](x)
    return values.reshape(shape).astype(dtype.to_numpy())


# --- unpacking helpers: each block is the last axis of ``x`` (uint8), leading axes are any batch ---------


def _f16(x: jax.Array, offset: int) -> jax.Array:
    """The little-endian float16 at bytes ``offset, offset + 1`` of each block, as float32 of shape (..., 1)."""
    bits = x[..., offset].astype(jnp.uint16) | (x[..., offset + 1].astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)[..., None]


def _bits(packed: jax.Array, run: int, shifts: Sequence[int], mask: int) -> jax.Array:
    """Bit fields in gguf-py's order: for each run of ``run`` bytes, the field at each shift across the run.

    ``packed`` (..., k * run) -> (..., k * len(shifts) * run), uint8; one constant shift per field.
    """
    lead = packed.shape[:-1]
    grouped = packed.reshape(*lead, -1, 1, run)
    fields = [(grouped >> np.uint8(shift)) & np.uint8(mask) for shift in shifts]
    return jnp.concatenate(fields, axis=-2).reshape(*lead, -1)


def _nibbles(packed: jax.Array, run: int) -> jax.Array:
    return _bits(packed, run, (0, 4), 0x0F)


def _high_bits(packed: jax.Array, run: int) -> jax.Array:
    """One bit per value: bit j of each byte for j = 0..7, runs of ``run`` bytes."""
    return _bits(packed, run, range(8), 0x01)


def _f32(q: jax.Array) -> jax.Array:
    return q.astype(jnp.float32)


def _signed(q: jax.Array, offset: int) -> jax.Array:
    """``q - offset`` as int8, as gguf-py computes it."""
    return q.astype(jnp.int8) - np.int8(offset)


def _scale_min_k4(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, from its 12 packed bytes."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = jnp.concatenate([d & np.uint8(0x3F), (m_d & np.uint8(0x0F)) | ((d >> 2) & np.uint8(0x30))], axis=-1)
    mn = jnp.concatenate([m & np.uint8(0x3F), (m_d >> 4) | ((m >> 2) & np.uint8(0x30))], axis=-1)
    return sc, mn


# --- one decoder per type: (..., block_size) uint8 -> (..., elements_per_block) float32 --------------------


def _q4_0(x: jax.Array) -> jax.Array:
    d = _f16(x, 0)
    q = _signed(_nibbles(x[..., 2:18], 16), 8)
    return d * _f32(q)


def _q4_1(x: jax.Array) -> jax.Array:
    d, m = _f16(x, 0), _f16(x, 2)
    q = _f32(_nibbles(x[..., 4:20], 16))
    return (d * q) + m


def _q5_0(x: jax.Array) -> jax.Array:
    d = _f16(x, 0)
    qh = _high_bits(x[..., 2:6], 1)  # bit j of the little-endian uint32 is value j's fifth bit
    ql = _nibbles(x[..., 6:22], 16)
    q = _signed(ql | (qh << 4), 16)
    return d * _f32(q)


def _q5_1(x: jax.Array) -> jax.Array:
    d, m = _f16(x, 0), _f16(x, 2)
    qh = _high_bits(x[..., 4:8], 1)
    ql = _nibbles(x[..., 8:24], 16)
    q = _f32(ql | (qh << 4))
    return (d * q) + m


def _q8_0(x: jax.Array) -> jax.Array:
    d = _f16(x, 0)
    q = _f32(lax.bitcast_convert_type(x[..., 2:34], jnp.int8))
    return q * d


def _q2_k(x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    scales = x[..., 0:16]
    d, dmin = _f16(x, 80), _f16(x, 82)
    dl = (d * _f32(scales & np.uint8(0x0F)))[..., None]
    ml = (dmin * _f32(scales >> 4))[..., None]
    q = _f32(_bits(x[..., 16:80], 32, (0, 2, 4, 6), 0x03).reshape(*lead, 16, 16))
    return (dl * q - ml).reshape(*lead, 256)


def _q3_k(x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    d = _f16(x, 108)
    low = _nibbles(x[..., 96:104], 8)
    high = _bits(x[..., 104:108], 4, (0, 2, 4, 6), 0x03)
    dl = (d * _f32(_signed(low | (high << 4), 32)))[..., None]
    ql = _bits(x[..., 32:96], 32, (0, 2, 4, 6), 0x03).reshape(*lead, 16, 16)
    qh = _high_bits(x[..., 0:32], 32).reshape(*lead, 16, 16) ^ np.uint8(1)  # a set bit means no offset
    q = _f32(ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8))
    return (dl * q).reshape(*lead, 256)


def _q4_k(x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    d, dmin = _f16(x, 0), _f16(x, 2)
    sc, mn = _scale_min_k4(x[..., 4:16])
    dl = (d * _f32(sc))[..., None]
    dm = (dmin * _f32(mn))[..., None]
    q = _f32(_nibbles(x[..., 16:144], 32).reshape(*lead, 8, 32))
    return (dl * q - dm).reshape(*lead, 256)


def _q5_k(x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    d, dmin = _f16(x, 0), _f16(x, 2)
    sc, mn = _scale_min_k4(x[..., 4:16])
    dl = (d * _f32(sc))[..., None]
    dm = (dmin * _f32(mn))[..., None]
    qh = _high_bits(x[..., 16:48], 32)
    ql = _nibbles(x[..., 48:176], 32)
    q = _f32((ql | (qh << 4)).reshape(*lead, 8, 32))
    return (dl * q - dm).reshape(*lead, 256)


def _q6_k(x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    d = _f16(x, 208)
    dl = (d * _f32(lax.bitcast_convert_type(x[..., 192:208], jnp.int8)))[..., None]
    ql = _nibbles(x[..., 0:128], 64)
    qh = _bits(x[..., 128:192], 32, (0, 2, 4, 6), 0x03)
    q = _f32(_signed(ql | (qh << 4), 32).reshape(*lead, 16, 16))
    return (dl * q).reshape(*lead, 256)


_DECODERS: dict[QuantizationEncoding, Callable[[jax.Array], jax.Array]] = {
    QuantizationEncoding.Q4_0: _q4_0,
    QuantizationEncoding.Q4_1: _q4_1,
    QuantizationEncoding.Q5_0: _q5_0,
    QuantizationEncoding.Q5_1: _q5_1,
    QuantizationEncoding.Q8_0: _q8_0,
    QuantizationEncoding.Q2_K: _q2_k,
    QuantizationEncoding.Q3_K: _q3_k,
    QuantizationEncoding.Q4_K: _q4_k,
    QuantizationEncoding.Q5_K: _q5_k,
    QuantizationEncoding.Q6_K: _q6_k,
}
