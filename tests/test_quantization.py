from __future__ import annotations

import pytest

from jaxweights import QuantizationEncoding
from jaxweights.errors import QuantizationError

# (elements per block, bytes per block) from ggml-common.h
GGML = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


@pytest.mark.parametrize(("name", "expected"), sorted(GGML.items()))
def test_block_parameters_match_ggml(name: str, expected: tuple[int, int]) -> None:
    encoding = QuantizationEncoding[name]
    assert (encoding.elements_per_block, encoding.block_size) == expected
    assert encoding.block_parameters.elements_per_block == expected[0]
    assert encoding.is_gguf


def test_gptq_packs_eight_nibbles_per_int32() -> None:
    assert QuantizationEncoding.GPTQ.block_parameters.elements_per_block == 8
    assert QuantizationEncoding.GPTQ.block_size == 4
    assert not QuantizationEncoding.GPTQ.is_gguf


def test_from_any_is_case_insensitive_and_rejects_unknown() -> None:
    assert QuantizationEncoding.from_any("q6_k") is QuantizationEncoding.Q6_K
    assert QuantizationEncoding.from_any(QuantizationEncoding.Q4_0) is QuantizationEncoding.Q4_0
    with pytest.raises(QuantizationError, match=r"'Q9_X' is not a quantization encoding"):
        QuantizationEncoding.from_any("Q9_X")


def test_bytes_for_shape() -> None:
    assert QuantizationEncoding.Q8_0.bytes_for_shape((3, 64)) == 3 * 2 * 34
    with pytest.raises(QuantizationError, match=r"multiple of 256; found shape \(4, 100\)"):
        QuantizationEncoding.Q4_K.bytes_for_shape((4, 100))


def test_block_parameters_match_gguf_py() -> None:
    import gguf

    for encoding in QuantizationEncoding:
        if encoding.is_gguf:
            kind = getattr(gguf.GGMLQuantizationType, encoding.name)
            assert gguf.GGML_QUANT_SIZES[kind] == (encoding.elements_per_block, encoding.block_size), encoding
