"""Names of tree paths, nesting dotted names, and reading a checkpoint prefix into a pytree of arrays."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpy.typing import DTypeLike

import jaxweights as jw
from jaxweights._pytree import flatten_target, nest, path_name
from jaxweights.errors import StructureMismatchError


def test_path_names_cover_dicts_sequences_attributes_and_namedtuples() -> None:
    import optax

    tree = {"a": [1, {"b": 2}], "opt": optax.adam(1e-3).init({"w": np.ones(2)})}
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["a.0", "a.1.b", "opt.0.count", "opt.0.mu.w", "opt.0.nu.w"]


def test_nest_lists_and_dicts() -> None:
    items = [("layers.0.w", 1), ("layers.1.w", 2), ("layers.1.b", 3), ("head", 4)]
    assert nest(items) == {"layers": [{"w": 1}, {"w": 2, "b": 3}], "head": 4}
    assert nest(items, lists=False) == {"layers": {"0": {"w": 1}, "1": {"w": 2, "b": 3}}, "head": 4}
    assert nest([("blocks.0", 1), ("blocks.2", 2)]) == {"blocks": {"0": 1, "2": 2}}  # a gap: stays a dict
    assert nest([("", 5)]) == 5
    with pytest.raises(StructureMismatchError, match=r"'a' is a tensor and also a prefix of 'a.b'"):
        nest([("a", 1), ("a.b", 2)])
    with pytest.raises(StructureMismatchError, match=r"'a' is a tensor and also a prefix of other tensors"):
        nest([("a.b", 1), ("a", 2)])


def test_nest_keeps_odd_numeric_segments_as_keys() -> None:
    huge = "9" * 5000  # past Python's int-digit limit
    assert nest([(f"x.{huge}", 1), ("x.0", 2)]) == {"x": {huge: 1, "0": 2}}
    assert nest([("x.²", 1), ("x.0", 2)]) == {"x": {"²": 1, "0": 2}}  # a unicode digit is no index
    assert nest([("x.1", 1), ("x.0", 2), ("x.00", 3)]) == {"x": {"1": 1, "0": 2, "00": 3}}
    assert nest([("x.1", {"0": 5}), ("x.0", 2)]) == {"x": [2, {"0": 5}]}  # leaf values are left alone


def test_nest_refuses_a_root_tensor_beside_others_and_trees_jax_cannot_walk() -> None:
    for items in ([("a", 1), ("", 2)], [("", 1), ("a", 2)], [("", 1), ("", 2)]):
        with pytest.raises(StructureMismatchError, match=r"prefix itself is also a prefix of other"):
            nest(items)
    deep = "." * 1000 + "w"
    with pytest.raises(StructureMismatchError, match=r"nests 1001 levels deep; .* at most 256"):
        nest([(deep, 1)])
    tree = nest([("a." * 255 + "w", 1)])  # the deepest tree nest builds, and jax walks it
    assert jax.tree_util.tree_leaves(tree) == [1]


def test_to_pytree_of_pathological_names(tmp_path: Path) -> None:
    names = ["." * 1000 + "w", f"a.{'9' * 5000}", "a.²", "a.0"]
    weights = jw.load_weights(
        jw.save_file({n: np.ones(1, np.int8) for n in names}, tmp_path / "m.safetensors")
    )
    assert sorted(weights.a.to_pytree()) == ["0", "9" * 5000, "²"]
    with pytest.raises(StructureMismatchError, match=r"nests 1001 levels deep"):
        weights.to_pytree()


def test_flatten_target_unwraps_nnx_variables_and_rejects_clashes() -> None:
    from flax import nnx

    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    leaves, _ = flatten_target(state)
    assert [(leaf.name, leaf.value.shape) for leaf in leaves] == [("bias", (3,)), ("kernel", (2, 3))]
    replaced = leaves[0].rebuild(np.zeros(3))
    assert isinstance(replaced, nnx.Param) and replaced is not state["bias"]
    with pytest.raises(StructureMismatchError, match=r"share a dotted name \('a.b'\)"):
        flatten_target({"a.b": 1, "a": {"b": 2}})


# Every element distinct and exactly representable in bfloat16, so converted values are known exactly.
VALUES = {
    "encoder.layer.0.attn.weight": np.arange(32, dtype=np.float32).reshape(8, 4),
    "encoder.layer.1.attn.weight": -np.arange(32, dtype=np.float32).reshape(8, 4) - 0.5,
    "encoder.norm.scale": np.array([0.25, 0.5, 2.0, 4.0], np.float32),
    "encoder.ids": np.arange(3, dtype=np.int32),
}


def assert_holds(tree: object, prefix: str, dtype: DTypeLike | None = None) -> None:
    """Each leaf of ``tree`` is the `VALUES` entry under ``prefix``, bit for bit (converted if floating)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert leaves
    for path, leaf in leaves:
        want = VALUES[f"{prefix}{path_name(path)}"]
        if dtype is not None and np.issubdtype(want.dtype, np.floating):
            want = want.astype(dtype)
        got = np.asarray(jax.device_get(leaf))
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path_name(path)
        assert got.tobytes() == want.tobytes(), path_name(path)


@pytest.fixture
def weights(tmp_path: Path) -> jw.Weights:
    return jw.load_weights(jw.save_file(VALUES, tmp_path / "m.safetensors"))


def test_to_pytree_places_arrays(weights: jw.Weights) -> None:
    tree = weights.encoder.to_pytree(dtype="bfloat16")
    assert sorted(tree) == ["ids", "layer", "norm"]
    assert isinstance(tree["layer"], list) and len(tree["layer"]) == 2
    assert tree["layer"][1]["attn"]["weight"].dtype == jax.numpy.bfloat16
    assert tree["ids"].dtype == np.int32  # dtype converts floating tensors only
    assert_holds(tree, "encoder.", jax.numpy.bfloat16)
    assert set(weights.allocated_weights) == {
        f"encoder.{n}" for n in ("layer.0.attn.weight", "layer.1.attn.weight", "norm.scale", "ids")
    }
    as_dicts = weights.encoder.layer.to_pytree(lists=False)
    assert list(as_dicts) == ["0", "1"]
    assert_holds(as_dicts, "encoder.layer.")


def test_to_pytree_shapes_only_reads_nothing(weights: jw.Weights) -> None:
    mesh = Mesh(np.array(jax.devices()), ("x",))
    tree = weights.encoder.to_pytree(shapes_only=True, mesh=mesh, rules=[(r"attn", P("x"))])
    leaf = tree["layer"][0]["attn"]["weight"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (8, 4)
    assert leaf.sharding == NamedSharding(mesh, P("x"))
    assert tree["norm"]["scale"].sharding == NamedSharding(mesh, P())
    assert weights.checkpoint.bytes_copied == 0 and weights.allocated_weights == {}


def test_to_pytree_of_a_missing_prefix(weights: jw.Weights) -> None:
    with pytest.raises(jw.errors.WeightNotFoundError, match="No tensor named 'decoder'"):
        weights.decoder.to_pytree()
    with pytest.raises(jw.errors.WeightNotFoundError):
        weights.decoder.to_pytree(shapes_only=True)
