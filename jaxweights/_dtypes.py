"""Element types: the `DType` enum and its mappings to numpy/ml_dtypes and file-format codes.

This module must never import jax: format readers use it, and they stay jax-free.
"""

from __future__ import annotations

import builtins
import enum
from typing import Any

import ml_dtypes
import numpy as np

from .errors import DTypeError

__all__ = ["DType", "DTypeLike"]


class DType(enum.Enum):
    """The element type of a weight, with MAX's member names.

    Every jaxweights API that takes a dtype also takes a numpy dtype, a jnp/ml_dtypes scalar type or a
    string (a member name such as ``"bfloat16"``, a safetensors code such as ``"BF16"``, or a numpy name
    such as ``"float32"``); `DType.from_any` does the conversion.

    Example:
        >>> import numpy as np
        >>> from jaxweights import DType
        >>> DType.from_any("BF16"), DType.from_any(np.float32), DType.from_any("float8_e4m3fn")
        (<DType.bfloat16>, <DType.float32>, <DType.float8_e4m3fn>)
        >>> DType.bfloat16.to_numpy()
        dtype(bfloat16)
        >>> DType.float4_e2m1fn.size_in_bits, DType.float32.size_in_bytes
        (4, 4)
    """

    bool = "bool"
    int8 = "int8"
    int16 = "int16"
    int32 = "int32"
    int64 = "int64"
    uint8 = "uint8"
    uint16 = "uint16"
    uint32 = "uint32"
    uint64 = "uint64"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    float64 = "float64"
    float8_e4m3fn = "float8_e4m3fn"
    float8_e4m3fnuz = "float8_e4m3fnuz"
    float8_e5m2 = "float8_e5m2"
    float8_e5m2fnuz = "float8_e5m2fnuz"
    float8_e8m0fnu = "float8_e8m0fnu"
    float4_e2m1fn = "float4_e2m1fn"
    complex64 = "complex64"

    def __repr__(self) -> str:
        return f"<DType.{self.name}>"

    @classmethod
    def from_any(cls, value: DTypeLike) -> DType:
        """Converts a DType, numpy/jnp/ml_dtypes dtype or scalar type, or string to a `DType`.

        Strings are tried, in order, as a member name (``"bfloat16"``), a safetensors code (``"BF16"``,
        ``"F8_E4M3"``, ``"F4"``) and a numpy dtype name (``"float32"``, ``"f4"``).

        Raises:
            DTypeError: the value names no supported element type.
        """
        if isinstance(value, DType):
            return value
        if isinstance(value, str):
            member = _BY_NAME.get(value)
            if member is None:
                member = SAFETENSORS_TO_DTYPE.get(value)
            if member is not None:
                return member
        try:
            np_dtype = np.dtype(value)  # type: ignore[arg-type]
        except TypeError:
            np_dtype = None
        member = _FROM_NUMPY.get(np_dtype) if np_dtype is not None else None
        if member is None:
            raise DTypeError(f"{value!r} is not a supported element type. Use one of: {', '.join(_BY_NAME)}.")
        return member

    @classmethod
    def from_numpy(cls, dtype: Any) -> DType:
        """The `DType` of a numpy (or ml_dtypes) dtype."""
        return cls.from_any(np.dtype(dtype))

    def to_numpy(self) -> np.dtype[Any]:
        """The numpy (or ml_dtypes) dtype that holds one element per item."""
        return _TO_NUMPY[self]

    @property
    def size_in_bits(self) -> int:
        """Bits per element as stored in files: 4 for ``float4_e2m1fn``, 8 x itemsize otherwise."""
        return 4 if self is DType.float4_e2m1fn else 8 * _TO_NUMPY[self].itemsize

    @property
    def size_in_bytes(self) -> int:
        """Bytes per element in memory (``float4_e2m1fn`` occupies one byte once unpacked)."""
        return _TO_NUMPY[self].itemsize

    @property
    def is_packed(self) -> builtins.bool:
        """True when files pack several elements per byte (``float4_e2m1fn``: two per byte)."""
        return self.size_in_bits < 8

    def is_float(self) -> builtins.bool:
        """True for floating-point types, the float8 and float4 types included."""
        return self.name.startswith(("float", "bfloat"))

    def is_integral(self) -> builtins.bool:
        """True for signed and unsigned integer types (not bool)."""
        return self.name.startswith(("int", "uint"))

    def is_signed_integral(self) -> builtins.bool:
        """True for signed integer types."""
        return self.name.startswith("int")

    def is_unsigned_integral(self) -> builtins.bool:
        """True for unsigned integer types."""
        return self.name.startswith("uint")

    def is_float8(self) -> builtins.bool:
        """True for the 8-bit float types."""
        return self.name.startswith("float8")

    def is_half(self) -> builtins.bool:
        """True for the 16-bit float types."""
        return self in (DType.float16, DType.bfloat16)

    @property
    def safetensors_code(self) -> str:
        """The dtype code safetensors headers use (``"BF16"``, ``"F8_E4M3"``, ...)."""
        return DTYPE_TO_SAFETENSORS[self]


DTypeLike = DType | str | np.dtype[Any] | type[Any]

_BY_NAME: dict[str, DType] = {member.value: member for member in DType}

_TO_NUMPY: dict[DType, np.dtype[Any]] = {
    member: np.dtype(getattr(ml_dtypes, member.value, None) or member.value) for member in DType
}
_FROM_NUMPY: dict[np.dtype[Any], DType] = {dtype: member for member, dtype in _TO_NUMPY.items()}

DTYPE_TO_SAFETENSORS: dict[DType, str] = {
    DType.bool: "BOOL",
    DType.int8: "I8",
    DType.int16: "I16",
    DType.int32: "I32",
    DType.int64: "I64",
    DType.uint8: "U8",
    DType.uint16: "U16",
    DType.uint32: "U32",
    DType.uint64: "U64",
    DType.float16: "F16",
    DType.bfloat16: "BF16",
    DType.float32: "F32",
    DType.float64: "F64",
    DType.float8_e4m3fn: "F8_E4M3",
    DType.float8_e4m3fnuz: "F8_E4M3FNUZ",
    DType.float8_e5m2: "F8_E5M2",
    DType.float8_e5m2fnuz: "F8_E5M2FNUZ",
    DType.float8_e8m0fnu: "F8_E8M0",
    DType.float4_e2m1fn: "F4",
    DType.complex64: "C64",
}
SAFETENSORS_TO_DTYPE: dict[str, DType] = {code: member for member, code in DTYPE_TO_SAFETENSORS.items()}


def unpack_nibbles(packed: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """Unpacks two 4-bit elements per byte (element 2i in the low nibble) into one per byte.

    Example:
        >>> unpack_nibbles(np.array([0x21], np.uint8), DType.float4_e2m1fn, (2,)).astype(np.float32)
        array([0.5, 1. ], dtype=float32)
    """
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(flat.size * 2, dtype=np.uint8)
    np.bitwise_and(flat, 0x0F, out=out[0::2])
    np.right_shift(flat, 4, out=out[1::2])
    return out.view(dtype.to_numpy()).reshape(shape)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Packs one-per-byte 4-bit elements two per byte (element 2i in the low nibble); inverse of
    `unpack_nibbles`. The element count must be even."""
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return (flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)
