"""Restore into targets: every restored leaf holds the source values bit for bit, laid out as asked."""

from __future__ import annotations

import logging
import re
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
from jaxweights._restore import RestoreReport
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


def restore_reported(path: Path, target: Any, **options: Any) -> tuple[Any, RestoreReport]:
    """``jw.restore(path, target, report=True, **options)``, checked to return a `jw.RestoreReport`."""
    restored, report = jw.restore(path, target, report=True, **options)
    assert isinstance(report, jw.RestoreReport)
    return restored, report


def assert_same_leaves(got: Any, want: Any) -> None:
    """Every leaf of ``got`` equals ``want``'s bit for bit (dtype, shape and bytes), path by path."""
    got_leaves, want_leaves = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (got, want))
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), path_name(path)


def fix_line(error: pytest.ExceptionInfo[StructureMismatchError]) -> str:
    return str(error.value).rsplit("\n", 1)[-1]


def test_pretrained_encoder_under_a_fresh_nnx_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flax import nnx

    class Encoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)

    class Pretraining(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.encoder = Encoder(rngs)
            self.lm_head = nnx.Linear(8, 16, rngs=rngs)

    class Classifier(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.encoder = Encoder(rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

    pretrained = Pretraining(nnx.Rngs(0))
    path = jw.save(pretrained, tmp_path / "pretrained")
    fresh = Classifier(nnx.Rngs(1))
    with caplog.at_level(logging.INFO, logger="jaxweights"):
        model = jw.restore(path, fresh, strict=False)  # the whole job: one call
    assert isinstance(model, Classifier) and model is not fresh
    assert_same_leaves(nnx.state(model.encoder), nnx.state(pretrained.encoder))
    assert_same_leaves(nnx.state(model.head), nnx.state(fresh.head))  # the fresh initialisation, kept
    warning, info = (r for r in caplog.records if r.name == "jaxweights")
    assert warning.levelno == logging.WARNING and info.levelno == logging.INFO
    assert "not in the checkpoint (2):\n    head.bias\n    head.kernel" in warning.getMessage()
    assert "in the checkpoint, not used (2):\n    lm_head.bias\n    lm_head.kernel" in info.getMessage()

    _, report = restore_reported(path, fresh, strict=False)
    assert report == RestoreReport(
        missing=("head.bias", "head.kernel"), unused=("lm_head.bias", "lm_head.kernel")
    )

    with pytest.raises(
        StructureMismatchError, match=r"Fix: .*, or pass strict=False to keep the target's own"
    ):
        jw.restore(path, fresh)
    abstract_model = nnx.eval_shape(lambda: Classifier(nnx.Rngs(1)))
    with pytest.raises(
        StructureMismatchError,
        match=r"missing from the checkpoint \(2\):\n    head\.bias \(abstract: no value",
    ) as caught:
        jw.restore(path, abstract_model, strict=False)
    assert "head.kernel (abstract: no value of its own to keep)" in str(caught.value)
    assert "strict=False" not in fix_line(caught)  # it was passed already
    assert "give each abstract leaf listed a concrete array" in fix_line(caught)


def test_pretrained_encoder_under_a_fresh_equinox_head(tmp_path: Path) -> None:
    import equinox as eqx

    class Classifier(eqx.Module):
        encoder: eqx.nn.MLP
        head: eqx.nn.Linear

    pretrained = eqx.nn.MLP(3, 8, 8, 1, key=jax.random.PRNGKey(0))
    path = jw.save({"encoder": pretrained}, tmp_path / "encoder")
    keys = jax.random.split(jax.random.PRNGKey(1))
    fresh = Classifier(eqx.nn.MLP(3, 8, 8, 1, key=keys[0]), eqx.nn.Linear(8, 2, key=keys[1]))
    model, report = restore_reported(path, fresh, strict=False)
    assert isinstance(model, Classifier) and model.encoder.activation is fresh.encoder.activation
    assert_same_leaves(eqx.filter(model.encoder, eqx.is_array), eqx.filter(pretrained, eqx.is_array))
    assert_same_leaves(model.head, fresh.head)
    assert report == RestoreReport(missing=("head.bias", "head.weight"))
    assert_same_leaves(jw.restore(path, fresh, strict=False), model)


def test_partial_plain_pytree_keeps_concrete_leaves_and_reports(
    checkpoint: Path, source: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    head = {
        "kernel": np.random.default_rng(2).standard_normal((4, 2), dtype=np.float32),
        "scale": np.float32(2),
    }
    target = {
        "encoder": {"layer": [{"kernel": jnp.zeros((8, 4))}], "norm": {"scale": jnp.zeros(4)}},
        "head": head,
        "step": 0,
        "lr": 0.5,
    }
    restored, report = restore_reported(checkpoint, target, strict=False)
    assert_restored(restored["encoder"], {k.removeprefix("encoder."): v for k, v in source.items()})
    assert restored["head"]["kernel"] is head["kernel"] and restored["head"]["scale"] is head["scale"]
    assert (restored["step"], restored["lr"]) == (3, 0.5)
    assert report == RestoreReport(
        missing=("head.kernel", "head.scale", "lr"), unused=("encoder.layer.1.kernel",)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxweights"):
        jw.restore(checkpoint, target, strict=False)
    (record,) = caplog.records  # INFO (the unused tensor) is below the level asked for
    assert record.levelno == logging.WARNING and "head.kernel\n    head.scale\n    lr" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxweights"):
        jw.restore(checkpoint, target_tree())  # a complete, exact restore says nothing
    assert not caplog.records


def test_strict_false_still_reports_abstract_leaves_and_shapes(checkpoint: Path) -> None:
    target = {
        "encoder": {"layer": [{"kernel": jnp.zeros((4, 8))}], "norm": {"scale": jnp.zeros(4)}},
        "head": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)},
    }
    with pytest.raises(StructureMismatchError, match="disagree in 3 place") as caught:
        jw.restore(checkpoint, target)
    assert re.search(r"Fix: .*, pass strict=False to keep the target's own values", fix_line(caught))
    with pytest.raises(StructureMismatchError, match="disagree in 2 place") as caught:
        jw.restore(checkpoint, target, strict=False)
    message = str(caught.value)
    assert "head.kernel (abstract: no value of its own to keep)" in message
    assert (
        "encoder.layer.0.kernel: target shape (4, 8), checkpoint 'encoder.layer.0.kernel' has (8, 4)"
        in message
    )
    assert "strict=False" not in fix_line(caught)
    assert fix_line(caught).endswith(
        "give each abstract leaf listed a concrete array (its value is then kept), or pass "
        "ignore_mismatched_sizes=True to keep the target's values where shapes differ."
    )


def test_ignore_mismatched_sizes_keeps_concrete_leaves(
    checkpoint: Path, source: dict[str, np.ndarray]
) -> None:
    wide = jnp.arange(5.0)
    target = target_tree()
    target["encoder"]["norm"]["scale"] = wide
    with pytest.raises(
        StructureMismatchError, match=r"target shape \(5,\), checkpoint 'encoder.norm.scale' has \(4,\)"
    ):
        jw.restore(checkpoint, target, strict=False)  # strict=False is about names, not shapes
    restored, report = restore_reported(checkpoint, target, ignore_mismatched_sizes=True)
    assert restored["encoder"]["norm"]["scale"] is wide
    assert_restored({"encoder": {"layer": restored["encoder"]["layer"]}}, source)
    assert report == RestoreReport(mismatched=("encoder.norm.scale",))  # used, so not unused either
    target["encoder"]["norm"]["scale"] = jax.ShapeDtypeStruct((5,), jnp.float32)
    with pytest.raises(StructureMismatchError, match=r"has \(4,\) \(abstract: no value of its own to keep\)"):
        restore_reported(checkpoint, target, ignore_mismatched_sizes=True)


def test_report_lists_casts_and_transforms(checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = target_tree()
    target["encoder"]["norm"]["scale"] = jnp.zeros(4, jnp.bfloat16)
    target["encoder"]["layer"][1]["kernel"] = jnp.zeros((4, 8), jnp.bfloat16)
    keymap = jw.KeyMap(transforms=((r"layer\.1\.kernel$", jw.Transpose()),))
    with caplog.at_level(logging.INFO, logger="jaxweights"):
        _, report = restore_reported(checkpoint, target, cast=True, keymap=keymap)
    assert report == RestoreReport(
        converted={
            "encoder.layer.1.kernel": "transformed by Transpose(axes=None), float32 -> bfloat16",
            "encoder.norm.scale": "float32 -> bfloat16",
        }
    )
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "converted (2):\n    encoder.layer.1.kernel: transformed" in (
        record.getMessage()
    )
