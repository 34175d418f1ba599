"""The accelerator paths on a real GPU: placement, sharding over GPU meshes, the staged load, graph
functions, restore, dequantization and stacking. Skipped where JAX has no GPU backend (run by
``benchmarks/device_check.py`` on a GPU machine); the scheduling logic is covered on CPU by
tests/test_transfer.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights import _transfer


def _gpus() -> list[jax.Device]:
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


GPUS = _gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason="no GPU backend in this JAX")

Writer = Callable[..., Path]


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((64, 32), dtype=np.float32),
        "ids": np.arange(12, dtype=np.int32),
    }
    for i in range(3):
        tensors[f"layers.{i}.w"] = rng.standard_normal((16 * len(GPUS or [0]), 32), dtype=np.float32)
        tensors[f"layers.{i}.b"] = rng.standard_normal(32, dtype=np.float32)
    return tensors


def _on_gpu(array: jax.Array) -> bool:
    return all(device.platform == "gpu" for device in array.devices())


def test_allocate_on_a_gpu_converts_there(write_reference: Writer) -> None:
    tensors = _tensors()
    weights = jw.load_weights(write_reference(tensors))
    weight = weights.embed.weight.allocate(dtype=jw.DType.bfloat16, device=jw.DeviceRef.GPU(0))
    assert _on_gpu(weight.array) and weight.array.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(weight.array), tensors["embed.weight"].astype(ml_dtypes.bfloat16)
    )
    assert _on_gpu(weights.allocated_weights["embed.weight"])
    on_device = weights.ids.allocate(device=GPUS[0]).array  # a jax.Device works as well
    np.testing.assert_array_equal(np.asarray(on_device), tensors["ids"])


def test_allocate_all_on_a_gpu_goes_through_the_staging_pool(
    write_reference: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _tensors()
    calls: list[int] = []
    original = _transfer.load_staged

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr("jaxweights._loader.load_staged", spy)
    weights = jw.load_weights(write_reference(tensors))
    arrays = weights.allocate_all(device=jw.DeviceRef.GPU(0), max_inflight_bytes=4096)
    assert calls == [len(tensors)]
    for name, array in arrays.items():
        assert _on_gpu(array)
        np.testing.assert_array_equal(np.asarray(array), tensors[name])
    assert all(_on_gpu(a) for a in weights.allocated_weights.values())


def test_sharding_over_a_gpu_mesh(write_reference: Writer) -> None:
    tensors = _tensors()
    mesh = Mesh(np.array(GPUS), ("x",))
    weights = jw.load_weights(write_reference(tensors))
    arrays = weights.layers.allocate_all(mesh=mesh, rules=[(r"\.w$", P("x"))])
    for name, array in arrays.items():
        assert _on_gpu(array)
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), tensors[f"layers.{name}"][shard.index])
    stacked = weights.layers.to_pytree(stack=True, mesh=mesh, rules=[(r"\.w$", P(None, "x"))])
    assert stacked["w"].sharding == NamedSharding(mesh, P(None, "x")) and _on_gpu(stacked["w"])
    expected = np.stack([tensors[f"layers.{i}.w"] for i in range(3)])
    np.testing.assert_array_equal(np.asarray(stacked["w"]), expected)


def test_graph_functions_take_gpu_weights_as_arguments(write_reference: Writer) -> None:
    tensors = _tensors()
    graph = jw.Graph("gpu", weights=jw.load_weights(write_reference(tensors)))
    weights = graph.weights()

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        w = graph.add_weight(weights.layers[0].w.allocate(device=jw.DeviceRef.GPU(0)))
        b = graph.add_weight(weights.layers[0].b.allocate(device=jw.DeviceRef.GPU(0)))
        return x @ w + b

    x = np.random.default_rng(1).standard_normal((4, tensors["layers.0.w"].shape[0]), dtype=np.float32)
    with jax.default_matmul_precision("highest"):
        out = forward(jax.device_put(x, GPUS[0]))
    assert _on_gpu(out)
    np.testing.assert_allclose(
        np.asarray(out), x @ tensors["layers.0.w"] + tensors["layers.0.b"], rtol=1e-4, atol=1e-4
    )


def test_restore_onto_gpu_shardings(write_reference: Writer) -> None:
    tensors = _tensors()
    gpu = SingleDeviceSharding(GPUS[0])
    target = {
        "embed": {"weight": jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=gpu)},
        "layers": {"w": jax.ShapeDtypeStruct((3, *tensors["layers.0.w"].shape), jnp.float32, sharding=gpu)},
    }
    restored = jw.restore(write_reference(tensors), target, stack="layers", strict=False, cast=True)
    assert _on_gpu(restored["embed"]["weight"]) and _on_gpu(restored["layers"]["w"])
    np.testing.assert_array_equal(
        np.asarray(restored["embed"]["weight"]), tensors["embed.weight"].astype(ml_dtypes.bfloat16)
    )


def test_dequantization_on_the_gpu(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    values = np.random.default_rng(2).standard_normal((8, 64), dtype=np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor(
        "w", gguf.quantize(values, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights = jw.load_weights(tmp_path / "q.gguf")
    on_gpu = weights.w.allocate(dtype=jw.DType.float32, device=jw.DeviceRef.GPU(0)).array
    on_cpu = jw.load_weights(tmp_path / "q.gguf").w.allocate(dtype=jw.DType.float32).array
    assert _on_gpu(on_gpu) and on_gpu.shape == (8, 64)
    np.testing.assert_allclose(np.asarray(on_gpu), np.asarray(on_cpu), rtol=1e-6, atol=1e-6)
    reference = gguf.dequantize(
        gguf.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_allclose(np.asarray(on_gpu), reference, rtol=1e-6, atol=1e-6)
