"""The examples of MAX's Weights protocol page, translated to jaxweights imports.

MAX's examples start from ``graph.weights()``; here the accessor comes from `jw.load_weights` over a
checkpoint holding the names the examples use. ``graph.add_weight`` is the graph layer's business.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxweights as jw
from jaxweights import DeviceRef, DType


@pytest.fixture
def source() -> dict[str, np.ndarray]:
    """The tensors of the checkpoint, as written: what every example must read back."""
    rng = np.random.default_rng(0)
    return {
        "transformer.layers.0.attention.weight": rng.standard_normal((768, 768), dtype=np.float32),
        "transformer.layers.0.mlp.weight": rng.standard_normal((768, 3072), dtype=np.float32),
        "model.layers.0.weight": rng.standard_normal((768, 768), dtype=np.float32),
        "model.embeddings.weight": rng.standard_normal((10, 768), dtype=np.float32),
        "model.classifier.weight": rng.standard_normal((2, 768), dtype=np.float32),
    }


@pytest.fixture
def weights(write_reference: Callable[..., Path], source: dict[str, np.ndarray]) -> jw.Weights:
    return jw.load_weights(write_reference(source))


def assert_holds(got: object, want: np.ndarray) -> None:
    """``got`` (a `jax.Array`, `Weight` or `WeightData`) holds ``want`` bit for bit, on the host."""
    host = np.asarray(got)
    assert (host.dtype, host.shape) == (want.dtype, want.shape)
    assert host.tobytes() == want.tobytes()


def test_class_example(weights: jw.Weights, source: dict[str, np.ndarray]) -> None:
    attn_weight = weights.transformer.layers[0].attention.weight.allocate(
        dtype=DType.float32, shape=(768, 768)
    )
    assert attn_weight.name == "transformer.layers.0.attention.weight"
    if weights.transformer.layers[0].mlp.weight.exists():
        mlp_weight = weights.transformer.layers[0].mlp.weight.allocate(dtype=DType.float16, shape=(768, 3072))
    assert mlp_weight.array.dtype == np.float16
    assert_holds(attn_weight.array, source["transformer.layers.0.attention.weight"])
    assert_holds(mlp_weight.array, source["transformer.layers.0.mlp.weight"].astype(np.float16))


def test_allocate_example(weights: jw.Weights, source: dict[str, np.ndarray]) -> None:
    # MAX places on DeviceRef.GPU(0); on a machine without a GPU that is a clear error, so use CPU.
    device = DeviceRef.GPU(0) if jax.devices()[0].platform == "gpu" else DeviceRef.CPU()
    weight = weights.model.layers[0].weight.allocate(dtype=DType.float16, shape=(768, 768), device=device)
    assert weight.array.dtype == np.float16  # "Convert to half precision" converts
    assert_holds(weight.array, source["model.layers.0.weight"].astype(np.float16))
    assert weight.device == device
    if device.is_cpu():
        with pytest.raises(jw.errors.DeviceError, match=r"names a GPU device, but this process has none"):
            weights.model.layers[0].weight.allocate(device=DeviceRef.GPU(0))


def test_allocated_weights_example(weights: jw.Weights, source: dict[str, np.ndarray]) -> None:
    assert weights.allocated_weights == {}
    weights.model.layers[0].weight.allocate()
    assert list(weights.allocated_weights) == ["model.layers.0.weight"]
    assert isinstance(weights.allocated_weights["model.layers.0.weight"], jax.Array)
    assert_holds(weights.allocated_weights["model.layers.0.weight"], source["model.layers.0.weight"])


def test_data_example(weights: jw.Weights, source: dict[str, np.ndarray]) -> None:
    weight_data = weights.model.embeddings.weight.data()
    assert f"Shape: {weight_data.shape}" == "Shape: (10, 768)"
    assert f"Dtype: {weight_data.dtype}" == "Dtype: DType.float32"
    assert_holds(weight_data.data, source["model.embeddings.weight"])
    fp16_data = weight_data.astype(DType.float16)
    assert fp16_data.dtype is DType.float16
    assert_holds(fp16_data.data, source["model.embeddings.weight"].astype(np.float16))
    with pytest.raises(KeyError):
        weights.model.missing.weight.data()


def test_exists_example(
    weights: jw.Weights, source: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    if weights.model.classifier.weight.exists():
        classifier = weights.model.classifier.weight.allocate()
    else:
        print("Classifier weight not found")
    assert classifier.shape == (2, 768)
    assert_holds(classifier.array, source["model.classifier.weight"])
    if weights.model.head.weight.exists():
        raise AssertionError("no head in this checkpoint")
    else:
        print("Classifier weight not found")
    assert capsys.readouterr().out == "Classifier weight not found\n"


def test_items_example(weights: jw.Weights) -> None:
    found = [f"Found weight: {name}" for name, weight in weights.transformer.layers[0].items()]
    assert found == ["Found weight: attention.weight", "Found weight: mlp.weight"]


def test_name_example(weights: jw.Weights) -> None:
    assert weights.model.layers[0].name == "model.layers.0"
