from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

import jaxweights as jw
from jaxweights import DType
from jaxweights._dtypes import DTYPE_TO_SAFETENSORS, pack_nibbles, unpack_nibbles
from jaxweights.errors import DTypeError

MAX_NAMES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "bfloat16",
    "float32", "float64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu", "float4_e2m1fn",
]  # fmt: skip

TORCH = {
    DType.bool: torch.bool,
    DType.int8: torch.int8,
    DType.int16: torch.int16,
    DType.int32: torch.int32,
    DType.int64: torch.int64,
    DType.uint8: torch.uint8,
    DType.uint16: torch.uint16,
    DType.uint32: torch.uint32,
    DType.uint64: torch.uint64,
    DType.float16: torch.float16,
    DType.bfloat16: torch.bfloat16,
    DType.float32: torch.float32,
    DType.float64: torch.float64,
    DType.float8_e4m3fn: torch.float8_e4m3fn,
    DType.float8_e4m3fnuz: torch.float8_e4m3fnuz,
    DType.float8_e5m2: torch.float8_e5m2,
    DType.float8_e5m2fnuz: torch.float8_e5m2fnuz,
    DType.float8_e8m0fnu: torch.float8_e8m0fnu,
    DType.float4_e2m1fn: torch.float4_e2m1fn_x2,
    DType.complex64: torch.complex64,
}


def test_max_member_names_exist() -> None:
    assert [m for m in MAX_NAMES if m not in DType.__members__] == []


@pytest.mark.parametrize("dtype", list(DType))
def test_numpy_and_safetensors_round_trip(dtype: DType) -> None:
    assert DType.from_any(dtype.to_numpy()) is dtype
    assert DType.from_any(dtype.safetensors_code) is dtype
    assert DType.from_any(dtype.name) is dtype
    assert DType.from_any(dtype) is dtype
    assert DTYPE_TO_SAFETENSORS[dtype] == dtype.safetensors_code


def test_from_any_accepts_jnp_ml_dtypes_and_numpy_names() -> None:
    assert DType.from_any(jnp.bfloat16) is DType.bfloat16
    assert DType.from_any(ml_dtypes.float8_e4m3fn) is DType.float8_e4m3fn
    assert DType.from_any(np.float16) is DType.float16
    assert DType.from_any(jnp.dtype("int8")) is DType.int8
    assert DType.from_any("f4") is DType.float32  # numpy's name
    assert DType.from_any("F4") is DType.float4_e2m1fn  # safetensors' code wins for upper case
    assert DType.from_any(bool) is DType.bool
    assert DType.from_numpy(np.dtype("uint16")) is DType.uint16


@pytest.mark.parametrize("value", [object, np.dtype("U3"), 3, np.dtype("complex128"), "float8_e4m3"])
def test_from_any_rejects_unknown(value: object) -> None:
    with pytest.raises(
        DTypeError, match=r"is not a supported element type\.( Did you mean '\w+'\?)? Use one of: bool, int8"
    ):
        DType.from_any(value)  # type: ignore[arg-type]


ALIASES = {
    DType.bfloat16: ["bf16", "BF16", "Bf16", "bfloat16", "BFloat16"],
    DType.float16: ["fp16", "FP16", "f16", "F16", "half", "Half", "float16", "f2", "e"],
    DType.float32: ["fp32", "f32", "F32", "single", "Float32", "FLOAT32", "f4", "<f4", "f"],
    DType.float64: ["fp64", "f64", "double", "Double", "f8", "d"],
    DType.float8_e4m3fn: ["fp8_e4m3", "FP8_E4M3", "f8e4m3", "e4m3", "E4M3", "e4m3fn", "F8_E4M3", "f8_e4m3"],
    DType.float8_e4m3fnuz: ["e4m3fnuz", "fp8_e4m3fnuz", "F8_E4M3FNUZ"],
    DType.float8_e5m2: ["fp8_e5m2", "e5m2", "E5M2", "f8e5m2", "F8_E5M2"],
    DType.float8_e5m2fnuz: ["e5m2fnuz", "F8_E5M2FNUZ"],
    DType.float8_e8m0fnu: ["e8m0", "fp8_e8m0", "F8_E8M0"],
    DType.float4_e2m1fn: ["fp4", "FP4", "fp4_e2m1", "float4", "Float4", "e2m1", "F4"],
    DType.int8: ["i8", "I8", "int8", "INT8", "i1", "b"],
    DType.int16: ["i16", "I16", "i2", "short"],
    DType.int32: ["i32", "Int32", "i4", "intc"],
    DType.int64: ["i64", "int64", "int_"],
    DType.uint8: ["u8", "U8", "uint8", "UInt8", "u1", "B"],
    DType.uint16: ["u16", "u2"],
    DType.uint32: ["u32", "u4"],
    DType.uint64: ["u64", "UINT64"],
    DType.bool: ["bool", "BOOL", "bool_", "Bool", "?", "b1"],
    DType.complex64: ["c64", "C64", "complex64", "Complex64", "c8"],
}


@pytest.mark.parametrize(
    ("spelling", "expected"), [(s, dtype) for dtype, spellings in ALIASES.items() for s in spellings]
)
def test_from_any_accepts_aliases_in_any_case(spelling: str, expected: DType) -> None:
    assert DType.from_any(spelling) is expected


