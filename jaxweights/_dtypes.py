"""Element types: the `DType` enum and its mappings to numpy/ml_dtypes and file-format codes.

This module must never import jax: format readers use it, and they stay jax-free.
"""

from __future__ import annotations

import builtins
import difflib
import enum
from typing import Any

import ml_dtypes
import numpy as np

from .errors import DTypeError

__all__ = ["DType", "DTypeLike"]


class DType(enum.Enum):
    """The element type of a weight, with MAX's member names.

    Every jaxweights API that takes a dtype also takes a numpy dtype, a jnp/ml_dtypes scalar type or a
    string; `DType.from_any` does the conversion. A string may be a member name (``"bfloat16"``), a
    safetensors code (``"BF16"``), a numpy name (``"float32"``, ``"f4"``) or a common alias: ``bf16``,
    ``fp16``/``f16``/``half``, ``fp32``/``f32``/``single``, ``fp64``/``f64``/``double``,
    ``fp8_e4m3``/``e4m3``, ``fp8_e5m2``/``e5m2``, ``fp4``/``float4``, ``i8``..``i64`` and ``u8``..``u64``
    (counted in bits, like the safetensors codes), ``c64``. Case does not matter unless it changes the
    meaning (``"F4"`` is safetensors' float4, ``"f4"`` numpy's float32). Names that people read two ways
    (``"float"``, ``"int"``, ``"uint"``, ``"complex"``, ``"fp8"``, and the Python types ``float`` and
    ``int``) are refused with the spellings to choose from, and a misspelling gets a did-you-mean.

    Example:
        >>> import numpy as np
        >>> from jaxweights import DType
        >>> DType.from_any("BF16"), DType.from_any(np.float32), DType.from_any("float8_e4m3fn")
        (<DType.bfloat16>, <DType.float32>, <DType.float8_e4m3fn>)
        >>> DType.from_any("bf16"), DType.from_any("Float32"), DType.from_any("e4m3"), DType.from_any("i8")
        (<DType.bfloat16>, <DType.float32>, <DType.float8_e4m3fn>, <DType.int8>)
        >>> DType.from_any("float")
        Traceback (most recent call last):
        jaxweights.errors.DTypeError: 'float' is ambiguous: ... Pass 'float32' (or 'float64' ...).
        >>> DType.from_any("bfloat")
        Traceback (most recent call last):
        jaxweights.errors.DTypeError: 'bfloat' is not a supported element type. Did you mean 'bfloat16'? ...
        >>> DType.bfloat16.to_numpy()
        dtype(bfloat16)
        >>> DType.float4_e2m1fn.size_in_bits, DType.float32.size_in_bytes
        (4, 4)
    """

    __module__ = "jaxweights"

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
        ``"F8_E4M3"``, ``"F4"``), an alias in any case (``"bf16"``, ``"FP32"``, ``"e4m3"``, ``"i8"``; see
        `DType`) and a numpy dtype name (``"float32"``, ``"f4"``).

        Example:
            >>> DType.from_any("Half"), DType.from_any("u16"), DType.from_any(bool)
            (<DType.float16>, <DType.uint16>, <DType.bool>)
            >>> DType.from_any("fp8")
            Traceback (most recent call last):
            jaxweights.errors.DTypeError: 'fp8' is ambiguous: ... Pass 'float8_e4m3fn' ... or 'float8_e5m2' ...

        Raises:
            DTypeError: the value names no supported element type, or is ambiguous (``"float"``, ``int``);
                the message says which spellings to use instead.
        """
        if isinstance(value, DType):
            return value
        if isinstance(value, str):
            member = _BY_NAME.get(value) or SAFETENSORS_TO_DTYPE.get(value)
            if member is not None:
                return member
            folded = value.lower()
            if folded in _AMBIGUOUS:
                raise DTypeError(f"{value!r} is ambiguous: {_AMBIGUOUS[folded]}")
            member = _ALIASES.get(folded)
            if member is not None:
                return member
        elif value is float or value is int or value is complex:
            raise DTypeError(f"the Python type {value.__name__} is ambiguous: {_AMBIGUOUS[value.__name__]}")
        try:
            np_dtype = np.dtype(value)  # type: ignore[arg-type]
        except TypeError:
            np_dtype = None
        member = _FROM_NUMPY.get(np_dtype) if np_dtype is not None else None
        if member is None:
            raise DTypeError(_unknown_message(value))
        return member

    @classmethod
    def from_numpy(cls, dtype: Any) -> DType:
        """The `DType` of a numpy (or ml_dtypes) dtype.

        Example:
            >>> import ml_dtypes, numpy as np
            >>> DType.from_numpy(np.int8), DType.from_numpy(ml_dtypes.bfloat16)
            (<DType.int8>, <DType.bfloat16>)
        """
        return cls.from_any(np.dtype(dtype))

    def to_numpy(self) -> np.dtype[Any]:
        """The numpy (or ml_dtypes) dtype that holds one element per item.

        Example:
            >>> DType.float32.to_numpy(), DType.float8_e4m3fn.to_numpy()
            (dtype('float32'), dtype(float8_e4m3fn))
        """
        return _TO_NUMPY[self]

    @property
    def size_in_bits(self) -> int:
        """Bits per element as stored in files: 4 for ``float4_e2m1fn``, 8 x itemsize otherwise.

        Example:
            >>> DType.bfloat16.size_in_bits, DType.float4_e2m1fn.size_in_bits
            (16, 4)
        """
        return 4 if self is DType.float4_e2m1fn else 8 * _TO_NUMPY[self].itemsize

    @property
    def size_in_bytes(self) -> int:
        """Bytes per element in memory (``float4_e2m1fn`` occupies one byte once unpacked).

        Example:
            >>> DType.float64.size_in_bytes, DType.float4_e2m1fn.size_in_bytes
            (8, 1)
        """
        return _TO_NUMPY[self].itemsize

    @property
    def is_packed(self) -> builtins.bool:
        """True when files pack several elements per byte (``float4_e2m1fn``: two per byte).

        Example:
            >>> DType.float4_e2m1fn.is_packed, DType.uint8.is_packed
            (True, False)
        """
        return self is DType.float4_e2m1fn  # the one sub-byte type (see size_in_bits)

    def is_float(self) -> builtins.bool:
        """True for floating-point types, the float8 and float4 types included.

        Example:
            >>> DType.bfloat16.is_float(), DType.float8_e5m2.is_float(), DType.int32.is_float()
            (True, True, False)
        """
        return self.name.startswith(("float", "bfloat"))

    def is_integral(self) -> builtins.bool:
        """True for signed and unsigned integer types (not bool).

        Example:
            >>> DType.int8.is_integral(), DType.uint64.is_integral(), DType.bool.is_integral()
            (True, True, False)
        """
        return self.name.startswith(("int", "uint"))

    def is_signed_integral(self) -> builtins.bool:
        """True for signed integer types.

        Example:
            >>> DType.int16.is_signed_integral(), DType.uint16.is_signed_integral()
            (True, False)
        """
        return self.name.startswith("int")

    def is_unsigned_integral(self) -> builtins.bool:
        """True for unsigned integer types.

        Example:
            >>> DType.uint16.is_unsigned_integral(), DType.int16.is_unsigned_integral()
            (True, False)
        """
        return self.name.startswith("uint")

    def is_float8(self) -> builtins.bool:
        """True for the 8-bit float types.

        Example:
            >>> DType.float8_e4m3fn.is_float8(), DType.float16.is_float8()
            (True, False)
        """
        return self.name.startswith("float8")

    def is_half(self) -> builtins.bool:
        """True for the 16-bit float types.

        Example:
            >>> DType.float16.is_half(), DType.bfloat16.is_half(), DType.float32.is_half()
            (True, True, False)
        """
        return self in (DType.float16, DType.bfloat16)

    @property
    def safetensors_code(self) -> str:
        """The dtype code safetensors headers use (``"BF16"``, ``"F8_E4M3"``, ...).

        Example:
            >>> DType.bfloat16.safetensors_code, DType.float8_e4m3fn.safetensors_code
            ('BF16', 'F8_E4M3')
        """
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

# Lower-case spellings besides the member names. Widths count bits ("i8" is int8, like safetensors'
# "I8"), except "f4" and "f8", which keep numpy's byte-counted meaning (float32, float64).
_ALIAS_SPELLINGS: dict[DType, tuple[str, ...]] = {
    DType.bool: ("bool_", "boolean"),
    DType.int8: ("i8",),
    DType.int16: ("i16",),
    DType.int32: ("i32",),
    DType.int64: ("i64",),
    DType.uint8: ("u8",),
    DType.uint16: ("u16",),
    DType.uint32: ("u32",),
    DType.uint64: ("u64",),
    DType.float16: ("fp16", "f16", "half"),
    DType.bfloat16: ("bf16",),
    DType.float32: ("fp32", "f32", "single"),
    DType.float64: ("fp64", "f64", "double"),
    DType.float8_e4m3fn: ("fp8_e4m3", "fp8_e4m3fn", "f8e4m3", "f8e4m3fn", "f8_e4m3", "e4m3", "e4m3fn"),
    DType.float8_e4m3fnuz: ("fp8_e4m3fnuz", "f8e4m3fnuz", "f8_e4m3fnuz", "e4m3fnuz"),
    DType.float8_e5m2: ("fp8_e5m2", "f8e5m2", "f8_e5m2", "e5m2"),
    DType.float8_e5m2fnuz: ("fp8_e5m2fnuz", "f8e5m2fnuz", "f8_e5m2fnuz", "e5m2fnuz"),
    DType.float8_e8m0fnu: ("fp8_e8m0", "f8e8m0fnu", "f8_e8m0", "e8m0", "e8m0fnu"),
    DType.float4_e2m1fn: ("fp4", "fp4_e2m1", "float4", "float4_e2m1", "f4e2m1fn", "e2m1", "e2m1fn"),
    DType.complex64: ("c64",),
}
_ALIASES: dict[str, DType] = {
    **{member.value: member for member in DType},
    **{spelling: member for member, spellings in _ALIAS_SPELLINGS.items() for spelling in spellings},
}

# Spellings (lower case) and Python types that people read two ways: refused, with what to pass instead.
_FP8 = (
    "it names several 8-bit float formats. Pass 'float8_e4m3fn' (e4m3: more precision, the usual choice "
    "for weights) or 'float8_e5m2' (e5m2: more range, used for gradients)."
)
_AMBIGUOUS: dict[str, str] = {
    "float": "numpy reads it as float64, but float32 is what is usually meant. Pass 'float32' (or "
    "'float64' for numpy's reading).",
    "int": "numpy reads it as int64, but JAX's default integer is int32. Pass 'int32' (or 'int64' for "
    "numpy's reading).",
    "uint": "numpy reads it as uint64, but JAX's default unsigned integer is uint32. Pass 'uint32' (or "
    "'uint64' for numpy's reading).",
    "complex": "numpy reads it as complex128, which jaxweights does not support. Pass 'complex64'.",
    "fp8": _FP8,
    "float8": _FP8,
}


def _unknown_message(value: object) -> str:
    """The `DTypeError` message for a value that names no element type: a did-you-mean for strings."""
    hint = ""
    if isinstance(value, str):
        spellings = {**_ALIASES, **{code.lower(): member for code, member in SAFETENSORS_TO_DTYPE.items()}}
        close = difflib.get_close_matches(value.lower(), spellings, n=1)
        if close:
            hint = f" Did you mean {spellings[close[0]].name!r}?"
    return (
        f"{value!r} is not a supported element type.{hint} Use one of: {', '.join(_BY_NAME)}, or an alias "
        "such as 'bf16', 'fp32' or 'e4m3' (see DType)."
    )


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
