from __future__ import annotations

import ctypes
import errno
import json
import tempfile
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
import jaxweights._save as save_module
from jaxweights._save import parse_size
from jaxweights.errors import ArgumentError, CheckpointWriteError, StructureMismatchError


def tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": {
                "kernel": jnp.asarray(rng.standard_normal((16, 8), dtype=np.float32)),
                "bias": jnp.zeros(8),
            }
        },
        "layers": [jnp.full((4,), i, jnp.bfloat16) for i in range(3)],
        "step": 12,
        "lr": 0.5,
        "name": "run-1",
        "done": False,
    }


def test_single_file_round_trip_with_scalars_and_reference_reader(tmp_path: Path) -> None:
    original = tree()
    folder = jw.save(original, tmp_path / "ckpt", metadata={"format": "flax"})
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    loaded = safetensors.numpy.load_file(str(folder / "model.safetensors"))  # the reference reads ours
    assert sorted(loaded) == ["layers.0", "layers.1", "layers.2", "params.dense.bias", "params.dense.kernel"]
    target = jax.tree.map(lambda x: jnp.zeros_like(x) if hasattr(x, "shape") else type(x)(), original)
    restored = jw.restore(folder, target)
    assert (restored["step"], restored["lr"], restored["name"], restored["done"]) == (12, 0.5, "run-1", False)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jw.load_weights(folder).metadata["format"] == "flax"


def test_sharded_save_writes_a_standard_index(tmp_path: Path) -> None:
    values = {f"w{i}": jnp.full((256,), i, jnp.float32) for i in range(5)}  # 1 KiB each
    folder = jw.save(values, tmp_path / "ckpt", max_shard_size="2.5kB")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"]["w4"] == "model-00003-of-00003.safetensors"
    weights = jw.load_weights(folder)
    assert [float(weights[f"w{i}"].data().data[0]) for i in range(5)] == [0, 1, 2, 3, 4]
    assert jw.load_weights(tmp_path / "ckpt" / "model.safetensors.index.json").w2.exists()


def test_sharded_arrays_are_written_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    value = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    rows = jax.device_put(value, NamedSharding(mesh, P("x")))
    cols = jax.device_put(value, NamedSharding(mesh, P(None, "x")))
    blocks = []
    original = save_module._write_blocks

    def spy(writer: Any, out: Any, array: jax.Array) -> bool:
        blocks.append(original(writer, out, array))
        return blocks[-1]

    monkeypatch.setattr(save_module, "_write_blocks", spy)
    folder = jw.save({"rows": rows, "cols": cols}, tmp_path / "ckpt")
    assert blocks == [False, True]  # cols gathered whole (strided); rows written shard by shard in place
    for name in ("rows", "cols"):
        np.testing.assert_array_equal(jw.load_weights(folder)[name].data().data, value)


def test_saving_over_a_checkpoint_keeps_other_files_and_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"hidden": 4}')
    jw.save({"w": jnp.full(4, 2.0), "b": jnp.zeros(2)}, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert jw.load_weights(folder).w.data().data.tolist() == [2.0] * 4
    before = (folder / "model.safetensors").read_bytes()

    def full_disk(writer: Any, out: Any, value: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_module, "_write_value", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"Saving to .*ckpt failed: No space left on device. Nothing was replaced"
    ):
        jw.save({"w": jnp.zeros(4)}, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_a_refused_swap_is_a_write_error_and_replaces_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    before = (folder / "model.safetensors").read_bytes()

    def refused(*args: Any) -> int:
        ctypes.set_errno(errno.EACCES)
        return -1

    monkeypatch.setattr(save_module, "_renameat2", lambda: refused)
    with pytest.raises(
        CheckpointWriteError, match=r"was refused \(Permission denied\)\. Nothing was replaced"
    ):
        jw.save({"w": jnp.zeros(4)}, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"ckpt is a file, but a checkpoint folder was expected"):
        jw.save({"w": jnp.ones(2)}, blocker)


def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(CheckpointWriteError, match=r"Permission denied\. Nothing was replaced"):
        jw.save({"w": jnp.ones(2)}, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_single_file_path_and_bad_leaves(tmp_path: Path) -> None:
    path = jw.save({"w": jnp.ones(2)}, tmp_path / "weights.safetensors")
    assert path.is_file() and jw.load_weights(path).w.exists()
    with pytest.raises(StructureMismatchError, match=r"w: an abstract ShapeDtypeStruct has no data to save"):
        jw.save({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, tmp_path / "x")
    with pytest.raises(StructureMismatchError, match=r"obj: an object is neither an array nor a scalar"):
        jw.save({"obj": object()}, tmp_path / "x")


def test_equinox_modules_save_their_arrays_and_skip_functions(tmp_path: Path) -> None:
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.PRNGKey(0))
    folder = jw.save(model, tmp_path / "mlp")
    assert sorted(jw.load_weights(folder).keys()) == [
        f"layers.{i}.{p}" for i in range(3) for p in ("bias", "weight")
    ]


def test_the_callers_tree_is_never_modified(tmp_path: Path) -> None:
    original = tree()
    snapshot = jax.tree.map(lambda x: np.array(x) if hasattr(x, "shape") else x, original)
    jw.save(original, tmp_path / "ckpt")
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(snapshot), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_parse_size() -> None:
    assert parse_size("1.5kB") == 1500 and parse_size("1 GiB") == 2**30
    with pytest.raises(ArgumentError, match="is not a size"):
        parse_size("lots")


def test_all_zero_tensors_become_holes_that_read_back_as_zeros(tmp_path: Path) -> None:
    mesh = Mesh(np.array(jax.devices()), ("x",))
    zeros = jax.device_put(jnp.zeros((4096, 256)), NamedSharding(mesh, P("x")))  # a fresh optimizer moment
    values = {"mu": zeros, "nu": jnp.zeros((2048, 256)), "w": jnp.ones((8, 8)), "tail": jnp.zeros(4096)}
    folder = jw.save(values, tmp_path / "ckpt")
    path = folder / "model.safetensors"
    stat = path.stat()
    assert stat.st_blocks * 512 < stat.st_size // 4  # sparse: the zeros were never written
    loaded = safetensors.numpy.load_file(str(path))  # readers see plain zeros
    assert not loaded["mu"].any() and not loaded["nu"].any() and not loaded["tail"].any()
    assert loaded["w"].sum() == 64.0


def test_the_c_library_is_loaded_in_one_place() -> None:
    package = Path(jw.__file__).parent
    loaders = sorted(p.name for p in package.rglob("*.py") if "CDLL(" in p.read_text(encoding="utf-8"))
    assert loaders == ["_libc.py"]
