"""`CheckpointManager`: numbered steps, retention, async saves that survive donation, failures that
surface, foreign folders, and kills during a save."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jaxweights as jw
import jaxweights._save
from jaxweights._manager import IncompleteStepWarning
from jaxweights.errors import ArgumentError, CheckpointNotFoundError, CheckpointWriteError

REPO = Path(__file__).resolve().parents[1]


def state(value: float, size: int = 16) -> dict[str, Any]:
    return {
        "params": {"w": jnp.full((size,), float(value)), "b": jnp.arange(4.0) + value},
        "step": int(value),
    }


def target() -> dict[str, Any]:
    return {"params": {"w": jnp.zeros(16), "b": jnp.zeros(4)}, "step": 0}


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("async_save", [True, False])
def test_steps_are_plain_safetensors_folders(tmp_path: Path, async_save: bool) -> None:
    with jw.CheckpointManager(tmp_path, async_save=async_save) as manager:
        assert manager.latest_step() is None and manager.all_steps() == []
        for step in (1, 5, 10):
            manager.save(step, state(step), metadata={"run": "a"})
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 5, 10] and manager.latest_step() == 10
        restored = manager.restore(target())
        assert restored["step"] == 10 and restored["params"]["w"].tolist() == [10.0] * 16
        assert manager.restore(target(), step=5)["step"] == 5
        stats = manager.last_save_stats
        assert stats is not None and stats.step == 10 and stats.write_s is not None
        assert stats.snapshot_bytes == ((16 + 4) * 4 if async_save else 0)
    assert entries(tmp_path) == ["1", "10", "5"]
    tensors = safetensors.numpy.load_file(str(tmp_path / "5" / "model.safetensors"))
    assert tensors["params.w"].tolist() == [5.0] * 16
    assert jw.load_weights(tmp_path / "5").params.b.data().shape == (4,)


def test_restore_passes_options_through(tmp_path: Path) -> None:
    with jw.CheckpointManager(tmp_path) as manager:
        manager.save(0, state(1.0))
        partial = manager.restore({"params": {"w": jnp.zeros(16)}}, strict=False)
    assert partial["params"]["w"].tolist() == [1.0] * 16


def test_restore_without_steps(tmp_path: Path) -> None:
    manager = jw.CheckpointManager(tmp_path / "new")
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint step"):
        manager.restore(target())
    manager.save(3, state(3.0))
    with pytest.raises(CheckpointNotFoundError, match=r"Step 4 is not in .*the steps there are \[3\]"):
        manager.restore(target(), step=4)
    manager.close()


def test_retention_keeps_newest_and_every_n(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with jw.CheckpointManager(tmp_path, max_to_keep=2, keep_every_n_steps=4) as manager:
        for step in range(10):
            manager.save(step, state(float(step)))
            manager.wait_until_finished()
            assert step in manager.all_steps()  # the newest is never deleted
    assert entries(tmp_path) == ["0", "4", "8", "9", "notes"]


def test_same_step_twice_needs_overwrite(tmp_path: Path) -> None:
    with jw.CheckpointManager(tmp_path) as manager:
        manager.save(2, state(2.0))
        with pytest.raises(ArgumentError, match=r"Step 2 already exists in .*overwrite=True"):
            manager.save(2, state(7.0))
        manager.save(2, state(7.0), overwrite=True)
        assert manager.restore(target())["step"] == 7
    assert entries(tmp_path) == ["2"]


def test_lower_step_names_both(tmp_path: Path) -> None:
    with jw.CheckpointManager(tmp_path) as manager:
        manager.save(5, state(5.0))
        with pytest.raises(ArgumentError, match="Cannot save step 3: it is lower than the latest step 5"):
            manager.save(3, state(3.0))
        for bad in (-1, True, 1.5):
            with pytest.raises(ArgumentError, match="non-negative integer"):
                manager.save(bad, state(3.0))  # type: ignore[arg-type]


def test_foreign_folders_are_ignored_and_kept(tmp_path: Path) -> None:
    for name in ("tensorboard", "007", "-1", "3.5"):
        (tmp_path / name).mkdir()
    (tmp_path / "README").write_text("mine")
    (tmp_path / "4").mkdir()  # an integer name, but no checkpoint
    manager = jw.CheckpointManager(tmp_path, max_to_keep=1)
    with pytest.warns(IncompleteStepWarning, match=r"4 is not a complete checkpoint.*step 4 is skipped"):
        assert manager.all_steps() == []
    assert manager.all_steps() == []  # warned once per folder
    manager.save(1, state(1.0))
    manager.save(2, state(2.0))
    manager.close()
    assert entries(tmp_path) == ["-1", "007", "2", "3.5", "4", "README", "tensorboard"]


def test_step_deleted_by_hand(tmp_path: Path) -> None:
    with jw.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, state(float(step)))
        manager.wait_until_finished()
        shutil.rmtree(tmp_path / "3")
        assert manager.all_steps() == [1, 2]
        (tmp_path / "2" / "model.safetensors").unlink()  # its files deleted, the folder left
        with pytest.warns(IncompleteStepWarning, match="step 2 is skipped"):
            assert manager.latest_step() == 1
        assert manager.restore(target())["step"] == 1


def test_snapshot_survives_donation(tmp_path: Path) -> None:
    @functools.partial(jax.jit, donate_argnums=0)
    def update(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return jax.tree.map(lambda x: x * 2.0 + 1.0, params)

    params = {"w": jnp.arange(1 << 18, dtype=jnp.float32), "b": jnp.ones((64, 64))}
    expected = []
    with jw.CheckpointManager(tmp_path) as manager:
        for step in range(4):
            expected.append(jax.tree.map(np.array, params))
            manager.save(step, params)
            params = update(params)  # donates the buffers the save was given
        jax.block_until_ready(params)
    np.testing.assert_array_equal(np.asarray(params["b"]), np.full((64, 64), 31.0))  # the steps ran right
    for step, want in enumerate(expected):
        got = safetensors.numpy.load_file(str(tmp_path / str(step) / "model.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_snapshot_copies_host_arrays(tmp_path: Path) -> None:
    values = np.arange(8.0)
    with jw.CheckpointManager(tmp_path) as manager:
        manager.save(0, {"x": values})
        values[:] = -1  # changed at once, while the write may still run
    assert safetensors.numpy.load_file(str(tmp_path / "0" / "model.safetensors"))["x"].tolist() == list(
        np.arange(8.0)
    )


def test_sharded_state(tmp_path: Path) -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    tree = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), sharding)}
    with jw.CheckpointManager(tmp_path) as manager:
        manager.save(1, tree)
        abstract = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)}
        restored = manager.restore(abstract)
    assert restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64.0).reshape(16, 4))


def failing_save(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("surfaces_on", ["wait_until_finished", "save", "close"])
def test_failed_background_write_surfaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, surfaces_on: str
) -> None:
    manager = jw.CheckpointManager(tmp_path)
    manager.save(1, state(1.0))
    manager.wait_until_finished()
    monkeypatch.setattr(jaxweights._save, "save", failing_save)
    manager.save(2, state(2.0))  # returns: the write fails in the background
    match = (
        r"background save of step 2 to .* failed.*No space left on device.*latest complete step there is 1"
    )
    with pytest.raises(CheckpointWriteError, match=match) as caught:
        if surfaces_on == "save":
            manager.save(3, state(3.0))
        else:
            getattr(manager, surfaces_on)()
    assert isinstance(caught.value.__cause__, OSError)
    assert "free space on that disk" in str(caught.value)  # the staging protocol's fix
    monkeypatch.undo()
    manager.close()  # raised once, not again
    assert jw.CheckpointManager(tmp_path).all_steps() == [1]
    assert entries(tmp_path) == ["1"]  # no temporary entry left


def test_synchronous_failure_raises_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = jw.CheckpointManager(tmp_path, async_save=False)
    monkeypatch.setattr(jaxweights._save, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        manager.save(1, state(1.0))
    assert entries(tmp_path) == []


def test_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renaming the step into place refused (as on a read-only mount, which root cannot bypass)."""
    manager = jw.CheckpointManager(tmp_path)
    real_rename = os.rename

    def rename(source: Any, destination: Any) -> None:
        if Path(destination).name.isdigit():
            raise OSError(errno.EROFS, "Read-only file system")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    manager.save(1, state(1.0))
    with pytest.raises(CheckpointWriteError, match=r"renaming the step into place.*mounted read-only"):
        manager.wait_until_finished()
    monkeypatch.undo()
    assert entries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_directory(tmp_path: Path) -> None:
    manager = jw.CheckpointManager(tmp_path / "ckpt")
    (tmp_path / "ckpt").chmod(0o555)
    try:
        manager.save(1, state(1.0))
        with pytest.raises(CheckpointWriteError, match="make the folder writable"):
            manager.close()
    finally:
        (tmp_path / "ckpt").chmod(0o755)


