from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
import jaxweights._libc as libc_module
import jaxweights._save as save_module
import jaxweights.formats.safetensors as safetensors_module
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
        CheckpointWriteError,
        match=r"Saving to .*ckpt failed while writing the weights: No space left on device\. Nothing was "
        r"replaced",
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

    monkeypatch.setattr(libc_module, "_renameat2", lambda: refused)
    with pytest.raises(
        CheckpointWriteError,
        match=r"while swapping in the new checkpoint: Permission denied\. Nothing was replaced",
    ):
        jw.save({"w": jnp.zeros(4)}, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"ckpt is a file, but a checkpoint folder was expected"):
        jw.save({"w": jnp.ones(2)}, blocker)


def test_a_refused_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = os.mkdir

    def denied(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(".saving"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        original(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(
        CheckpointWriteError,
        match=r"while creating a temporary folder beside .*ckpt: Permission denied\. Nothing was replaced .*"
        r"make the folder writable",
    ):
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


# ---------------------------------------------------------------------------------------------
# Crash leftovers, files beside the checkpoint, symlinks, errors, modes
# ---------------------------------------------------------------------------------------------


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def tensors_in(path: Path) -> dict[str, bytes]:
    with jw.load_weights(path) as weights:
        names = weights.keys()  # every tensor name (iterating gives the accessors one level down)
        return {name: np.asarray(weights[name].data().data).tobytes() for name in names}


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a symlink's target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


def test_a_save_removes_what_killed_saves_of_its_target_left(tmp_path: Path) -> None:
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    file = jw.save_file({"w": np.ones(4, np.float32)}, tmp_path / "m.safetensors")
    # the names killed saves leave: tempfile's (earlier releases, write_file) and PID-RANDOM (staging)
    for name in (".ckpt.k3x_9abc.saving", ".ckpt.4242-0123abcd.saving", ".m.safetensors.77-0123abcd.saving"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half-written")
    (tmp_path / ".m.safetensors.q1w2e3r4.tmp").write_bytes(b"half-written")
    # names that are not this target's temporary entries
    (tmp_path / "elsewhere").mkdir()
    others = {
        ".ckpt.backup": "folder",
        ".ckpt2.abcd1234.saving": "folder",  # another target's
        ".ckpt.x.abcd1234.saving": "folder",  # target "ckpt.x"'s
        "ckpt.abcd1234.saving": "folder",  # no leading dot
        ".ckpt.ABCD1234.saving": "folder",  # not a name jaxweights makes
        ".ckpt.abcd1234.saving.keep": "folder",
        ".ckpt.abcd1235.saving": "file",  # a file where jaxweights makes folders
        ".ckpt.abcd1236.saving": "symlink",  # never followed
        ".m.safetensors.abcd1234.tmp.keep": "file",
        ".m.safetensors.abcd1237.tmp": "folder",  # a folder where write_file makes files
    }
    for name, kind in others.items():
        if kind == "folder":
            (tmp_path / name).mkdir()
        elif kind == "file":
            (tmp_path / name).write_text("keep")
        else:
            (tmp_path / name).symlink_to("elsewhere")
    (tmp_path / "elsewhere" / "data").write_text("keep")
    jw.save({"w": jnp.zeros(4)}, folder)
    jw.save_file({"w": np.zeros(4, np.float32)}, file)
    assert listing(tmp_path) == sorted(["ckpt", "elsewhere", "m.safetensors", *others])
    assert (tmp_path / "elsewhere" / "data").read_text() == "keep"


def test_a_live_saves_temporary_entries_are_kept(tmp_path: Path) -> None:
    live_folder = tmp_path / ".ckpt.4242-0123abcd.saving"  # a save in another process: it holds the lock
    live_folder.mkdir()
    lock = os.open(live_folder, os.O_RDONLY)
    assert libc_module.try_lock(lock)
    live_file = (
        tmp_path / ".m.safetensors.q1w2e3r4.tmp"
    )  # write_file in another process: it has the file open
    handle = open(live_file, "wb")  # noqa: SIM115
    try:
        jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
        jw.save_file({"w": np.ones(4, np.float32)}, tmp_path / "m.safetensors")
        assert live_folder.is_dir() and live_file.is_file()
    finally:
        os.close(lock)
        handle.close()
    jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")  # once they are gone, their leftovers are stale
    jw.save_file({"w": np.ones(4, np.float32)}, tmp_path / "m.safetensors")
    assert listing(tmp_path) == ["ckpt", "m.safetensors"]


def test_without_renameat2_two_renames_swap_and_a_kill_between_them_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libc_module, "_renameat2", lambda: None)
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    (folder / "config.json").write_text("{}")
    jw.save({"w": jnp.full(4, 2.0)}, folder)
    assert listing(tmp_path) == ["ckpt"] and listing(folder) == ["config.json", "model.safetensors"]
    folder.rename(tmp_path / ".ckpt.4242-0123abcd.old")  # killed between the renames: the previous one aside
    jw.save({"w": jnp.full(4, 3.0)}, folder)
    assert listing(tmp_path) == ["ckpt"] and listing(folder) == ["config.json", "model.safetensors"]
    assert jw.load_weights(folder).w.data().data.tolist() == [3.0] * 4


def test_a_save_into_a_folder_replaces_only_the_previous_checkpoints_own_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (folder / "config.json").write_text('{"hidden": 4}')
    (folder / "training_args.bin").write_bytes(bytes(range(10)))
    safetensors.numpy.save_file({"lora.a": np.ones(2, np.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "best.safetensors").symlink_to("adapter_model.safetensors")
    # shards another tool wrote, named by the folder's index: the previous checkpoint's own files
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, str(folder / "weights-a.safetensors"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "weights-a.safetensors"}}')
    kept = snapshot(folder)
    for name in ("weights-a.safetensors", "model.safetensors.index.json"):
        del kept[name]
    names = sorted({name.split("/")[0] for name in kept})
    values = {f"w{i}": jnp.full((256,), i, jnp.float32) for i in range(5)}
    jw.save(values, folder, max_shard_size="2.5kB")  # three shards and an index replace the other tool's
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert listing(folder) == sorted([*names, *shards, "model.safetensors.index.json"])
    jw.save({"w": jnp.zeros(3)}, folder)  # one file replaces the shards and the index
    assert listing(folder) == sorted([*names, "model.safetensors"])
    assert {name: value for name, value in snapshot(folder).items() if name in kept} == kept
    assert tensors_in(folder / "model.safetensors") == {"w": np.zeros(3, np.float32).tobytes()}
    assert [name for name, _ in jw.load_weights(folder).items()] == ["w"]  # model.safetensors, no adapter
    assert [name for name, _ in jw.load_weights(folder / "best.safetensors").items()] == ["lora.a"]
    jw.save(values, folder, max_shard_size="2.5kB")  # and shards replace the one file
    assert listing(folder) == sorted([*names, *shards, "model.safetensors.index.json"])
    assert sorted(tensors_in(folder)) == [f"w{i}" for i in range(5)]  # the index is preferred: no adapter
    assert listing(tmp_path) == ["model"]


def test_saving_through_a_symlink_replaces_what_it_points_to(tmp_path: Path) -> None:
    jw.save({"w": jnp.ones(2)}, tmp_path / "step_1")
    (tmp_path / "step_1" / "config.json").write_text("{}")
    (tmp_path / "latest").symlink_to("step_1")
    jw.save({"w": jnp.full(2, 2.0)}, tmp_path / "latest")
    assert os.readlink(tmp_path / "latest") == "step_1"
    assert listing(tmp_path) == ["latest", "step_1"]
    assert listing(tmp_path / "step_1") == ["config.json", "model.safetensors"]
    assert tensors_in(tmp_path / "step_1") == {"w": np.full(2, 2.0, np.float32).tobytes()}
    # a file symlink, as in the Hugging Face cache: the blob is replaced, the link stays
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "blobs" / "0123abcd")
    link = tmp_path / "snapshot" / "model.safetensors"
    link.symlink_to("../blobs/0123abcd")
    jw.save_file({"w": np.zeros(3, np.float32)}, link)
    jw.save({"v": jnp.ones(1)}, link)
    assert os.readlink(link) == "../blobs/0123abcd" and listing(tmp_path / "blobs") == ["0123abcd"]
    assert tensors_in(link) == {"v": np.ones(1, np.float32).tobytes()}
    # a dangling symlink: the save creates what it names
    (tmp_path / "next").symlink_to("step_2")
    jw.save({"w": jnp.ones(2)}, tmp_path / "next")
    assert (tmp_path / "next").is_symlink() and listing(tmp_path / "step_2") == ["model.safetensors"]
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(CheckpointWriteError, match=r"loop failed: it is a symlink that never reaches"):
        jw.save({"w": jnp.ones(2)}, tmp_path / "loop")


def test_a_single_file_save_onto_a_folder_is_a_write_error(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "w.safetensors").mkdir()
    with pytest.raises(
        CheckpointWriteError, match=r"ckpt failed: it is a folder\. Pass a file name inside it"
    ):
        jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "ckpt")
    with pytest.raises(CheckpointWriteError, match=r"w\.safetensors failed: it is a folder"):
        jw.save({"w": jnp.ones(2)}, tmp_path / "w.safetensors")
    assert listing(tmp_path) == ["ckpt", "w.safetensors"] and not any(tmp_path.rglob("*/*"))


def _fail_writing_save(monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    def fail(writer: Any, out: Any, value: Any) -> None:
        raise error

    monkeypatch.setattr(save_module, "_write_value", fail)


def _fail_writing_save_file(monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    def fail(out: Any, value: Any) -> None:
        raise error

    monkeypatch.setattr(safetensors_module, "write_array", fail)


@pytest.mark.parametrize(
    ("save", "break_it"),
    [
        (lambda path, value: jw.save({"w": value}, path), _fail_writing_save),
        (lambda path, value: jw.save_file({"w": np.asarray(value)}, path), _fail_writing_save_file),
    ],
    ids=["save", "save_file"],
)
@pytest.mark.parametrize(
    ("code", "reason", "fix"),
    [
        (errno.ENOSPC, "No space left on device", "free space on that disk"),
        (errno.EDQUOT, "Disk quota exceeded", "free space within your disk quota"),
        (errno.EIO, "Input/output error", "check the path and the disk"),
    ],
)
def test_a_failed_write_is_a_write_error_that_leaves_the_previous_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    save: Any,
    break_it: Any,
    code: int,
    reason: str,
    fix: str,
) -> None:
    path = tmp_path / "m.safetensors"
    save(path, jnp.ones(4))
    before = path.read_bytes()
    break_it(monkeypatch, OSError(code, reason))
    with pytest.raises(CheckpointWriteError) as caught:
        save(path, jnp.zeros(4))
    assert str(caught.value).startswith(f"Saving to {path} failed while writing the ")
    assert f": {reason}. Nothing was replaced and no temporary file was left; {fix}" in str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.file == str(path)
    assert path.read_bytes() == before and listing(tmp_path) == ["m.safetensors"]


def test_a_refused_rename_into_place_is_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
    before = path.read_bytes()
    original = os.replace

    def refused(source: Any, target: Any, **kwargs: Any) -> None:
        if Path(target) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        original(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(
        CheckpointWriteError,
        match=r"failed while renaming the file into place: Permission denied\. .* make the folder writable",
    ):
        jw.save_file({"w": np.zeros(2, np.float32)}, path)
    assert path.read_bytes() == before and listing(tmp_path) == ["m.safetensors"]


def test_a_file_in_the_way_of_the_parent_folder(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    with pytest.raises(CheckpointWriteError, match=r"creating a temporary folder beside .*: File exists"):
        jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "blocker" / "m.safetensors")
    with pytest.raises(CheckpointWriteError, match=r"a file is in the way on that path"):
        jw.save({"w": jnp.ones(2)}, tmp_path / "blocker" / "ckpt")
    assert listing(tmp_path) == ["blocker"]


def test_a_carried_over_folder_that_fills_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    before = snapshot(folder)

    def cross_device(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(shutil, "copy2", full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=r"failed while copying tokenizer into the new checkpoint: No space left on device\. "
        r"Nothing was replaced and no temporary file was left; free space",
    ):
        jw.save({"w": jnp.zeros(4)}, folder)
    assert snapshot(folder) == before and listing(tmp_path) == ["ckpt"]


def _permissions_restrict(folder: Path) -> bool:
    """False for root (or a process with CAP_DAC_OVERRIDE), which writes into read-only folders."""
    probe = folder / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    return False


def test_a_read_only_folder_is_a_write_error(tmp_path: Path) -> None:
    if os.geteuid() == 0 and not _permissions_restrict(tmp_path):
        pytest.skip("running as root: chmod does not restrict writes")
    file = jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
    folder = jw.save({"w": jnp.ones(2)}, tmp_path / "ckpt")
    before = snapshot(tmp_path)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(
            CheckpointWriteError, match=r"Permission denied\. Nothing was replaced .*writable"
        ):
            jw.save_file({"w": np.zeros(2, np.float32)}, file)
        with pytest.raises(
            CheckpointWriteError, match=r"Permission denied\. Nothing was replaced .*writable"
        ):
            jw.save({"w": jnp.zeros(2)}, folder)
        with pytest.raises(
            CheckpointWriteError, match=r"Permission denied\. Nothing was replaced .*writable"
        ):
            jw.save({"w": jnp.zeros(2)}, tmp_path / "new")
    finally:
        tmp_path.chmod(0o755)
    assert snapshot(tmp_path) == before


def test_a_file_added_to_the_folder_during_a_save_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = jw.save({"w": jnp.ones(4)}, tmp_path / "ckpt")
    original = libc_module.exchange

    def exchange_late(first: Path, second: Path) -> int | None:
        (second / "added.txt").write_text("late")  # after the carry-over, just before the swap
        return original(first, second)

    monkeypatch.setattr(libc_module, "exchange", exchange_late)
    jw.save({"w": jnp.zeros(4)}, folder)
    assert listing(folder) == ["added.txt", "model.safetensors"] and listing(tmp_path) == ["ckpt"]
    assert (folder / "added.txt").read_text() == "late"


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umasks_mode_and_an_existing_folder_keeps_its_own(
    tmp_path: Path, umask_022: None
) -> None:
    values = {f"w{i}": jnp.full((256,), i, jnp.float32) for i in range(5)}
    folder = jw.save(values, tmp_path / "runs" / "ckpt", max_shard_size="2.5kB")
    assert (mode(tmp_path / "runs"), mode(folder)) == (0o755, 0o755)
    assert {mode(path) for path in folder.iterdir()} == {0o644} and len(listing(folder)) == 4
    assert mode(jw.save_file({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors")) == 0o644
    assert mode(jw.save({"w": jnp.ones(2)}, tmp_path / "w.safetensors")) == 0o644
    assert mode(jw.save({"w": jnp.ones(2)}, folder)) == 0o755
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    (private / "config.json").write_text("{}")
    (private / "config.json").chmod(0o600)
    jw.save({"w": jnp.ones(2)}, private)
    assert (mode(private), mode(private / "model.safetensors"), mode(private / "config.json")) == (
        0o700,
        0o644,
        0o600,
    )
    os.umask(0o077)
    secret = jw.save({"w": jnp.ones(2)}, tmp_path / "secret")
    assert (mode(secret), mode(secret / "model.safetensors")) == (0o700, 0o600)


def test_weight_data_saves_as_it_is(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16)}
    weights = jw.load_weights(jw.save_file(tensors, tmp_path / "m.safetensors"))
    copy = jw.load_weights(
        jw.save_file({n: w.data() for n, w in weights.items()}, tmp_path / "n.safetensors")
    )
    assert copy.a.data().data.tolist() == tensors["a"].tolist() and copy.b.data().dtype is jw.DType.bfloat16
