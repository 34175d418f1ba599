from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights.errors import (
    ArgumentError,
    CheckpointChangedError,
    CheckpointError,
    CheckpointReadError,
    ShapeMismatchError,
)


def test_copy_into_counts_bytes_and_checks_bounds(write_reference: Callable[..., Path]) -> None:
    values = np.arange(100, dtype=np.float32)
    with jw.open_checkpoint(write_reference({"v": values})) as checkpoint:
        info = checkpoint["v"]
        out = np.empty(40, np.float32)
        checkpoint.copy_into(info, out, offset=40)
        np.testing.assert_array_equal(out, values[10:50])
        assert checkpoint.bytes_copied == 160
        with pytest.raises(
            ShapeMismatchError, match=r"bytes \[240, 440\) are outside tensor 'v', which holds 400"
        ):
            checkpoint.copy_into(info, np.empty(50, np.float32), offset=240)
        with pytest.raises(ArgumentError, match=r"C-contiguous, writeable output buffer for tensor 'v'"):
            checkpoint.copy_into(info, np.empty((10, 2), np.float32)[:, 0])
        fresh = checkpoint.read(info)
        assert fresh.flags.writeable and fresh.ctypes.data % 64 == 0
        np.testing.assert_array_equal(fresh, values)
        assert checkpoint.nbytes == 400 and len(checkpoint) == 1 and "v" in checkpoint
        assert repr(checkpoint) == "<Checkpoint safetensors: 1 tensors in 1 file(s)>"