def test_closed_manager_refuses_saves(tmp_path: Path) -> None:
    manager = jw.CheckpointManager(tmp_path)
    manager.close()
    manager.close()
    with pytest.raises(ArgumentError, match="is closed"):
        manager.save(0, state(0.0))
    with pytest.raises(ArgumentError, match="max_to_keep=0"):
        jw.CheckpointManager(tmp_path, max_to_keep=0)


KILLED_WRITER = r"""
import sys, time
import numpy as np
import jaxweights as jw, jaxweights._save

folder, where = sys.argv[1], sys.argv[2]
manager = jw.CheckpointManager(folder, max_to_keep=1)
manager.save(1, {"w": np.arange(1 << 16, dtype=np.float32), "step": 1})
manager.wait_until_finished()
real = jaxweights._save.save

def save(tree, path, **options):
    if where == "before":
        print("writing", flush=True); time.sleep(60)
    if where == "during":
        print("writing", flush=True)
    path = real(tree, path, **options)
    print("written", flush=True); time.sleep(60)

jaxweights._save.save = save
manager.save(2, {"w": np.ones(1 << 22, dtype=np.float32), "step": 2})
time.sleep(60)
"""


@pytest.mark.parametrize("where", ["before", "during", "after"])
def test_kill_during_async_save(tmp_path: Path, where: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), where],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()  # the background write has begun (or, after, ended)
        assert line in {"writing", "written"}
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
        if child.stdout is not None:
            child.stdout.close()
    manager = jw.CheckpointManager(tmp_path, max_to_keep=1)
    assert manager.all_steps() == [1]
    restored = manager.restore({"w": jnp.zeros(1 << 16), "step": 0})
    assert restored["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1 << 16, dtype=np.float32))
    manager.save(3, {"w": jnp.zeros(4), "step": 3})
    manager.close()
    assert entries(tmp_path) == ["3"]  # no stray temporary folder; step 1 retired after 3


MULTIPROCESS_WORKER = r"""
import json, os, sys
import jax
pid, port, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
)
import numpy as np, jax.numpy as jnp
import jaxweights as jw
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
def values(step):
    return np.arange(64.0, dtype=np.float32).reshape(16, 4) + step
def tree(step):
    array = jax.make_array_from_callback((16, 4), sharding, lambda index: values(step)[index])
    return {"w": array, "step": step}

manager = jw.CheckpointManager(folder, max_to_keep=1)
for step in (1, 2):
    manager.save(step, tree(step))
target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding), "step": 0}
restored = manager.restore(target)
ok = all(np.array_equal(np.asarray(s.data), values(2)[s.index]) for s in restored["w"].addressable_shards)
result = {"ok": ok, "async": manager.async_save, "step": restored["step"], "steps": manager.all_steps()}
manager.close()
with open(out, "w") as handle:
    json.dump(result, handle)
jax.distributed.shutdown()
"""


def test_two_processes(tmp_path: Path) -> None:
    """A 2-process job on 127.0.0.1 (4 CPU devices each) saves a globally sharded array every step."""
    import json
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    folder = tmp_path / "ckpt"
    outputs = [tmp_path / f"{pid}.json" for pid in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_WORKER, str(pid), port, str(folder), str(outputs[pid])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=180)[0].decode(errors="replace")[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert all(path.exists() for path in outputs), "\n".join(logs)
    for path in outputs:
        result = json.loads(path.read_text())
        assert result == {"ok": True, "async": False, "step": 2, "steps": [2]}, logs
    assert entries(folder) == ["2"]
    tensors = safetensors.numpy.load_file(str(folder / "2" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["w"], np.arange(64.0, dtype=np.float32).reshape(16, 4) + 2)


def test_a_leaf_that_cannot_be_stored_fails_in_save_itself(tmp_path: Path) -> None:
    with jw.CheckpointManager(tmp_path / "ckpts") as manager:
        with pytest.raises(jw.errors.StructureMismatchError, match=r"w: an abstract ShapeDtypeStruct"):
            manager.save(1, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        manager.save(1, {"w": jnp.ones(2)})  # the manager is not poisoned by it
        manager.wait_until_finished()
        assert manager.all_steps() == [1]
