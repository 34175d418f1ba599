"""Quantization encodings: names, elements per block and bytes per block.

Pure data; no I/O and no jax. GGUF's block layouts are the reference (ggml-common.h).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._shapes import element_count
from .errors import QuantizationError

__all__ = ["BlockParameters", "QuantizationEncoding"]


@dataclass(frozen=True)
class BlockParameters:
    """How a block-quantized tensor is laid out: ``elements_per_block`` values share one block of
    ``block_size`` bytes.

    Example:
        >>> from jaxweights import QuantizationEncoding
        >>> QuantizationEncoding.Q8_0.block_parameters
        BlockParameters(elements_per_block=32, block_size=34)
    """

    __module__ = "jaxweights"

    elements_per_block: int
    block_size: int


class QuantizationEncoding(enum.Enum):
    """A block quantization scheme, with MAX's member names plus the other common GGUF types.

    Example:
        >>> from jaxweights import QuantizationEncoding
        >>> q = QuantizationEncoding.Q4_K
        >>> q.elements_per_block, q.block_size
        (256, 144)
        >>> q.bytes_for_shape((4096, 4096))
        9437184
        >>> QuantizationEncoding.from_any("q8_0")
        <QuantizationEncoding.Q8_0>
    """

    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q2_K = "Q2_K"
    Q3_K = "Q3_K"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"
    GPTQ = "GPTQ"

    __module__ = "jaxweights"

    def __repr__(self) -> str:
        return f"<QuantizationEncoding.{self.name}>"

    @classmethod
    def from_any(cls, value: QuantizationEncoding | str) -> QuantizationEncoding:
        """Accepts a member or its name in any case (``"q4_k"``).

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.from_any("q4_k"), QuantizationEncoding.from_any(QuantizationEncoding.GPTQ)
            (<QuantizationEncoding.Q4_K>, <QuantizationEncoding.GPTQ>)
        """
        if isinstance(value, QuantizationEncoding):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        raise QuantizationError(
            f"{value!r} is not a quantization encoding. Use one of: {', '.join(m.name for m in cls)}."
        )

    @property
    def block_parameters(self) -> BlockParameters:
        """Elements per block and bytes per block.

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.Q4_0.block_parameters
            BlockParameters(elements_per_block=32, block_size=18)
        """
        return _BLOCK_PARAMETERS[self]

    @property
    def elements_per_block(self) -> int:
        """Number of original values grouped into one block.

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.Q4_0.elements_per_block, QuantizationEncoding.Q6_K.elements_per_block
            (32, 256)
        """
        return _BLOCK_PARAMETERS[self].elements_per_block

    @property
    def block_size(self) -> int:
        """Bytes in the encoded representation of one block.

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.Q8_0.block_size, QuantizationEncoding.Q6_K.block_size
            (34, 210)
        """
        return _BLOCK_PARAMETERS[self].block_size

    @property
    def is_gguf(self) -> bool:
        """True for the GGML/GGUF block types (everything but GPTQ).

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.Q4_K.is_gguf, QuantizationEncoding.GPTQ.is_gguf
            (True, False)
        """
        return self is not QuantizationEncoding.GPTQ

    def bytes_for_shape(self, shape: tuple[int, ...]) -> int:
        """Encoded size of a tensor of logical ``shape``; its last dimension must fill whole blocks.

        Raises:
            QuantizationError: the last dimension is not a multiple of ``elements_per_block``.

        Example:
            >>> from jaxweights import QuantizationEncoding
            >>> QuantizationEncoding.Q8_0.bytes_for_shape((2, 64))
            136
            >>> QuantizationEncoding.Q8_0.bytes_for_shape((2, 50))
            Traceback (most recent call last):
            jaxweights.errors.QuantizationError: Q8_0 packs 32 values per block, ... found shape (2, 50).
        """
        if not shape or shape[-1] % self.elements_per_block:
            raise QuantizationError(
                f"{self.name} packs {self.elements_per_block} values per block, so the last dimension "
                f"must be a multiple of {self.elements_per_block}; found shape {tuple(shape)}."
            )
        return element_count(shape) // self.elements_per_block * self.block_size


# Sizes from ggml-common.h: d/m are float16 scales, K-quants use super-blocks of 256 values.
# GPTQ packs eight 4-bit values in one little-endian int32 (scales and zeros are separate tensors).
_BLOCK_PARAMETERS: dict[QuantizationEncoding, BlockParameters] = {
    QuantizationEncoding.Q4_0: BlockParameters(32, 2 + 16),
    QuantizationEncoding.Q4_1: BlockParameters(32, 2 + 2 + 16),
    QuantizationEncoding.Q5_0: BlockParameters(32, 2 + 4 + 16),
    QuantizationEncoding.Q5_1: BlockParameters(32, 2 + 2 + 4 + 16),
    QuantizationEncoding.Q8_0: BlockParameters(32, 2 + 32),
    QuantizationEncoding.Q2_K: BlockParameters(256, 16 + 64 + 2 + 2),
    QuantizationEncoding.Q3_K: BlockParameters(256, 32 + 64 + 12 + 2),
    QuantizationEncoding.Q4_K: BlockParameters(256, 2 + 2 + 12 + 128),
    QuantizationEncoding.Q5_K: BlockParameters(256, 2 + 2 + 12 + 32 + 128),
    QuantizationEncoding.Q6_K: BlockParameters(256, 128 + 64 + 16 + 2),
    QuantizationEncoding.GPTQ: BlockParameters(8, 4),
}
