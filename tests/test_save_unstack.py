"""`jw.save(..., unstack=[...])`: stacked (scanned, vmapped) layers written as per-layer tensors.

Run as a script, this file is one process of the two-process job of
`test_a_two_process_unstacked_save_matches_a_single_process_one` (argv: process_id port folder result.json).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights.errors import ArgumentError, StructureMismatchError

LAYERS = 12


def stacked_tree(layers: int = LAYERS) -> dict[str, Any]:
    """A small model whose blocks are stacked for ``scan`` (numpy, so values are exact and unsharded)."""
    rng = np.random.default_rng(0)
    return {
        "embed": rng.standard_normal((5, 4), dtype=np.float32),
        "model": {
            "layers": {
                "attn": {"w": rng.standard_normal((layers, 4, 6), dtype=np.float32)},
                "mlp": {"kernel": rng.standard_normal((layers, 7)).astype(jnp.bfloat16)},
                "scale": np.arange(layers, dtype=np.int32),
            },
            "norm": np.ones(4, np.float16),
        },
        "step": 3,
    }


def per_layer_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """The same model written out layer by layer, as a list: what `unstack` must produce."""
    stack = tree["model"]["layers"]
    layers = [jax.tree.map(lambda leaf, i=i: np.asarray(leaf)[i], stack) for i in range(len(stack["scale"]))]
    return {**tree, "model": {**tree["model"], "layers": layers}}


def files_of(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


def test_stacked_leaves_are_written_per_layer_and_read_by_the_reference(tmp_path: Path) -> None:
    tree = stacked_tree()
    folder = jw.save(tree, tmp_path / "ckpt", unstack=["model.layers"])
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    stack = tree["model"]["layers"]
    expected = {"embed", "model.norm"} | {
        f"model.layers.{i}.{rest}" for i in range(LAYERS) for rest in ("attn.w", "mlp.kernel", "scale")
    }
    assert set(loaded) == expected
    for i in range(LAYERS):
        assert loaded[f"model.layers.{i}.attn.w"].tobytes() == stack["attn"]["w"][i].tobytes()
        assert loaded[f"model.layers.{i}.mlp.kernel"].tobytes() == stack["mlp"]["kernel"][i].tobytes()
        assert loaded[f"model.layers.{i}.scale"].shape == ()
        assert int(loaded[f"model.layers.{i}.scale"]) == i
    weights = jw.load_weights(folder)
    assert list(weights.keys())[:4] == [
        "embed",
        "model.layers.0.attn.w",
        "model.layers.0.mlp.kernel",
        "model.layers.0.scale",
    ]
    assert weights.restore({"step": 0}, strict=False)["step"] == 3  # metadata leaves as before
    # Byte for byte what saving the per-layer tree writes: same names, same order, same layout.
    reference = jw.save(per_layer_tree(tree), tmp_path / "reference")
    assert files_of(folder) == files_of(reference)


def test_a_prefix_that_is_a_whole_leaf_gets_the_layer_as_last_segment(tmp_path: Path) -> None:
    folder = jw.save({"layers": np.arange(6.0).reshape(3, 2)}, tmp_path / "ckpt", unstack=["layers"])
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert {name: value.tolist() for name, value in loaded.items()} == {
        "layers.0": [0.0, 1.0],
        "layers.1": [2.0, 3.0],
        "layers.2": [4.0, 5.0],
    }


def test_several_files_and_index_as_for_a_per_layer_tree(tmp_path: Path) -> None:
    tree = stacked_tree()
    folder = jw.save(tree, tmp_path / "ckpt", unstack=["model.layers"], max_shard_size="300B")
    reference = jw.save(per_layer_tree(tree), tmp_path / "reference", max_shard_size="300B")
    assert len(files_of(folder)) > 3
    assert files_of(folder) == files_of(reference)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.11.attn.w" in weight_map and "model.layers.attn.w" not in weight_map


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((8, 16, 6), P("x")),  # one layer per device
        ((3, 16, 6), P(None, "x")),  # every layer split by rows
        ((3, 4, 16), P(None, None, "x")),  # every layer split by columns (strided)
        ((4, 16, 6), P(None, "x", None)),
    ],
)
def test_sharded_stacks_write_what_unsharded_ones_do(
    shape: tuple[int, ...], spec: P, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = Mesh(np.array(jax.devices()), ("x",))
    value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    sharded = jax.device_put(value, NamedSharding(mesh, spec))
    replicated = jax.device_put(value, NamedSharding(mesh, P()))
    reference = jw.save({"layers": {"w": value}}, tmp_path / "reference.safetensors", unstack=["layers"])

    def no_device_slicing(*args: Any) -> Any:
        raise AssertionError("a layer was sliced on the devices")

    monkeypatch.setattr(type(sharded), "__getitem__", no_device_slicing)
    for name, array in (("sharded", sharded), ("replicated", replicated)):
        saved = jw.save({"layers": {"w": array}}, tmp_path / f"{name}.safetensors", unstack=["layers"])
        assert saved.read_bytes() == reference.read_bytes(), name
    loaded = safetensors.numpy.load_file(str(reference))
    assert sorted(loaded) == sorted(f"layers.{i}.w" for i in range(shape[0]))
    np.testing.assert_array_equal(loaded["layers.1.w"], value[1])


@pytest.mark.parametrize("spec", [P("stage"), P("stage", "x"), P("stage", None, "x"), P(None, "stage", "x")])
def test_stacks_sharded_over_a_stage_axis_of_a_grid(spec: P, tmp_path: Path) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("stage", "x"))
    value = np.arange(4 * 8 * 6, dtype=np.float32).reshape(4, 8, 6)
    sharded = jax.device_put(value, NamedSharding(mesh, spec))
    saved = jw.save({"layers": sharded}, tmp_path / "sharded.safetensors", unstack=["layers"])
    reference = jw.save({"layers": value}, tmp_path / "reference.safetensors", unstack=["layers"])
    assert saved.read_bytes() == reference.read_bytes()


def test_an_equinox_vmapped_module(tmp_path: Path) -> None:
    eqx = pytest.importorskip("equinox")

    class Model(eqx.Module):  # type: ignore[misc,name-defined]
        layers: Any
        head: Any

        def __init__(self, key: jax.Array) -> None:
            keys = jax.random.split(key, 4)
            self.layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys[:3])
            self.head = eqx.nn.Linear(4, 2, key=keys[3])

    model = Model(jax.random.key(0))
    folder = jw.save(model, tmp_path / "ckpt", unstack=["layers"])
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert sorted(loaded) == sorted(
        ["head.bias", "head.weight"] + [f"layers.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    )
    for i in range(3):
        np.testing.assert_array_equal(loaded[f"layers.{i}.weight"], np.asarray(model.layers.weight[i]))
        np.testing.assert_array_equal(loaded[f"layers.{i}.bias"], np.asarray(model.layers.bias[i]))


def test_a_flax_nnx_model_built_with_vmap(tmp_path: Path) -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):  # type: ignore[misc,name-defined]
        def __init__(self, rngs: Any) -> None:
            self.linear = nnx.Linear(4, 4, rngs=rngs)

    @nnx.split_rngs(splits=3)  # type: ignore[misc]
    @nnx.vmap(in_axes=(0,), out_axes=0)  # type: ignore[misc]
    def create_blocks(rngs: Any) -> Block:
        return Block(rngs)

    class Model(nnx.Module):  # type: ignore[misc,name-defined]
        def __init__(self, rngs: Any) -> None:
            self.layers = create_blocks(rngs)

    model = Model(nnx.Rngs(0))
    folder = jw.save(model, tmp_path / "ckpt", unstack=["layers"])
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert sorted(loaded) == sorted(f"layers.{i}.linear.{p}" for i in range(3) for p in ("bias", "kernel"))
    kernel = np.asarray(model.layers.linear.kernel[...])
    for i in range(3):
        np.testing.assert_array_equal(loaded[f"layers.{i}.linear.kernel"], kernel[i])


# Bad input: every problem named, with the fix
# ---------------------------------------------------------------------------------------------


def test_leading_sizes_that_differ(tmp_path: Path) -> None:
    tree = {"layers": {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}}
    with pytest.raises(StructureMismatchError, match=r"layers\.b: shape \(4, 2\) .* expected L = 3"):
        jw.save(tree, tmp_path / "ckpt", unstack=["layers"])
    assert not (tmp_path / "ckpt").exists()


def test_a_prefix_that_matches_nothing_names_the_closest(tmp_path: Path) -> None:
    tree = {"model": {"layers": {"w": np.zeros((3, 2))}, "layers_x": {"w": np.zeros((3, 2))}}}
    with pytest.raises(
        StructureMismatchError, match=r"'model\.layer' matches no array .*closest names: model\.layers"
    ):
        jw.save(tree, tmp_path / "ckpt", unstack=["model.layer"])
    # Whole segments only: "model.layers" leaves "model.layers_x.w" alone.
    folder = jw.save(tree, tmp_path / "ckpt", unstack=["model.layers"])
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert sorted(loaded) == ["model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "model.layers_x.w"]


@pytest.mark.parametrize("leaf", [7, np.float32(1.0)])
def test_a_scalar_under_the_prefix(leaf: Any, tmp_path: Path) -> None:
    tree = {"layers": {"w": np.zeros((3, 2)), "count": leaf}}
    with pytest.raises(StructureMismatchError, match=r"layers\.count: a (scalar|0-d array) .* no layer axis"):
        jw.save(tree, tmp_path / "ckpt", unstack=["layers"])


def test_a_per_layer_name_that_is_another_leaf(tmp_path: Path) -> None:
    tree = {"model": {"layers": {"x": np.zeros((2, 3)), "0": {"x": np.zeros(3)}}}}
    with pytest.raises(
        StructureMismatchError, match=r"model\.layers\.x: .*model\.layers\.0\.x, which is also a leaf"
    ):
        jw.save(tree, tmp_path / "ckpt", unstack=["model.layers"])


@pytest.mark.parametrize("unstack", [["layers", "layers"], ["layers", "layers.a"], [""]])
def test_unusable_prefixes(unstack: Any, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="unstack"):
        jw.save({"layers": {"a": {"w": np.zeros((2, 2))}}}, tmp_path / "ckpt", unstack=unstack)


def test_one_prefix_as_a_string_and_restored_stacked(tmp_path: Path) -> None:
    tree = {"layers": {"w": np.arange(6.0, dtype=np.float32).reshape(3, 2)}}
    folder = jw.save(tree, tmp_path / "ckpt", unstack="layers")
    assert list(jw.load_weights(folder).keys()) == ["layers.0.w", "layers.1.w", "layers.2.w"]
    back = jw.restore(folder, {"layers": {"w": np.zeros((3, 2), np.float32)}}, stack="layers")
    np.testing.assert_array_equal(np.asarray(back["layers"]["w"]), tree["layers"]["w"])


# Two processes, each writing only the layers (or the parts of layers) its shards hold
# ---------------------------------------------------------------------------------------------


def job_tree() -> dict[str, Any]:
    """Numpy values of the two-process job: stacks the job shards by layer, by row and not at all."""
    rng = np.random.default_rng(2)
    return {
        "blocks": {
            "by_layer": rng.standard_normal((8, 4, 3), dtype=np.float32),
            "by_row": rng.standard_normal((8, 16, 2), dtype=np.float32),
            "replicated": rng.standard_normal((8, 5), dtype=np.float32),
            "host": np.arange(16, dtype=np.int32).reshape(8, 2),
        },
        "head": rng.standard_normal(6, dtype=np.float32),
        "step": 5,
    }


def worker(process_id: int, port: str, folder: str, out: str) -> None:
    """One process of the job: shards `job_tree` over the job's 8 devices and saves it, unstacked."""
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    result: dict[str, Any] = {}
    try:
        import jaxweights._save

        mesh = Mesh(np.array(jax.devices()), ("x",))
        specs = {"by_layer": P("x"), "by_row": P(None, "x"), "replicated": P()}
        tree = job_tree()
        tree["blocks"] = {
            name: value if name == "host" else jax.device_put(value, NamedSharding(mesh, specs[name]))
            for name, value in tree["blocks"].items()
        }
        jw.save(tree, Path(folder) / "saved", unstack=["blocks"], max_shard_size="200B")
        stats = jaxweights._save.last_save_stats()
        jw.save(tree, Path(folder) / "single.safetensors", unstack=["blocks"])
        assert stats is not None
        result.update(tensor_bytes=stats.tensor_bytes)
    except Exception as error:  # reported to the test
        import traceback

        result.update(error=repr(error), trace=traceback.format_exc())
    Path(out).write_text(json.dumps(result))
    jax.distributed.shutdown()


