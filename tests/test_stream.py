"""Tests for `stream_layers`: one layer placed at a time, the previous one deleted and its pages released."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights._stream import stream_layers
from jaxweights.errors import ArgumentError, WeightNotFoundError
from jaxweights.formats import Checkpoint, TensorInfo

LAYERS, D, FF = 6, 16, 64


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {"model.embed.weight": rng.standard_normal((32, D), dtype=np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors[p + "norm.weight"] = rng.standard_normal(D, dtype=np.float32)
        tensors[p + "mlp.up.weight"] = rng.standard_normal((FF, D), dtype=np.float32)
        tensors[p + "mlp.down.weight"] = rng.standard_normal((D, FF), dtype=np.float32)
    return tensors


@pytest.fixture(params=["aligned", "reference"])
def model(request: pytest.FixtureRequest, tmp_path: Path, write_reference: Callable[..., Path]) -> Path:
    """The same model written 64-byte aligned (zero-copy on CPU) and by the reference writer (copied)."""
    if request.param == "aligned":
        return jw.save_file(_tensors(), tmp_path / "aligned.safetensors")
    return write_reference(_tensors(), "reference.safetensors")


def _block(x: jax.Array, layer: Any) -> jax.Array:
    h = x * layer["norm"]["weight"]
    return x + jax.nn.gelu(h @ layer["mlp"]["up"]["weight"].T) @ layer["mlp"]["down"]["weight"].T


def _live(weights: jw.Weights) -> list[str]:
    return [name for name, array in weights.allocated_weights.items() if not array.is_deleted()]


@pytest.mark.parametrize("mapped", [True, False])
def test_layers_equal_a_full_load_and_only_one_is_live(model: Path, mapped: bool) -> None:
    full = jw.load_weights(model).model.layers.to_pytree()
    weights = jw.load_weights(model, mmap=mapped)
    numbers = []
    for number, layer in stream_layers(weights.model.layers):
        numbers.append(number)
        jax.tree.map(np.testing.assert_array_equal, layer, full[number])
        assert {name.split(".")[2] for name in _live(weights)} == {str(number)}
        assert len(_live(weights)) == 3
    assert numbers == list(range(LAYERS))
    assert _live(weights) == []  # the last layer too, once the loop ends


def test_forward_pass_matches_a_full_load(model: Path) -> None:
    x = jax.random.normal(jax.random.key(0), (4, D), jnp.float32)
    expected = x
    for layer in jw.load_weights(model).model.layers.to_pytree():
        expected = _block(expected, layer)
    forward = jax.jit(_block)
    streamed = x
    for _, layer in stream_layers(jw.load_weights(model).model.layers):
        streamed = forward(streamed, layer)  # not waited for: deleting the inputs must still be safe
    np.testing.assert_allclose(np.asarray(streamed), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_previous_layer_is_deleted_when_the_loop_advances(model: Path) -> None:
    seen: list[list[jax.Array]] = []
    for number, layer in stream_layers(jw.load_weights(model).model.layers):
        current = jax.tree.leaves(layer)
        assert not any(array.is_deleted() for array in current)
        assert all(array.is_deleted() for arrays in seen for array in arrays), number
        seen.append(current)
    assert all(array.is_deleted() for arrays in seen for array in arrays)


@pytest.mark.parametrize("mapped", [True, False])
def test_pages_are_released_after_the_arrays_are_deleted(
    model: Path, mapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = jw.load_weights(model, mmap=mapped)
    calls: list[tuple[str, bool]] = []
    release = Checkpoint.release

    def recording(self: Checkpoint, info: TensorInfo, offset: int = 0, length: int | None = None) -> None:
        array = weights.allocated_weights.get(info.name)
        calls.append((info.name, array is not None and array.is_deleted()))
        release(self, info, offset, length)

    monkeypatch.setattr(Checkpoint, "release", recording)
    released_before: list[int] = []
    for _, _layer in stream_layers(weights.model.layers):
        released_before.append(sum(name.startswith("model.layers.") for name, _ in calls))
    layer_names = [n for n in _tensors() if n.startswith("model.layers.")]
    streamed = [(name, deleted) for name, deleted in calls if name in layer_names]
    assert sorted(name for name, _ in streamed) == sorted(layer_names)  # every tensor once
    assert all(deleted for _, deleted in streamed)  # each after its array was deleted
    assert released_before == [3 * i for i in range(LAYERS)]  # layer i's pages go when i + 1 starts


def test_break_releases_the_last_layer(model: Path) -> None:
    kept: list[jax.Array] = []
    for number, layer in stream_layers(jw.load_weights(model).model.layers):
        kept = jax.tree.leaves(layer)
        if number == 2:
            break
    assert all(array.is_deleted() for array in kept)


def test_a_kept_reference_is_deleted_and_a_copy_survives(model: Path) -> None:
    kept, copies = [], []
    for _, layer in stream_layers(jw.load_weights(model).model.layers):
        kept.append(layer["norm"]["weight"])
        copies.append(jnp.copy(layer["norm"]["weight"]))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(kept[0] + 1)
    for i, copy in enumerate(copies):
        np.testing.assert_array_equal(np.asarray(copy), _tensors()[f"model.layers.{i}.norm.weight"])


def test_dtype_and_sharding_as_in_to_pytree(model: Path) -> None:
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    for number, layer in stream_layers(
        jw.load_weights(model).model.layers, dtype="bfloat16", mesh=mesh, rules=[(r"up\.weight$", P("x"))]
    ):
        up = layer["mlp"]["up"]["weight"]
        assert up.dtype == jnp.bfloat16
        assert up.sharding == NamedSharding(mesh, P("x"))
        assert layer["norm"]["weight"].sharding == NamedSharding(mesh, P())
        expected = _tensors()[f"model.layers.{number}.mlp.up.weight"].astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(up), expected)


def test_children_must_be_numbered(model: Path) -> None:
    weights = jw.load_weights(model)
    with pytest.raises(ArgumentError, match=r"numbered children.*'model.embed'.*weights.model.layers"):
        next(stream_layers(weights.model))
    with pytest.raises(ArgumentError, match=r"'model.layers.0.norm.weight' is a tensor"):
        next(stream_layers(weights.model.layers[0].norm.weight))
    with pytest.raises(WeightNotFoundError, match=r"model\.layer"):
        next(stream_layers(weights.model.layer))
