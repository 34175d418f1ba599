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
from jaxweights.errors import StructureMismatchError


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return jw.save(
        {
            "encoder": {
                "layer": [
                    {"kernel": jnp.asarray(rng.standard_normal((8, 4), dtype=np.float32))} for _ in range(2)
                ],
                "norm": {"scale": jnp.ones(4)},
            },
            "step": 3,
        },
        tmp_path / "ckpt",
    )


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


def test_restore_into_arrays_and_abstract_sharded_targets(checkpoint: Path) -> None:
    weights = jw.load_weights(checkpoint)
    reference = weights.encoder.layer[1].kernel.data().data
    target = target_tree()
    restored = weights.restore(target)
    np.testing.assert_array_equal(np.asarray(restored["encoder"]["layer"][1]["kernel"]), reference)
    assert restored["step"] == 3 and target["step"] == 0  # the target is left alone
    assert float(target["encoder"]["norm"]["scale"][0]) == 0.0
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
    np.testing.assert_array_equal(np.asarray(kernel), reference)


def test_restore_onto_fewer_devices_and_other_shardings(checkpoint: Path) -> None:
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


def test_cast_and_non_strict(checkpoint: Path) -> None:
    target = target_tree()
    target["encoder"]["norm"]["scale"] = jnp.zeros(4, jnp.bfloat16)
    restored = jw.restore(checkpoint, target, cast=True)
    assert restored["encoder"]["norm"]["scale"].dtype == jnp.bfloat16
    partial = {"encoder": {"norm": {"scale": jnp.zeros(4)}}, "lr": 0.1}
    with pytest.raises(StructureMismatchError, match="in the checkpoint but not in the target"):
        jw.restore(checkpoint, partial)
    restored = jw.restore(checkpoint, partial, strict=False)
    assert restored["lr"] == 0.1 and float(restored["encoder"]["norm"]["scale"][0]) == 1.0


def test_restore_a_subtree(checkpoint: Path) -> None:
    layer = (
        jw.load_weights(checkpoint)
        .encoder.layer[0]
        .restore({"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
    )
    assert layer["kernel"].shape == (8, 4)


def test_keymap_renames_and_sharded_transposes(tmp_path: Path, write_reference: Callable[..., Path]) -> None:
    rng = np.random.default_rng(1)
    torch_like = {
        "dense.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "dense.bias": np.zeros(16, np.float32),
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
    np.testing.assert_array_equal(np.asarray(kernel), torch_like["dense.weight"].T)
    assert kernel.sharding == NamedSharding(mesh, P(None, "x"))
    assert (
        weights.checkpoint.bytes_copied == torch_like["dense.weight"].nbytes + 64
    )  # rows read once, no gather
    custom = jw.KeyMap(renames=((r"^layer\.", "dense."),), transforms=((r"weight$", lambda x: x * 2),))
    doubled = weights.restore({"layer": {"weight": jnp.zeros((16, 8))}}, keymap=custom, strict=False)
    np.testing.assert_allclose(np.asarray(doubled["layer"]["weight"]), torch_like["dense.weight"] * 2)


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
    model = jw.restore(path, fresh, keymap=jw.TORCH_TO_FLAX)
    assert isinstance(model, Model) and model is not fresh
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    expected = norm(linear(torch.from_numpy(x))).detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(fresh(jnp.asarray(x))), expected, atol=1e-3)  # the target is untouched


def test_equinox_module_restore_keeps_static_leaves(tmp_path: Path) -> None:
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.PRNGKey(0))
    folder = jw.save(model, tmp_path / "mlp")
    skeleton = eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 8, 2, key=jax.random.PRNGKey(1))
    restored = jw.restore(folder, skeleton)
    x = jnp.ones(3)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    assert restored.activation is model.activation


def test_safetensors_flax_checkpoints_restore(tmp_path: Path) -> None:
    from safetensors.flax import save_file

    params = {"Dense_0.kernel": jnp.ones((3, 2)), "Dense_0.bias": jnp.zeros(2)}
    save_file(params, str(tmp_path / "flax.safetensors"))
    restored = jw.restore(
        tmp_path / "flax.safetensors", {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.ones(2)}}
    )
    assert float(restored["Dense_0"]["kernel"][0, 0]) == 1.0 and float(restored["Dense_0"]["bias"][0]) == 0.0
