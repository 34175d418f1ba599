"""Restore into targets: every restored leaf holds the source values bit for bit, laid out as asked."""

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
from jaxweights._pytree import path_name
from jaxweights.errors import StructureMismatchError


@pytest.fixture
def source() -> dict[str, np.ndarray]:
    """The arrays the checkpoint is saved from, by dotted name: what every restore must give back."""
    rng = np.random.default_rng(0)
    return {
        "encoder.layer.0.kernel": rng.standard_normal((8, 4), dtype=np.float32),
        "encoder.layer.1.kernel": rng.standard_normal((8, 4), dtype=np.float32),
        "encoder.norm.scale": np.linspace(0.5, 2.0, 4, dtype=np.float32),
        "step": np.asarray(3, np.int32),  # saved as a Python int; an abstract target asks for an array
    }


@pytest.fixture
def checkpoint(tmp_path: Path, source: dict[str, np.ndarray]) -> Path:
    return jw.save(
        {
            "encoder": {
                "layer": [{"kernel": jnp.asarray(source[f"encoder.layer.{i}.kernel"])} for i in range(2)],
                "norm": {"scale": jnp.asarray(source["encoder.norm.scale"])},
            },
            "step": int(source["step"]),
        },
        tmp_path / "ckpt",
    )


def assert_restored(tree: Any, source: dict[str, np.ndarray]) -> None:
    """Every array leaf of ``tree`` equals its source bit for bit, and so does each addressable shard."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = {path_name(p): a for p, a in leaves if isinstance(a, jax.Array)}
    assert arrays.keys() <= source.keys() and arrays
    for name, array in arrays.items():
        want = source[name]
        got = np.asarray(jax.device_get(array))
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), name
        for shard in array.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), want[shard.index]), (name, shard.device)


def abstract(tree: Any) -> Any:
    return jax.eval_shape(lambda: tree)


def target_tree() -> dict[str, Any]:
    return {
        "encoder": {
            "layer": [{"kernel": jnp.zeros((8, 4))} for _ in range(2)],
            "norm": {"scale": jnp.zeros(4)},
        },
        "step": 0,
    }


def test_restore_into_arrays_and_abstract_sharded_targets(
    checkpoint: Path, source: dict[str, np.ndarray]
) -> None:
    weights = jw.load_weights(checkpoint)
    target = target_tree()
    restored = weights.restore(target)
    assert_restored(restored, source)
    assert restored["step"] == 3 and target["step"] == 0  # the target is left alone
    assert not np.any(np.asarray(target["encoder"]["norm"]["scale"]))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharded = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=NamedSharding(mesh, P("x") if s.ndim == 2 else P())
        ),
        abstract(target_tree()),
    )
    restored = jw.load_weights(checkpoint).restore(sharded)
    kernel = restored["encoder"]["layer"][1]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P("x"))
    assert restored["encoder"]["norm"]["scale"].sharding == NamedSharding(mesh, P())
    assert_restored(restored, source)


def test_restore_onto_fewer_devices_and_other_shardings(
    checkpoint: Path, source: dict[str, np.ndarray]
) -> None:
    two = Mesh(np.array(jax.devices()[:2]), ("model",))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=NamedSharding(two, P(None, "model") if s.ndim == 2 else P())
        ),
        abstract(target_tree()),
    )
    restored = jw.restore(checkpoint, target)
    kernel = restored["encoder"]["layer"][0]["kernel"]
    assert len(kernel.sharding.device_set) == 2 and kernel.addressable_shards[0].data.shape == (8, 2)
    assert_restored(restored, source)  # each device holds its own columns of the source


def test_every_difference_is_reported_at_once_before_reading(checkpoint: Path) -> None:
    weights = jw.load_weights(checkpoint)
    target = {
        "encoder": {
            "layer": [{"kernel": jnp.zeros((4, 8))}, {"kernal": jnp.zeros((8, 4))}],
            "norm": {"scale": jnp.zeros(4, jnp.bfloat16)},
        },
        "epoch": 0,
    }
    with pytest.raises(StructureMismatchError) as caught:
        weights.restore(target)
    message = str(caught.value)
    assert "disagree in 5 place(s)" in message
    assert (
        "missing from the checkpoint (2):\n    encoder.layer.1.kernal; closest in the checkpoint: 'encoder.layer.1.kernel'\n    epoch (an int leaf"
        in message
    )
    assert "in the checkpoint but not in the target (1):\n    encoder.layer.1.kernel" in message
    assert (
        "encoder.layer.0.kernel: target shape (4, 8), checkpoint 'encoder.layer.0.kernel' has (8, 4)"
        in message
    )
    assert (
        "encoder.norm.scale: target dtype bfloat16, checkpoint 'encoder.norm.scale' has float32 (pass cast=True"
        in message
    )
    assert weights.checkpoint.bytes_copied == 0 and weights.allocated_weights == {}


def test_cast_and_non_strict(checkpoint: Path, source: dict[str, np.ndarray]) -> None:
    target = target_tree()
    target["encoder"]["norm"]["scale"] = jnp.zeros(4, jnp.bfloat16)
    restored = jw.restore(checkpoint, target, cast=True)
    scale = restored["encoder"]["norm"]["scale"]
    assert scale.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(scale), source["encoder.norm.scale"].astype(jnp.bfloat16))
    assert_restored({"encoder": {"layer": restored["encoder"]["layer"]}}, source)
    partial = {"encoder": {"norm": {"scale": jnp.zeros(4)}}, "lr": 0.1}
    with pytest.raises(StructureMismatchError, match="in the checkpoint but not in the target"):
        jw.restore(checkpoint, partial)
    restored = jw.restore(checkpoint, partial, strict=False)
    assert restored["lr"] == 0.1
    assert_restored(restored, source)


def test_restore_a_subtree(checkpoint: Path, source: dict[str, np.ndarray]) -> None:
    layer = (
        jw.load_weights(checkpoint)
        .encoder.layer[0]
        .restore({"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
    )
    assert_restored(layer, {"kernel": source["encoder.layer.0.kernel"]})


def test_keymap_renames_and_sharded_transposes(tmp_path: Path, write_reference: Callable[..., Path]) -> None:
    rng = np.random.default_rng(1)
    torch_like = {
        "dense.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "dense.bias": rng.standard_normal(16, dtype=np.float32),
    }
    weights = jw.load_weights(write_reference(torch_like))
    mesh = Mesh(np.array(jax.devices()), ("x",))
    target = {
        "dense": {
            "kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "x"))),
            "bias": jax.ShapeDtypeStruct((16,), jnp.float32),
        }
    }
    restored = weights.restore(target, keymap=jw.TORCH_TO_FLAX)
    kernel = restored["dense"]["kernel"]
    assert_restored(
        restored, {"dense.kernel": torch_like["dense.weight"].T, "dense.bias": torch_like["dense.bias"]}
    )
    assert kernel.sharding == NamedSharding(mesh, P(None, "x"))
    assert (
        weights.checkpoint.bytes_copied == torch_like["dense.weight"].nbytes + torch_like["dense.bias"].nbytes
    )
    # ^ each row read once, no gather
    custom = jw.KeyMap(renames=((r"^layer\.", "dense."),), transforms=((r"weight$", lambda x: x * 2),))
    doubled = weights.restore({"layer": {"weight": jnp.zeros((16, 8))}}, keymap=custom, strict=False)
    np.testing.assert_array_equal(np.asarray(doubled["layer"]["weight"]), torch_like["dense.weight"] * 2)


def test_torch_linear_into_flax_nnx(tmp_path: Path) -> None:
    import safetensors.torch
    import torch
    from flax import nnx

    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    norm = torch.nn.LayerNorm(3)
    state = {f"proj.{k}": v for k, v in linear.state_dict().items()} | {
        f"ln.{k}": v for k, v in norm.state_dict().items()
    }
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(state, str(path))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = nnx.Linear(5, 3, rngs=rngs)
            self.ln = nnx.LayerNorm(3, epsilon=1e-5, rngs=rngs)  # torch's default epsilon

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.ln(self.proj(x))  # type: ignore[no-any-return]

    fresh = Model(nnx.Rngs(1))
    before = jax.device_get(nnx.state(fresh))
    model = jw.restore(path, fresh, keymap=jw.TORCH_TO_FLAX)
    assert isinstance(model, Model) and model is not fresh
    torch_values = {k: v.detach().numpy() for k, v in state.items()}
    assert_restored(
        nnx.to_pure_dict(nnx.state(model)),
        {
            "proj.kernel": torch_values["proj.weight"].T,
            "proj.bias": torch_values["proj.bias"],
            "ln.scale": torch_values["ln.weight"],
            "ln.bias": torch_values["ln.bias"],
        },
    )
    for (p, a), (_, b) in zip(
        *(jax.tree_util.tree_flatten_with_path(t)[0] for t in (nnx.state(fresh), before)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=path_name(p))  # the target is untouched
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    expected = norm(linear(torch.from_numpy(x))).detach().numpy()  # torch and XLA: close, not bit-equal
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_equinox_module_restore_keeps_static_leaves(tmp_path: Path) -> None:
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.PRNGKey(0))
    folder = jw.save(model, tmp_path / "mlp")
    skeleton = eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 8, 2, key=jax.random.PRNGKey(1))
    restored = jw.restore(folder, skeleton)
    arrays = eqx.filter(model, eqx.is_array)
    source = {path_name(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(arrays)[0]}
    assert_restored(restored, source)
    assert len(jax.tree.leaves(eqx.filter(restored, eqx.is_array))) == len(source)
    assert restored.activation is model.activation
    assert jax.tree.structure(restored) == jax.tree.structure(model)  # type: ignore[operator]


def test_safetensors_flax_checkpoints_restore(tmp_path: Path) -> None:
    from safetensors.flax import save_file

    source = {
        "Dense_0.kernel": np.arange(6, dtype=np.float32).reshape(3, 2),
        "Dense_0.bias": np.ones(2, np.float32),
    }
    save_file({k: jnp.asarray(v) for k, v in source.items()}, str(tmp_path / "flax.safetensors"))
    restored = jw.restore(
        tmp_path / "flax.safetensors", {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    )
    assert_restored(restored, source)
