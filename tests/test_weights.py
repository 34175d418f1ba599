from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights import DeviceRef, DType
from jaxweights.errors import (
    AccessorError,
    CheckpointError,
    DTypeError,
    QuantizationError,
    ShapeMismatchError,
    WeightNotFoundError,
)


@pytest.fixture
def weights(transformer: Path) -> jw.Weights:
    return jw.load_weights(transformer)


def test_attribute_and_index_access_build_the_same_name(weights: jw.Weights) -> None:
    a = weights.transformer.layers[0].attention.weight
    b = weights["transformer.layers"][0]["attention"]["weight"]
    c = weights["transformer"]["layers"]["0"].attention["weight"]
    assert a.name == b.name == c.name == "transformer.layers.0.attention.weight"
    assert a == b and hash(a) == hash(b)
    assert weights.name == ""
    assert weights.transformer.layers[np.int64(3)].name == "transformer.layers.3"
    assert weights.transformer.layers[-1].name == "transformer.layers.11"


def test_bad_keys(weights: jw.Weights) -> None:
    with pytest.raises(TypeError, match=r"indexed by int or str, not float"):
        weights[1.5]  # type: ignore[index]
    with pytest.raises(KeyError, match=r"not a weight name segment"):
        weights[""]
    with pytest.raises(IndexError, match=r"Index -13 is out of range for 'transformer.layers'"):
        weights.transformer.layers[-13]


def test_exists_only_for_exact_tensor_names(weights: jw.Weights) -> None:
    assert weights.transformer.layers[0].mlp.weight.exists()
    assert not weights.transformer.layers[0].mlp.exists()
    assert not weights.transformer.layers[0].mlp.weight.extra.exists()
    assert not weights.exists()


def test_items_relative_sorted_and_whole_segments(write_reference: Callable[..., Path]) -> None:
    names = ["layers.1.w", "layers.10.w", "layers.1.b", "layers.2.w", "layers.1", "layers.1x.w"]
    weights = jw.load_weights(write_reference({n: np.ones(1, np.float32) for n in names}))
    items = list(weights.layers[1].items())
    assert [name for name, _ in items] == ["", "b", "w"]  # not layers.10.* or layers.1x.*
    assert [acc.name for _, acc in items] == ["layers.1", "layers.1.b", "layers.1.w"]
    # natural order: layers.2 before layers.10, numbers before words
    expected = ["layers.1", "layers.1.b", "layers.1.w", "layers.2.w", "layers.10.w", "layers.1x.w"]
    assert [name for name, _ in weights.items()] == expected
    assert weights.layers[1].keys() == ["", "b", "w"]
    assert list(weights.nothing.items()) == []


def test_data_is_a_read_only_zero_copy_view(transformer: Path, weights: jw.Weights) -> None:
    data = weights.embeddings.weight.data()
    assert (data.name, data.dtype, data.shape, data.quantization_encoding) == (
        "embeddings.weight",
        DType.float32,
        (16, 8),
        None,
    )
    assert not data.data.flags.writeable and not data.data.flags.owndata
    with pytest.raises(ValueError, match=r"read-only"):
        data.data[0, 0] = 1.0
    assert data.astype(DType.float32) is data
    half = data.astype("float16")
    assert half.dtype is DType.float16 and half.data.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(half), data.data.astype(np.float16))
    assert data.view(DType.uint8).shape == (16, 32)
    assert repr(data) == "WeightData('embeddings.weight', float32[16, 8])"


def test_missing_names_raise_keyerror_with_hints(weights: jw.Weights) -> None:
    with pytest.raises(
        WeightNotFoundError,
        match=r"No tensor named 'transformer.layers.0.attention.wieght'.*Did you mean 'transformer.layers.0.attention.weight'",
    ):
        weights.transformer.layers[0].attention.wieght.data()
    with pytest.raises(
        KeyError, match=r"'transformer.layers.0' is a prefix, not a tensor .*attention, mlp, norm"
    ):
        weights.transformer.layers[0].allocate()
    with pytest.raises(KeyError, match=r"No tensor named 'zzz'"):
        weights.zzz.data()


def test_allocate_places_converts_and_records(weights: jw.Weights) -> None:
    reference = np.array(weights.transformer.layers[0].attention.weight.data().data)
    w = weights.transformer.layers[0].attention.weight.allocate(dtype=DType.bfloat16)
    assert isinstance(w.array, jax.Array)
    assert w.array.dtype == jnp.bfloat16 and w.dtype is DType.bfloat16 and w.original_dtype is DType.float32
    assert w.device == DeviceRef.CPU(0) and w.array.devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(w.array), reference.astype(jnp.bfloat16))
    assert list(weights.allocated_weights) == ["transformer.layers.0.attention.weight"]
    assert weights.allocated_weights["transformer.layers.0.attention.weight"] is w.array
    assert weights.transformer.allocated_weights is weights.allocated_weights  # one dict per tree
    other = weights.transformer.layers[1].mlp.weight.allocate(
        dtype="float16", shape=(8, 32), device=DeviceRef.CPU(3)
    )
    assert other.array.devices() == {jax.devices()[3]}
    assert other.array.dtype == np.float16
    assert len(weights.allocated_weights) == 2


