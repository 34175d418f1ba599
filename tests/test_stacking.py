"""Scan-ready pytrees through the public API: `Weights.to_pytree(stack=...)`, `restore(..., stack=...)`
and the `Concat` / `Split` keymap transforms (the composite reads themselves: tests/test_compose.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights.errors import ArgumentError, StructureMismatchError

Writer = Callable[..., Path]


def _layers(count: int = 3, rows: int = 8, cols: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(count)
    tensors: dict[str, np.ndarray] = {"model.embed.weight": rng.standard_normal((5, cols), dtype=np.float32)}
    for i in range(count):
        tensors[f"model.layers.{i}.attn.q_proj.weight"] = rng.standard_normal((rows, cols), dtype=np.float32)
        tensors[f"model.layers.{i}.attn.k_proj.weight"] = rng.standard_normal((rows, cols), dtype=np.float32)
        tensors[f"model.layers.{i}.attn.v_proj.weight"] = rng.standard_normal((rows, cols), dtype=np.float32)
        tensors[f"model.layers.{i}.norm.weight"] = rng.standard_normal(cols, dtype=np.float32)
        tensors[f"model.layers.{i}.step"] = np.array(i, np.int32)
    return tensors


def _stacked(tensors: dict[str, np.ndarray], rest: str, count: int = 3) -> np.ndarray:
    return np.stack([tensors[f"model.layers.{i}.{rest}"] for i in range(count)])


def _mesh(shape: tuple[int, ...] = (8,), names: tuple[str, ...] = ("x",)) -> Mesh:
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


# --- to_pytree(stack=...) ----------------------------------------------------------------------------


def test_to_pytree_stacks_numbered_children(write_reference: Writer) -> None:
    tensors = _layers()
    weights = jw.load_weights(write_reference(tensors))
    tree = weights.model.layers.to_pytree(stack=True)
    assert sorted(tree) == ["attn", "norm", "step"]
    q = tree["attn"]["q_proj"]["weight"]
    assert q.shape == (3, 8, 4)
    np.testing.assert_array_equal(np.asarray(q), _stacked(tensors, "attn.q_proj.weight"))
    np.testing.assert_array_equal(np.asarray(tree["step"]), [0, 1, 2])
    assert weights.allocated_weights == {}  # stacked leaves are not checkpoint tensors


def test_to_pytree_stack_prefix_keeps_the_rest(write_reference: Writer) -> None:
    tensors = _layers()
    weights = jw.load_weights(write_reference(tensors))
    for stack in ("model.layers", ["model.layers"]):
        tree = weights.to_pytree(stack=stack)
        np.testing.assert_array_equal(
            np.asarray(tree["model"]["embed"]["weight"]), tensors["model.embed.weight"]
        )
        norm = tree["model"]["layers"]["norm"]["weight"]
        np.testing.assert_array_equal(np.asarray(norm), _stacked(tensors, "norm.weight"))
    relative = weights.model.to_pytree(stack="layers")
    assert relative["layers"]["attn"]["v_proj"]["weight"].shape == (3, 8, 4)


def test_to_pytree_stack_shards_by_rules_on_stacked_names(write_reference: Writer) -> None:
    tensors = _layers(count=4, rows=16)
    weights = jw.load_weights(write_reference(tensors))
    mesh = _mesh((2, 4), ("stage", "model"))
    rules = [
        (r"^model\.layers\.attn\.q_proj\.weight$", P(None, "model", None)),
        (r"^model\.layers\.attn\.k_proj\.weight$", P("stage", None, "model")),
    ]
    tree = weights.model.layers.to_pytree(stack=True, mesh=mesh, rules=rules, dtype="bfloat16")
    q, k = tree["attn"]["q_proj"]["weight"], tree["attn"]["k_proj"]["weight"]
    assert q.sharding == NamedSharding(mesh, P(None, "model", None))
    assert k.sharding == NamedSharding(mesh, P("stage", None, "model"))
    assert q.dtype == jnp.bfloat16 and tree["step"].dtype == jnp.int32  # the dtype rule: floats only
    expected = _stacked(tensors, "attn.q_proj.weight", 4).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(q), expected)
    for shard in k.addressable_shards:
        np.testing.assert_array_equal(
            np.asarray(shard.data),
            _stacked(tensors, "attn.k_proj.weight", 4)[shard.index].astype(ml_dtypes.bfloat16),
        )
    abstract = weights.model.layers.to_pytree(stack=True, mesh=mesh, rules=rules, shapes_only=True)
    leaf = abstract["attn"]["q_proj"]["weight"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (4, 16, 4)
    assert leaf.sharding == NamedSharding(mesh, P(None, "model", None))


def test_to_pytree_stack_under_scan(write_reference: Writer) -> None:
    tensors = _layers()
    layers = jw.load_weights(write_reference(tensors)).model.layers.to_pytree(stack=True)

    def step(h: jax.Array, layer: dict[str, Any]) -> tuple[jax.Array, None]:
        return h * layer["norm"]["weight"], None

    out, _ = jax.lax.scan(step, jnp.ones(4), layers)
    expected = np.prod(_stacked(tensors, "norm.weight"), axis=0)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.update(
                {f"model.layers.3.{k.split('.', 3)[3]}": v for k, v in t.items() if ".2." in k}
            ),
            None,
        ),
        (lambda t: t.__setitem__("model.layers.1.norm.weight", np.ones(5, np.float32)), r"\(5,\)"),
        (lambda t: t.__setitem__("model.layers.2.norm.weight", np.ones(4, np.float16)), "float16"),
        (lambda t: t.pop("model.layers.1.norm.weight"), "norm.weight"),
    ],
    ids=["gap", "shape", "dtype", "missing-name"],
)
def test_to_pytree_stack_refuses_uneven_layers(write_reference: Writer, edit: Any, match: str | None) -> None:
    tensors = _layers()
    edit(tensors)
    if match is None:  # the gap case: layers 0, 1, 3 (layer 2 removed after copying it to 3)
        for key in [k for k in tensors if k.startswith("model.layers.2.")]:
            del tensors[key]
        match = "layer 2 is missing"
    weights = jw.load_weights(write_reference(tensors))
    with pytest.raises(jw.errors.WeightsError, match=match) as caught:
        weights.model.layers.to_pytree(stack=True)
    assert isinstance(caught.value, ValueError)


def test_to_pytree_stack_argument_errors(write_reference: Writer) -> None:
    weights = jw.load_weights(write_reference(_layers()))
    with pytest.raises(StructureMismatchError, match=r"model\.layerz"):
        weights.to_pytree(stack="model.layerz")
    with pytest.raises(ArgumentError, match=r"stack="):
        weights.to_pytree(stack=3)  # type: ignore[arg-type]


# --- restore(..., stack=...) -------------------------------------------------------------------------


def _stacked_target(
    tensors: dict[str, np.ndarray], count: int = 3, dtype: Any = jnp.float32
) -> dict[str, Any]:
    return {
        "model": {
            "embed": {"weight": jnp.zeros((5, 4), dtype)},
            "layers": {
                "attn": {
                    name: {"weight": jnp.zeros((count, 8, 4), dtype)}
                    for name in ("q_proj", "k_proj", "v_proj")
                },
                "norm": {"weight": jnp.zeros((count, 4), dtype)},
                "step": jnp.zeros(count, jnp.int32),
            },
        }
    }


def test_restore_stacked_target(write_reference: Writer) -> None:
    tensors = _layers()
    path = write_reference(tensors)
    target = jax.eval_shape(lambda: _stacked_target(tensors))
    restored, report = jw.restore(path, target, stack=["model.layers"], report=True)
    np.testing.assert_array_equal(
        np.asarray(restored["model"]["layers"]["attn"]["k_proj"]["weight"]),
        _stacked(tensors, "attn.k_proj.weight"),
    )
    np.testing.assert_array_equal(
        np.asarray(restored["model"]["embed"]["weight"]), tensors["model.embed.weight"]
    )
    assert report.converted["model.layers.norm.weight"] == "stacked from 3 layers"
    assert report.unused == ()


def test_restore_stacked_sharded_cast_and_transposed(write_reference: Writer) -> None:
    tensors = _layers()
    path = write_reference(tensors)
    mesh = _mesh()
    sharding = NamedSharding(mesh, P(None, None, "x"))
    target = {
        "layers": {
            "attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((3, 4, 8), jnp.bfloat16, sharding=sharding)}}
        }
    }
    keymap = jw.KeyMap(renames=((r"^layers\.", "model.layers."),)) + jw.TORCH_TO_FLAX
    restored = jw.load_weights(path).restore(target, keymap=keymap, stack="layers", strict=False, cast=True)
    kernel = restored["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding == sharding and kernel.dtype == jnp.bfloat16
    expected = _stacked(tensors, "attn.q_proj.weight").transpose(0, 2, 1).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


@pytest.mark.parametrize(
    ("count", "drop", "match"),
    [
        (4, None, "holds 4 layers, the checkpoint 3"),
        (2, None, "holds 2 layers, but the checkpoint holds 3"),
        (3, 1, "layer 1 is missing while layer 2 exists"),
    ],
    ids=["target-deeper", "checkpoint-deeper", "gap"],
)
def test_restore_stacked_layer_counts(
    write_reference: Writer, count: int, drop: int | None, match: str
) -> None:
    tensors = _layers()
    if drop is not None:
        for key in [k for k in tensors if k.startswith(f"model.layers.{drop}.")]:
            del tensors[key]
    target = {"model": {"layers": {"norm": {"weight": jnp.zeros((count, 4))}}}}
    with pytest.raises(StructureMismatchError, match=match):
        jw.restore(write_reference(tensors), target, stack="model.layers", strict=False)


def test_restore_stacked_layers_that_differ_are_reported_with_the_rest(write_reference: Writer) -> None:
    tensors = _layers()
    tensors["model.layers.2.norm.weight"] = np.ones(6, np.float32)
    target = _stacked_target(tensors)
    target["model"]["embed"]["weight"] = jnp.zeros((9, 4))
    with pytest.raises(StructureMismatchError, match=r"(?s)2 place\(s\).*model.layers.2.norm.weight.*\(6,\)"):
        jw.restore(write_reference(tensors), target, stack="model.layers")


def test_restore_stack_argument_checked(write_reference: Writer) -> None:
    tensors = _layers()
    with pytest.raises(ArgumentError, match=r"model.layer'? matches no leaf"):
        jw.restore(write_reference(tensors), _stacked_target(tensors), stack="model.layer")
    target = {"model": {"layers": {"step": jnp.zeros((), jnp.int32)}}}
    with pytest.raises(StructureMismatchError, match="leading layer axis"):
        jw.restore(write_reference(tensors), target, stack="model.layers", strict=False)


def test_restore_equinox_vmapped_module(write_reference: Writer) -> None:
    eqx = pytest.importorskip("equinox")

    class Model(eqx.Module):  # type: ignore[misc, name-defined]
        layers: Any

    keys = jax.random.split(jax.random.key(0), 3)
    model = Model(eqx.filter_vmap(lambda key: eqx.nn.Linear(4, 6, key=key))(keys))
    rng = np.random.default_rng(1)
    tensors = {
        f"layers.{i}.{n}": rng.standard_normal(s, dtype=np.float32)
        for i in range(3)
        for n, s in (("weight", (6, 4)), ("bias", (6,)))
    }
    restored = jw.restore(write_reference(tensors), model, stack="layers")
    assert isinstance(restored, Model)
    np.testing.assert_array_equal(
        np.asarray(restored.layers.weight), np.stack([tensors[f"layers.{i}.weight"] for i in range(3)])
    )
    out = eqx.filter_vmap(lambda layer, x: layer(x), in_axes=(eqx.if_array(0), None))(
        restored.layers, jnp.ones(4)
    )
    assert out.shape == (3, 6)


def test_restore_flax_nnx_scanned_module(write_reference: Writer) -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):  # type: ignore[misc, name-defined]
        def __init__(self, rngs: Any) -> None:
            self.linear = nnx.Linear(4, 4, rngs=rngs)

    class Model(nnx.Module):  # type: ignore[misc, name-defined]
        def __init__(self, rngs: Any) -> None:
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs: Any) -> Block:
                return Block(rngs)

            self.layers = create(rngs)

    model = Model(nnx.Rngs(0))
    rng = np.random.default_rng(2)
    tensors = {
        f"layers.{i}.linear.{n}": rng.standard_normal(s, dtype=np.float32)
        for i in range(3)
        for n, s in (("kernel", (4, 4)), ("bias", (4,)))
    }
    restored = jw.restore(write_reference(tensors), model, stack="layers")
    kernel = restored.layers.linear.kernel
    kernel = kernel.get_value() if hasattr(kernel, "get_value") else kernel.value
    np.testing.assert_array_equal(
        np.asarray(kernel), np.stack([tensors[f"layers.{i}.linear.kernel"] for i in range(3)])
    )


# --- Concat and Split --------------------------------------------------------------------------------


def test_concat_fills_a_fused_target_per_shard(write_reference: Writer) -> None:
    tensors = _layers()
    path = write_reference(tensors)
    mesh = _mesh()
    sharding = NamedSharding(mesh, P("x"))
    keymap = jw.KeyMap(
        renames=((r"^", "model.layers.0."),),
        transforms=((r"qkv_proj", jw.Concat(["q_proj", "k_proj", "v_proj"], axis=0)),),
    )
    target = {"attn": {"qkv_proj": {"weight": jax.ShapeDtypeStruct((24, 4), jnp.float32, sharding=sharding)}}}
    restored, report = jw.restore(path, target, keymap=keymap, strict=False, report=True)
    fused = restored["attn"]["qkv_proj"]["weight"]
    parts = [tensors[f"model.layers.0.attn.{p}_proj.weight"] for p in "qkv"]
    np.testing.assert_array_equal(np.asarray(fused), np.concatenate(parts))
    assert fused.sharding == sharding
    assert report.converted["attn.qkv_proj.weight"].startswith("concatenated from 3 tensors")


def test_concat_then_torch_kernel_stacked(write_reference: Writer) -> None:
    tensors = _layers()
    keymap = (
        jw.KeyMap(
            renames=((r"^layers\.", "model.layers."),),
            transforms=((r"qkv\.", jw.Concat(["q_proj.", "k_proj.", "v_proj."])),),
        )
        + jw.TORCH_TO_FLAX
    )
    sharding = NamedSharding(_mesh(), P(None, None, "x"))
    target = {
        "layers": {
            "attn": {"qkv": {"kernel": jax.ShapeDtypeStruct((3, 4, 24), jnp.float32, sharding=sharding)}}
        }
    }
    restored = jw.restore(write_reference(tensors), target, keymap=keymap, stack="layers", strict=False)
    expected = np.stack(
        [
            np.concatenate([tensors[f"model.layers.{i}.attn.{p}_proj.weight"] for p in "qkv"]).T
            for i in range(3)
        ]
    )
    np.testing.assert_array_equal(np.asarray(restored["layers"]["attn"]["qkv"]["kernel"]), expected)


def test_concat_of_unequal_parts_is_reported(write_reference: Writer) -> None:
    tensors = _layers()
    tensors["model.layers.0.attn.k_proj.weight"] = np.ones((8, 5), np.float32)
    keymap = jw.KeyMap(
        renames=((r"^", "model.layers.0."),), transforms=((r"qkv_proj", jw.Concat(["q_proj", "k_proj"])),)
    )
    target = {"attn": {"qkv_proj": {"weight": jnp.zeros((16, 4))}}}
    with pytest.raises(StructureMismatchError, match=r"(?s)attn.qkv_proj.weight.*k_proj.weight.*\(8, 5\)"):
        jw.restore(write_reference(tensors), target, keymap=keymap, strict=False)


def test_split_gpt2_c_attn(write_reference: Writer) -> None:
    rng = np.random.default_rng(3)
    tensors = {
        "h.0.attn.c_attn.weight": rng.standard_normal((4, 24), dtype=np.float32),  # Conv1D: (in, 3 * out)
        "h.0.attn.c_attn.bias": rng.standard_normal(24, dtype=np.float32),
    }
    keymap = jw.KeyMap(
        transforms=tuple(
            (rf"attn\.{part}\.", jw.Split("attn.c_attn.", index=i, sections=3))
            for i, part in enumerate("qkv")
        )
    )
    sharding = NamedSharding(_mesh(), P(None, "x"))
    target = {
        "h": {
            "0": {
                "attn": {
                    p: {
                        "weight": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding),
                        "bias": jnp.zeros(8),
                    }
                    for p in "qkv"
                }
            }
        }
    }
    restored, report = jw.restore(write_reference(tensors), target, keymap=keymap, report=True)
    for i, part in enumerate("qkv"):
        got = restored["h"]["0"]["attn"][part]
        np.testing.assert_array_equal(
            np.asarray(got["weight"]), tensors["h.0.attn.c_attn.weight"][:, 8 * i : 8 * i + 8]
        )
        np.testing.assert_array_equal(
            np.asarray(got["bias"]), tensors["h.0.attn.c_attn.bias"][8 * i : 8 * i + 8]
        )
        assert got["weight"].sharding == sharding
    assert report.unused == ()
    assert report.converted["h.0.attn.k.weight"] == "part 1 of 'h.0.attn.c_attn.weight'"


def test_split_that_does_not_divide_is_reported(write_reference: Writer) -> None:
    tensors = {"c_attn.weight": np.ones((4, 10), np.float32)}
    keymap = jw.KeyMap(transforms=((r"^q\.", jw.Split("c_attn.", index=0, sections=3)),))
    with pytest.raises(StructureMismatchError, match=r"(?s)q.weight.*10.*3"):
        jw.restore(
            write_reference(tensors), {"q": {"weight": jnp.zeros((4, 3))}}, keymap=keymap, strict=False
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: jw.Concat([]), "replacement strings"),
        (lambda: jw.Concat(["a"], axis=1.5), "axis must be an int"),  # type: ignore[arg-type]
        (lambda: jw.Split("c", index=3, sections=3), r"index must be an int in 0\.\.2"),
        (lambda: jw.Split("c", index=0, sections=(2, -1)), "sizes"),
        (lambda: jw.Split("c", index=0, sections=0), "at least one section"),
    ],
)
def test_concat_and_split_arguments_checked(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        make()


def test_to_pytree_stack_at_the_root(write_reference: Writer) -> None:
    tensors = {f"{i}.w": np.full(2, i, np.float32) for i in range(3)}
    tree = jw.load_weights(write_reference(tensors)).to_pytree(stack=True)
    np.testing.assert_array_equal(np.asarray(tree["w"]), [[0, 0], [1, 1], [2, 2]])


def test_to_pytree_stack_refuses_empty_prefixes_and_names_many_layers_briefly(
    write_reference: Writer,
) -> None:
    weights = jw.load_weights(write_reference(_layers()))
    for stack in ("", [""], ["model.layers", ""]):
        with pytest.raises(ArgumentError, match=r"stack="):
            weights.to_pytree(stack=stack)
    many = {f"layers.{i}.w": np.zeros(1, np.float32) for i in range(100) if i != 50}
    with pytest.raises(StructureMismatchError, match=r"layer 50 is missing") as caught:
        jw.load_weights(write_reference(many, name="many.safetensors")).layers.to_pytree(stack=True)
    assert len(str(caught.value)) < 300