def test_a_two_process_unstacked_save_matches_a_single_process_one(tmp_path: Path) -> None:
    from tests.test_multihost import free_port, run_processes

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parent.parent))
    outputs = [tmp_path / f"result-{i}.json" for i in range(2)]
    commands = [
        [sys.executable, __file__, str(i), str(port), str(tmp_path), str(outputs[i])] for i in range(2)
    ]
    logs = run_processes(commands, env)
    results = [
        json.loads(out.read_text()) if out.exists() else {"error": log}
        for out, log in zip(outputs, logs, strict=True)
    ]
    for result in results:
        assert "error" not in result, result.get("trace", result["error"])
    tree = job_tree()
    blocks = tree["blocks"]
    sharded = blocks["by_layer"].nbytes + blocks["by_row"].nbytes
    whole = blocks["replicated"].nbytes + blocks["host"].nbytes + tree["head"].nbytes
    assert [r["tensor_bytes"] for r in results] == [sharded // 2 + whole, sharded // 2]
    reference = jw.save(tree, tmp_path / "reference", unstack=["blocks"], max_shard_size="200B")
    assert len(files_of(reference)) > 3
    assert files_of(tmp_path / "saved") == files_of(reference)
    single = jw.save(tree, tmp_path / "reference.safetensors", unstack=["blocks"])
    assert (tmp_path / "single.safetensors").read_bytes() == single.read_bytes()


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