def test_a_file_truncated_after_opening_is_an_error_not_a_crash(write_reference: Callable[..., Path]) -> None:
    path = write_reference({"v": np.arange(1 << 16, dtype=np.float32)})
    checkpoint = jw.open_checkpoint(path)
    with open(path, "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(CheckpointChangedError, match=r"changed size \(262\d+ -> 200 bytes\)"):
        checkpoint.view(checkpoint["v"])
    with pytest.raises(CheckpointChangedError, match=r"model.safetensors changed size .* re-open"):
        checkpoint.read(checkpoint["v"])  # checked before the preadv: an error, not a SIGBUS
    checkpoint.close()


def test_closed_checkpoint_refuses_reads_but_views_stay_valid(write_reference: Callable[..., Path]) -> None:
    values = np.arange(10, dtype=np.float32)
    checkpoint = jw.open_checkpoint(write_reference({"v": values}))
    view = checkpoint.view(checkpoint["v"])
    checkpoint.close()
    np.testing.assert_array_equal(view, values)  # the map lives while a view does
    with pytest.raises(CheckpointError, match="is closed; open it again"):
        checkpoint.view(checkpoint["v"])


def test_special_files_are_refused_without_opening(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe.safetensors is not a regular file"):
        jw.load_weights(fifo)  # opening a FIFO for reading would block forever


def test_public_classes_show_their_public_module() -> None:
    for cls in (jw.Checkpoint, jw.TensorInfo, jw.WeightsFormat, jw.QuantizationEncoding, jw.BlockParameters):
        assert cls.__module__ == "jaxweights" and getattr(jw, cls.__name__) is cls


def test_copy_block_releases_the_pages_of_a_strided_block(write_reference: Callable[..., Path]) -> None:
    values = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    with jw.open_checkpoint(write_reference({"v": values})) as checkpoint:
        out = np.empty((2, 3, 5), np.float64)
        checkpoint.copy_block(checkpoint["v"], out, ((1, 3), (2, 5), (0, 5)))
        np.testing.assert_array_equal(out, values[1:3, 2:5])
        assert checkpoint.bytes_copied == out.size * 4


def aged(path: Path) -> Path:
    """Sets the file's modification time far back, so a rewrite within the same clock tick still shows."""
    os.utime(path, ns=(10**18, 10**18))
    return path


def test_a_file_replaced_by_rename_before_its_first_read_is_refused(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    path = aged(write_reference({"v": np.arange(4, dtype=np.int32)}))
    checkpoint = jw.open_checkpoint(path)
    other = write_reference({"v": np.arange(4, dtype=np.float32)}, name="other.safetensors")
    os.replace(other, path)  # same size, same layout: only the inode tells
    with pytest.raises(CheckpointChangedError, match=r"model.safetensors was replaced by another file"):
        checkpoint.view(checkpoint["v"])
    checkpoint.close()


def test_a_file_replaced_by_rename_after_opening_is_read_whole_from_the_old_inode(
    write_reference: Callable[..., Path], tmp_path: Path
) -> None:
    tensors = {"a": np.arange(4, dtype=np.int32), "b": np.arange(8, dtype=np.int32)}
    path = jw.save_file(tensors, tmp_path / "model.safetensors")  # aligned: CPU arrays alias the map
    weights = jw.load_weights(path)
    first = weights.a.allocate().array
    assert first.unsafe_buffer_pointer() % 64 == 0
    view = weights.b.data().data
    other = write_reference({"a": -np.ones(4, np.int32), "b": -np.ones(8, np.int32)}, name="o.safetensors")
    os.replace(other, path)  # how jw.save replaces files: the old inode lives while it is open
    assert first.tolist() == [0, 1, 2, 3] and view.tolist() == list(range(8))
    assert weights.b.allocate().array.tolist() == list(range(8))  # the open file is the old one, whole
    weights.close()
    assert jw.load_weights(path).a.allocate().array.tolist() == [-1] * 4


def test_a_file_rewritten_in_place_is_an_error_on_the_next_read(write_reference: Callable[..., Path]) -> None:
    path = aged(write_reference({"v": np.arange(4, dtype=np.int32)}))
    weights = jw.load_weights(path)
    assert weights.v.allocate().array.tolist() == [0, 1, 2, 3]
    data = path.read_bytes()
    with open(path, "r+b") as handle:  # what `cp new.safetensors model.safetensors` does: same inode
        handle.write(data[:-16] + np.full(4, 7, np.int32).tobytes())
    with pytest.raises(CheckpointChangedError, match=r"model.safetensors was modified .* re-open"):
        weights.v.allocate()
    with pytest.raises(CheckpointChangedError, match="was modified"):
        weights.v.data()


def test_a_save_over_an_open_folder_never_mixes_old_and_new_tensors(tmp_path: Path) -> None:
    old = {f"layer{i}": np.full(1000, i, np.float32) for i in range(4)}
    folder = jw.save(old, tmp_path / "ckpt", max_shard_size=4000)
    for file in folder.glob("*.safetensors"):
        aged(file)
    weights = jw.load_weights(folder)
    assert weights.layer0.allocate().array[0] == 0  # opens the first shard only
    jw.save({name: value + 10 for name, value in old.items()}, folder, max_shard_size=4000)
    assert weights.layer0.allocate().array[0] == 0  # the open shard: old, whole
    with pytest.raises(CheckpointChangedError, match="was replaced by another file"):
        weights.layer3.allocate()  # a shard first opened after the save: new bytes, refused
    assert jw.load_weights(folder).layer3.allocate().array[0] == 13


def test_without_mmap_no_page_is_mapped_and_rewrites_change_nothing(
    write_reference: Callable[..., Path],
) -> None:
    values = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    path = write_reference({"a": values, "b": values[:16]}, name="aligned.safetensors")
    weights = jw.load_weights(path, mmap=False)
    arrays = weights.allocate_all()
    data = weights.a.data().data
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    columns = weights.a.allocate(device=NamedSharding(mesh, P(None, "x"))).array
    checkpoint = weights.checkpoint
    before = checkpoint.bytes_copied
    rows = weights.a.allocate(device=NamedSharding(mesh, P("x"))).array
    assert checkpoint.bytes_copied - before == values.nbytes  # each device's rows, read once
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()
    with open(path, "r+b") as handle:  # a truncation would kill a process reading mapped pages
        handle.truncate(100)
    np.testing.assert_array_equal(np.asarray(arrays["a"]), values)
    np.testing.assert_array_equal(np.asarray(columns), values)
    np.testing.assert_array_equal(np.asarray(rows), values)
    np.testing.assert_array_equal(data, values)
    with pytest.raises(CheckpointChangedError, match="changed size"):
        weights.b.allocate()


def test_close_during_concurrent_reads_gives_arrays_or_our_error(
    write_reference: Callable[..., Path],
) -> None:
    tensors = {f"t{i}": np.full((64, 64), i, np.float32) for i in range(64)}
    for mapped in (True, False):
        weights = jw.load_weights(write_reference(tensors, name=f"m{mapped}.safetensors"), mmap=mapped)
        outcomes: list[object] = []

        def read(name: str, accessor: jw.Weights = weights, found: list[object] = outcomes) -> None:
            try:
                found.append(float(accessor[name].allocate().array[0, 0]))
            except jw.errors.WeightsError as error:
                found.append(error)
            except BaseException as error:  # what must not happen
                found.append(("raw", error))

        threads = [threading.Thread(target=read, args=(name,)) for name in tensors]
        for index, thread in enumerate(threads):
            thread.start()
            if index == 16:
                weights.close()
        for thread in threads:
            thread.join()
        assert len(outcomes) == 64
        assert not [o for o in outcomes if isinstance(o, tuple)], outcomes
        errors = [o for o in outcomes if isinstance(o, Exception)]
        assert all(isinstance(e, CheckpointError) and "is closed" in str(e) for e in errors)


def test_unreadable_files_give_our_errors(tmp_path: Path, write_reference: Callable[..., Path]) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").mkdir()
    with pytest.raises(CheckpointReadError, match=r"model.safetensors is a folder, not a regular file"):
        jw.load_weights(folder)
    with pytest.raises(CheckpointReadError, match="is a folder"):
        jw.weights_format(folder)
    loop = tmp_path / "loop" / "model.safetensors"
    loop.parent.mkdir()
    loop.symlink_to(loop)
    for given in (loop, loop.parent):
        with pytest.raises(CheckpointReadError, match="is a symlink loop"):
            jw.load_weights(given)
    broken = tmp_path / "broken" / "model.safetensors"
    broken.parent.mkdir()
    broken.symlink_to(tmp_path / "nowhere")
    for given in (broken, broken.parent):
        with pytest.raises(jw.errors.CheckpointNotFoundError, match="symlink to a file that does not exist"):
            jw.load_weights(given)
    fifo_folder = tmp_path / "fifo"
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "model.safetensors.index.json")
    with pytest.raises(CheckpointReadError, match=r"index.json is a FIFO \(named pipe\)"):
        jw.load_weights(fifo_folder)  # would block forever if opened for reading
    if os.geteuid() != 0:  # root reads everything
        secret = write_reference({"v": np.ones(2, np.float32)}, name="secret.safetensors")
        secret.chmod(0)
        with pytest.raises(CheckpointReadError, match="permission denied"):
            jw.load_weights(secret)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((0, 2**63), r"dimension 9223372036854775808 exceeds 2\*\*60"),
        ((0, 2**31, 2**30), r"the product of its non-zero dimensions exceeds 2\*\*60"),
        ((1,) * 65, "65 dimensions, more than 64"),
    ],
)
def test_shapes_no_array_can_have_are_refused_whatever_the_format(
    shape: tuple[int, ...], message: str
) -> None:
    info = jw.TensorInfo("w", jw.DType.float32, shape, Path("m.bin"), 0, 0 if 0 in shape else 4)
    with pytest.raises(CheckpointError, match=rf"Tensor 'w' in m.bin has shape .*{message}"):
        jw.Checkpoint(jw.WeightsFormat.pytorch, {"w": info}, [Path("m.bin")])
    fine = info._replace(shape=(0, 2**40)) if 0 in shape else info._replace(shape=(1,) * 64)
    assert len(jw.Checkpoint(jw.WeightsFormat.pytorch, {"w": fine}, [Path("m.bin")])) == 1