def test_lower_case_safetensors_codes_are_aliases_except_numpys_f4() -> None:
    for dtype, code in DTYPE_TO_SAFETENSORS.items():
        assert DType.from_any(code.lower()) is (DType.float32 if code == "F4" else dtype), code


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("bfloat", "bfloat16"),
        ("flaot32", "float32"),
        ("Bfloat_16", "bfloat16"),
        ("fp_16", "float16"),
        ("unit8", "uint8"),
    ],
)
def test_unknown_strings_get_a_did_you_mean(typo: str, suggestion: str) -> None:
    with pytest.raises(
        DTypeError, match=rf"^'{typo}' is not a supported element type\. Did you mean '{suggestion}'\?"
    ):
        DType.from_any(typo)


@pytest.mark.parametrize(
    ("value", "suggestion"),
    [
        ("float", r"Pass 'float32' \(or 'float64'"),
        ("Float", r"Pass 'float32' \(or 'float64'"),
        (float, r"Pass 'float32' \(or 'float64'"),
        ("int", r"Pass 'int32' \(or 'int64'"),
        (int, r"Pass 'int32' \(or 'int64'"),
        ("uint", r"Pass 'uint32' \(or 'uint64'"),
        ("complex", r"Pass 'complex64'"),
        (complex, r"Pass 'complex64'"),
        ("fp8", r"Pass 'float8_e4m3fn' .* or 'float8_e5m2'"),
        ("FP8", r"Pass 'float8_e4m3fn' .* or 'float8_e5m2'"),
        ("float8", r"Pass 'float8_e4m3fn' .* or 'float8_e5m2'"),
    ],
)
def test_ambiguous_names_are_refused_with_a_suggestion(value: object, suggestion: str) -> None:
    with pytest.raises(DTypeError, match=r"is ambiguous: .*" + suggestion) as caught:
        DType.from_any(value)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_python_and_numpy_types_keep_their_meaning() -> None:
    assert DType.from_any(bool) is DType.bool
    assert DType.from_any(np.float64) is DType.float64 and DType.from_any(np.int_) is DType.int64
    assert DType.from_any(np.bool_) is DType.bool and DType.from_any(np.complex64) is DType.complex64
    assert DType.from_numpy(float) is DType.float64  # from_numpy is numpy's reading, explicitly


def test_predicates_and_sizes() -> None:
    assert DType.float8_e5m2.is_float() and DType.float8_e5m2.is_float8()
    assert DType.bfloat16.is_half() and not DType.float32.is_half()
    assert DType.uint8.is_unsigned_integral() and not DType.uint8.is_signed_integral()
    assert DType.int64.is_integral() and not DType.bool.is_integral()
    assert DType.float4_e2m1fn.size_in_bits == 4 and DType.float4_e2m1fn.is_packed
    assert DType.float64.size_in_bytes == 8 and DType.bfloat16.size_in_bits == 16


def test_nibbles_low_first_round_trip() -> None:
    packed = np.array([0x21, 0xF0], np.uint8)
    values = unpack_nibbles(packed, DType.float4_e2m1fn, (2, 2))
    assert values.view(np.uint8).tolist() == [[1, 2], [0, 15]]
    np.testing.assert_array_equal(pack_nibbles(values), packed)


def _random_tensor(dtype: DType, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Random bit patterns (NaNs and subnormals included) as a torch tensor and the bytes expected back."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if dtype is DType.bool:
        bits = rng.integers(0, 2, count, dtype=np.uint8)
    elif dtype is DType.float4_e2m1fn:
        bits = rng.integers(0, 16, count, dtype=np.uint8)
    else:
        bits = rng.integers(0, 256, count * dtype.size_in_bytes, dtype=np.uint8)
    if count == 0:
        tensor = (
            torch.empty(shape, dtype=TORCH[dtype])
            if not dtype.is_packed
            else torch.empty((0, 2), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
        )
    elif dtype is DType.float4_e2m1fn:
        packed = pack_nibbles(bits.view(dtype.to_numpy()))
        tensor = (
            torch.from_numpy(packed.copy()).view(torch.float4_e2m1fn_x2).reshape(*shape[:-1], shape[-1] // 2)
        )
    else:
        tensor = torch.from_numpy(bits.copy()).view(TORCH[dtype]).reshape(shape)
    return tensor, bits.view(dtype.to_numpy()).reshape(shape)


@pytest.mark.parametrize("dtype", list(DType))
def test_every_dtype_reads_back_bit_exact_from_the_reference_writer(dtype: DType, tmp_path: Path) -> None:
    tensors, expected = {}, {}
    for i, shape in enumerate([(6, 10), (4,), (0, 4)]):
        tensors[f"t{i}"], expected[f"t{i}"] = _random_tensor(dtype, shape, i)
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    weights = jw.load_weights(path)
    for name, want in expected.items():
        data = weights[name].data()
        assert data.dtype is dtype and data.shape == want.shape
        assert data.data.tobytes() == want.tobytes(), name
        if dtype.size_in_bytes <= 4 or dtype is DType.complex64:
            placed = weights[name].allocate()
            assert np.asarray(placed.array).tobytes() == want.tobytes(), name


@pytest.mark.parametrize("dtype", list(DType))
def test_our_writer_round_trips_and_the_reference_reads_it(dtype: DType, tmp_path: Path) -> None:
    _, values = _random_tensor(dtype, (4, 6), 7)
    path = jw.save_file({"x": values}, tmp_path / "ours.safetensors")
    assert jw.load_weights(path).x.data().data.tobytes() == values.tobytes()
    reference = safetensors.torch.load_file(str(path))["x"]
    assert (
        reference.view(torch.uint8).numpy().tobytes()
        == (pack_nibbles(values) if dtype.is_packed else values).tobytes()
    )