def test_allocate_validates_before_recording(weights: jw.Weights) -> None:
    node = weights.transformer.layers[0].mlp.weight
    with pytest.raises(
        ShapeMismatchError, match=r"has shape \(8, 32\), but allocate\(\) was asked for \(32, 8\)"
    ):
        node.allocate(shape=(32, 8))
    with pytest.raises(ShapeMismatchError, match=r"shape entries must be integers, found 'seq'"):
        node.allocate(shape=("seq", 32))  # type: ignore[arg-type]
    with pytest.raises(QuantizationError, match=r"has no quantization, but allocate\(\) was asked for Q4_K"):
        node.allocate(quantization_encoding=jw.QuantizationEncoding.Q4_K)
    with pytest.raises(DTypeError, match=r"not a supported element type"):
        node.allocate(dtype="float33")
    with pytest.raises(DTypeError, match=r"dtype=float64 needs 64-bit support"):
        node.allocate(dtype=DType.float64)
    with pytest.raises(jw.errors.DeviceError):
        node.allocate(device=DeviceRef.CPU(42))
    assert weights.allocated_weights == {}


def test_allocate_with_a_jax_device_and_a_sharding(weights: jw.Weights) -> None:
    device = jax.devices()[5]
    assert weights.embeddings.weight.allocate(device=device).array.devices() == {device}
    mesh = jax.sharding.Mesh(jax.devices(), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    w = weights.embeddings.weight.allocate(device=sharding)
    assert w.device is None and w.sharding == sharding
    np.testing.assert_array_equal(np.asarray(w.array), weights.embeddings.weight.data().data)


def test_weight_behaves_like_an_array(weights: jw.Weights) -> None:
    w = weights.transformer.layers[0].attention.weight.allocate()
    x = jnp.ones(8)
    np.testing.assert_allclose(np.asarray(w @ x), np.asarray(w.array @ x))
    np.testing.assert_allclose(np.asarray(x @ w), np.asarray(x @ w.array))
    np.testing.assert_allclose(np.asarray(jnp.asarray(w)), np.asarray(w.array))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w.array))
    doubled = jax.jit(lambda t: t.array * 2)(w)  # a pytree: passes through jit
    np.testing.assert_allclose(np.asarray(doubled), np.asarray(w.array) * 2)
    assert jax.tree.leaves({"w": w})[0] is w.array
    assert (w.ndim, w.T.shape, (w + 1).shape, (-w).shape) == (2, (8, 8), (8, 8), (8, 8))
    assert repr(w) == "Weight('transformer.layers.0.attention.weight', float32[8, 8], cpu:0)"


def test_dunder_and_private_lookups_raise_attributeerror(weights: jw.Weights) -> None:
    for attr in ("__array_interface__", "_ipython_display_", "_repr_mimebundle_", "__fspath__", "_x"):
        assert not hasattr(weights, attr)
    assert hasattr(weights, "_ipython_key_completions_")
    with pytest.raises(AttributeError, match=r"no attribute 'x'"):
        weights.x = 1  # type: ignore[attr-defined]
    with pytest.raises(AccessorError):  # numpy never iterates an accessor as a sequence of children
        np.asarray(weights.transformer.layers, dtype=object)


def test_iteration_len_bool_and_contains_are_finite(weights: jw.Weights) -> None:
    layers = list(weights.transformer.layers)
    assert [layer.name for layer in layers[:3]] == [f"transformer.layers.{i}" for i in range(3)]
    assert layers[-1].name == "transformer.layers.11"  # natural order, not 0, 1, 10, 11, 2
    assert len(weights.transformer.layers) == 12 and len(weights.embeddings.weight) == 0
    assert bool(weights.embeddings.weight) and bool(weights.transformer) and not weights.nothing
    assert 0 in weights.transformer.layers and "attention" in weights.transformer.layers[0]
    assert 12 not in weights.transformer.layers
    assert 10**5000 not in weights.transformer.layers and -(10**30) not in weights.transformer.layers


def test_dir_lists_next_segments_for_tab_completion(weights: jw.Weights) -> None:
    listing = dir(weights.transformer.layers[0])
    assert {"attention", "mlp", "norm", "allocate", "items", "exists", "data", "name"} <= set(listing)
    assert weights.transformer.layers._ipython_key_completions_()[:3] == ["0", "1", "2"]


def test_copy_deepcopy_and_pickle(weights: jw.Weights) -> None:
    node = weights.transformer.layers[2]
    assert copy.copy(node) is node and copy.deepcopy(node) is node
    again = pickle.loads(pickle.dumps(node))
    assert again.name == "transformer.layers.2"
    np.testing.assert_array_equal(again.mlp.weight.data().data, node.mlp.weight.data().data)


def test_repr_summary_and_html(weights: jw.Weights) -> None:
    assert repr(weights.transformer.layers[0]) == "<Weights 'transformer.layers.0': 3 tensors>"
    text = str(weights.summary())
    assert text.splitlines()[0].startswith(
        "model.safetensors: 37 tensors, 4,064 parameters, 16.3 kB (float32 x37)"
    )
    assert "(x12: 0..11 share this layout)" in text
    assert "<details" in weights._repr_html_()


def test_metadata_and_info(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(write_reference({"a": np.ones(3, np.int8)}, metadata={"format": "pt"}))
    assert weights.metadata == {"format": "pt"}
    info = weights.a.info
    assert (info.name, info.dtype, info.shape, info.nbytes) == ("a", DType.int8, (3,), 3)


# -- allocate_all --------------------------------------------------------------------------------


def test_allocate_all_shards_by_rules_and_records(write_reference: Callable[..., Path]) -> None:
    rng = np.random.default_rng(3)
    values = {
        "model.layers.0.q.weight": rng.standard_normal((16, 8), dtype=np.float32),
        "model.layers.0.up.weight": rng.standard_normal((8, 32), dtype=np.float32),
        "model.layers.0.norm.bias": rng.standard_normal(8, dtype=np.float32),
        "model.pos_ids": np.arange(16, dtype=np.int32),
        "other.weight": np.ones(3, np.float32),
    }
    weights = jw.load_weights(write_reference(values))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    arrays = weights.model.allocate_all(
        mesh=mesh, rules=[(r"q\.weight$", P("x", "y")), (r"up\.weight$", P(None, "x"))], dtype="bfloat16"
    )
    assert list(arrays) == ["layers.0.norm.bias", "layers.0.q.weight", "layers.0.up.weight", "pos_ids"]
    assert arrays["layers.0.q.weight"].sharding.spec == P("x", "y")  # type: ignore[attr-defined]
    assert arrays["layers.0.norm.bias"].sharding.spec == P()  # type: ignore[attr-defined]  # unmatched: replicated
    assert arrays["layers.0.q.weight"].dtype == jnp.bfloat16
    assert arrays["pos_ids"].dtype == np.int32  # dtype converts floating tensors only
    for name, array in arrays.items():
        expected = values[f"model.{name}"]
        np.testing.assert_array_equal(np.asarray(array), expected.astype(array.dtype))
    assert sorted(weights.allocated_weights) == sorted(f"model.{n}" for n in arrays)
    assert weights.checkpoint.bytes_copied == sum(
        v.nbytes for k, v in values.items() if k.startswith("model.")
    )


def test_allocate_all_without_mesh_uses_device(transformer: Path) -> None:
    weights = jw.load_weights(transformer)
    arrays = weights.transformer.layers[3].allocate_all(device=jw.DeviceRef.CPU(2))
    assert set(arrays) == {"attention.weight", "mlp.weight", "norm.bias"}
    assert all(a.devices() == {jax.devices()[2]} for a in arrays.values())
    single = weights.embeddings.weight.allocate_all()
    assert list(single) == [""]


def test_allocate_all_checks_everything_before_reading(write_reference: Callable[..., Path]) -> None:
    weights = jw.load_weights(
        write_reference({"a.w": np.ones((6, 4), np.float32), "a.b": np.ones(6, np.float32)})
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    with pytest.raises(jw.errors.ShardingError, match=r"2 tensor\(s\) cannot be sharded as asked"):
        weights.allocate_all(mesh=mesh, rules=[(r".*", P("x"))])
    with pytest.raises(jw.errors.ShardingError, match=r"a.b: no rule matches \(strict=True\)"):
        weights.allocate_all(mesh=mesh, rules=[(r"\.w$", P(None, "x"))], strict=True)
    with pytest.raises(WeightNotFoundError, match="No tensor named 'nothing'"):
        weights.nothing.allocate_all()
    assert weights.allocated_weights == {} and weights.checkpoint.bytes_copied == 0


def test_allocate_all_keeps_aligned_row_shards_zero_copy(tmp_path: Path) -> None:
    values = {f"w{i}": np.full((64, 32), i, np.float32) for i in range(4)}
    weights = jw.load_weights(jw.save_file(values, tmp_path / "m.safetensors"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    arrays = weights.allocate_all(mesh=mesh, rules=[(r".*", jax.sharding.PartitionSpec("x"))])
    assert weights.checkpoint.bytes_copied == 0
    for name, array in arrays.items():
        base = weights[name].data().data.ctypes.data
        for shard in array.addressable_shards:
            assert shard.data.unsafe_buffer_pointer() == base + shard.index[0].start * 32 * 4


# -- nothing silent ---------------------------------------------------------------------------


def test_an_accessor_used_as_data_says_it_holds_none(transformer: Path) -> None:
    import torch

    layer = jw.load_weights(transformer).transformer.layers[0]
    for convert in (np.asarray, np.array, jnp.asarray, torch.as_tensor):
        with pytest.raises(AccessorError, match=r"holds\s+no data.*\.data\(\).*\.allocate\(\)"):
            convert(layer)
    with pytest.raises(TypeError, match="holds"):  # AccessorError is a TypeError
        jnp.asarray(layer.mlp.weight)


def test_shape_and_dtype_are_the_tensor_metadata_or_a_clear_error(transformer: Path) -> None:
    weights = jw.load_weights(transformer)
    weight = weights.transformer.layers[3].mlp.weight
    assert weight.shape == (8, 32) and weight.dtype is DType.float32
    assert weights.checkpoint.bytes_copied == 0  # read from the header
    assert not hasattr(weights.transformer.layers[3], "shape")  # an AttributeError ...
    with pytest.raises(WeightNotFoundError, match=r"'transformer\.layers\.3' is a prefix"):
        weights.transformer.layers[3].dtype  # noqa: B018 - ... and a KeyError, with what it holds


def test_a_mistyped_method_names_the_closest_one(transformer: Path) -> None:
    weights = jw.load_weights(transformer)
    with pytest.raises(AccessorError, match=r"'alocate' is not a method.*Did you mean \.allocate\(\)\?"):
        weights.embeddings.weight.alocate()
    with pytest.raises(TypeError, match=r"Methods: allocate, allocate_all, close"):
        weights.to_pytre()


def test_close_and_the_with_statement(transformer: Path) -> None:
    with jw.load_weights(transformer) as weights:
        kept = weights.embeddings.weight.allocate().array
    with pytest.raises(CheckpointError, match="closed"):
        weights.embeddings.weight.data()
    assert kept.shape == (16, 8)  # allocated arrays stay valid
    weights.close()  # twice is fine


def test_allocate_shape_must_be_a_sequence_of_ints(transformer: Path) -> None:
    weight = jw.load_weights(transformer).embeddings.weight
    with pytest.raises(ShapeMismatchError, match=r"'embeddings\.weight'.*shape=4 is not a sequence"):
        weight.allocate(shape=4)  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match=r"found 'x'"):
        weight.allocate(shape=(16, "x"))  # type: ignore[arg-type]
    assert weight.allocate(shape=np.array([16, 8])).shape == (16, 8)


def test_public_classes_live_in_the_package_namespace() -> None:
    classes = [value for name in dir(jw) if isinstance(value := getattr(jw, name), type)]
    assert classes and all(cls.__module__ == "jaxweights" for cls in classes), [
        cls for cls in classes if cls.__module__ != "jaxweights"
    ]


def completions(namespace: Mapping[str, object], text: str) -> set[str]:
    """What IPython's default completer offers for ``text`` (the cursor at its end)."""
    shell_module = pytest.importorskip("IPython.core.interactiveshell")
    from IPython.core.completer import provisionalcompleter

    shell = shell_module.InteractiveShell.instance()
    shell.user_ns.update(namespace)
    with provisionalcompleter():
        return {completion.text for completion in shell.Completer.completions(text, len(text))}


def test_ipython_completes_children_numbered_children_and_keys(tmp_path: Path) -> None:
    tensors = {f"encoder.layer.{i}.attention.weight": np.ones(2, np.float32) for i in range(3)}
    tensors["encoder.embeddings.word"] = np.ones(2, np.float32)
    weights = jw.load_weights(jw.save_file(tensors, tmp_path / "m.safetensors"))
    namespace = {"weights": weights}
    assert {"embeddings", "layer", "items"} <= completions(namespace, "weights.encoder.")
    assert "attention" in completions(namespace, "weights.encoder.layer[0].")
    keys = completions(namespace, 'weights["encoder.la')
    assert {"encoder.layer", "encoder.layer.0", "encoder.layer.2.attention.weight"} <= keys
    assert all(key.startswith("encoder.la") for key in keys)


def test_terminal_ipython_shows_the_tree(tmp_path: Path) -> None:
    pretty = pytest.importorskip("IPython.lib.pretty")
    weights = jw.load_weights(jw.save_file({"a.b": np.ones(2, np.float32)}, tmp_path / "m.safetensors"))
    shown = pretty.pretty(weights)
    assert shown == str(weights.summary(max_lines=200)) and "a.b" in shown and "float32[2]" in shown
