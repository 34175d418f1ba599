"""Training checkpoints: `CheckpointManager` saves numbered steps (``directory/<step>/``, each a plain
safetensors folder `load_weights` and the ``safetensors`` library read), asynchronously, with retention.

A step becomes visible only once complete and durable: it is written by `jaxweights.save` inside a
staging folder of the `_staging` protocol (``.<step>.PID-RANDOM.saving``, locked), renamed into place
and the directory fsynced. Old steps are deleted only after a newer one is durable, renamed to a
temporary name first, so a crash never leaves half a step under an integer name. Leftovers of killed
saves are swept by `remove_stale` (only names the protocol makes, only those no live save holds).

An asynchronous save snapshots the tree first (on CPU its buffers are pinned by NumPy views, which the
runtime never donates; on accelerators every array is copied on its device), so that a jitted step given
the same arrays with ``donate_argnums`` cannot reach the write; then it writes in one background thread; at most one
save is in flight. A background failure is raised, as a `CheckpointWriteError`, by the next `save`,
`wait_until_finished` or `close`: never dropped.

Never parses or writes file bytes itself (`jaxweights.save` and `jaxweights.restore` do), and never
deletes a name it did not make: non-integer names in the directory are ignored.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _save
from ._devices import is_cpu_only
from ._libc import exchange, fsync_dir
from ._pytree import split_module
from ._staging import remove_stale, staging, write_error
from .errors import ArgumentError, CheckpointNotFoundError, CheckpointWriteError

__all__ = ["CheckpointManager", "IncompleteStepWarning", "SaveStats"]

_STEP = re.compile(r"0|[1-9][0-9]*")
"""A step folder's name: a non-negative integer written without leading zeros."""

_TEMPORARY = re.compile(r"\.(0|[1-9][0-9]*)\..+")
"""A temporary entry beside a step folder (``.<step>.PID-RANDOM.saving`` and the like)."""

_COMPLETE = ("model.safetensors", "model.safetensors.index.json")
"""A step folder holding one of these is a complete checkpoint (`jaxweights.save` writes one of them)."""


class IncompleteStepWarning(UserWarning):
    """An integer-named folder in a manager's directory is not a complete checkpoint; it is skipped.

    Example:
        >>> import os, tempfile, warnings, jaxweights as jw
        >>> folder = tempfile.mkdtemp()
        >>> os.mkdir(f"{folder}/3")  # an integer-named folder that holds no checkpoint
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     steps = jw.CheckpointManager(folder).all_steps()
        >>> steps, [warning.category.__name__ for warning in caught]
        ([], ['IncompleteStepWarning'])
    """

    __module__ = "jaxweights"


@dataclasses.dataclass(frozen=True)
class SaveStats:
    """What one `CheckpointManager.save` cost.

    Attributes:
        step: the step saved.
        snapshot_bytes: bytes of arrays the snapshot holds (pinned on CPU, copied elsewhere) until the
            write ends; 0 for a synchronous save, which needs no snapshot.
        blocked_s: seconds the caller was blocked in ``save`` (waiting for the previous save included).
        waited_s: of ``blocked_s``, seconds spent waiting for the previous save to finish.
        write_s: seconds the write took until the step was durable; None while it runs.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
        >>> stats = manager.save(0, {"w": jnp.ones(4)})
        >>> stats.step, stats.snapshot_bytes, stats.write_s is not None  # synchronous: no snapshot
        (0, 0, True)
    """

    __module__ = "jaxweights"

    step: int
    snapshot_bytes: int
    blocked_s: float
    waited_s: float
    write_s: float | None = None


@jax.jit
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    """New device buffers with the same values and shardings: one dispatch for the whole tree."""
    return [jnp.copy(array) for array in arrays]


def _pin(array: jax.Array) -> list[np.ndarray]:
    """NumPy views of ``array``'s CPU buffers, which keep the buffers (and so ``array``) as they are.

    A view is an external reference to its buffer, and the runtime never donates a buffer with external
    references: a jitted step given ``array`` with ``donate_argnums`` allocates new buffers instead and
    ``array`` stays valid, unchanged. (Where the runtime cannot alias, a view is a copy.)
    """
    return [np.asarray(shard.data) for shard in array.addressable_shards]


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """A tree no later change to the caller's buffers (donation included) can reach, until it is dropped."""

    tree: Any
    pins: list[np.ndarray]
    nbytes: int


def _snapshot(tree: Any) -> _Snapshot:
    """Snapshots ``tree`` for a background write.

    Arrays on CPU devices are kept and their buffers pinned (`_pin`: no copy); arrays on accelerators are
    copied on their devices (dispatched, not waited for: the runtime orders the copy before any later use
    of the buffers, donation included); NumPy arrays are copied; other leaves are kept.
    """
    module = split_module(tree)
    if module is not None:
        tree = module[0]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    total = 0
    pins: list[np.ndarray] = []
    on_device = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            total += int(leaf.nbytes)
            if leaf.is_fully_addressable and is_cpu_only(leaf.sharding):
                pins.extend(_pin(leaf))
            else:
                on_device.append(i)
        elif isinstance(leaf, np.ndarray):
            leaves[i] = np.array(leaf, copy=True)
            total += leaf.nbytes
    copies = _copy_arrays([leaves[i] for i in on_device]) if on_device else []
    for i, copy in zip(on_device, copies, strict=True):
        leaves[i] = copy
    return _Snapshot(jax.tree_util.tree_unflatten(treedef, leaves), pins, total)


def _is_complete(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _COMPLETE)


def _discard_name(folder: Path) -> Path:
    """A name the staging protocol sweeps (``.<step>.PID-RANDOM.saving``) for a step folder to delete."""
    return folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.saving"


class CheckpointManager:
    """Numbered training checkpoints in ``directory/<step>/``, saved in the background, with retention.

    Args:
        directory: the folder holding one sub-folder per step (created if missing). Names that are not
            integers are ignored and never deleted.
        max_to_keep: keep at most this many of the newest steps (None: all).
        keep_every_n_steps: also keep, forever, every step divisible by this.
        async_save: write in a background thread (``save`` returns once the tree is snapshotted). In a
            multi-process job saves are always synchronous: ``jaxweights.save`` runs collectives, which
            must stay in the training thread's order.

    Example:
        >>> import tempfile, jax.numpy as jnp, jaxweights as jw
        >>> with jw.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
        ...     for step in range(4):
        ...         stats = manager.save(step, {"w": jnp.full(3, float(step)), "step": step})
        ...     restored = manager.restore({"w": jnp.zeros(3), "step": 0})  # waits for step 3
        ...     manager.all_steps(), restored["w"].tolist(), restored["step"], stats.snapshot_bytes
        ([2, 3], [3.0, 3.0, 3.0], 3, 12)
    """

    __module__ = "jaxweights"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = None,
        keep_every_n_steps: int | None = None,
        async_save: bool = True,
    ) -> None:
        for name, value in (("max_to_keep", max_to_keep), ("keep_every_n_steps", keep_every_n_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ArgumentError(f"{name}={value!r}; pass a positive integer, or None.")
        self.directory = Path(directory)
        self.max_to_keep = max_to_keep
        self.keep_every_n_steps = keep_every_n_steps
        self.async_save = async_save and jax.process_count() == 1
        self.last_save_stats: SaveStats | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_step: int | None = None
        self._warned: set[str] = set()
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.directory, "creating the checkpoint directory", error) from error

    def __repr__(self) -> str:
        return f"CheckpointManager({os.fspath(self.directory)!r}, steps={self.all_steps()})"

    # Reading the directory
    # -----------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The complete, durable steps, ascending. A save still in flight is not listed.

        Integer-named folders that are not complete checkpoints (a folder made by hand, a step whose
        files were deleted) are skipped with an `IncompleteStepWarning`, once per folder; other names
        are ignored.

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> for step in (0, 5, 10):
            ...     _ = manager.save(step, {"w": jnp.ones(2)})
            >>> manager.all_steps()
            [0, 5, 10]
        """
        return self._steps(warn=True)

    def _steps(self, *, warn: bool) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        steps = []
        for name in names:
            if not _STEP.fullmatch(name):
                continue
            if _is_complete(self.directory / name):
                steps.append(int(name))
            elif warn and name not in self._warned and (self.directory / name).is_dir():
                self._warned.add(name)
                warnings.warn(
                    f"{self.directory / name} is not a complete checkpoint (no {_COMPLETE[0]} or "
                    f"{_COMPLETE[1]}); step {name} is skipped. Delete or rename the folder if it is not "
                    f"needed.",
                    IncompleteStepWarning,
                    stacklevel=4,
                )
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete, durable step, or None.

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> manager.latest_step() is None
            True
            >>> _ = manager.save(7, {"w": jnp.ones(2)})
            >>> manager.latest_step()
            7
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _latest(self) -> int | None:
        steps = self._steps(warn=False)
        return steps[-1] if steps else None

    def step_path(self, step: int) -> Path:
        """The folder of ``step`` (which may not exist).

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> manager.step_path(3).name, manager.step_path(3).exists()
            ('3', False)
        """
        return self.directory / str(step)

    # Saving
    # -----------------------------------------------------------------------------------------

    def save(
        self, step: int, tree: Any, *, metadata: Mapping[str, str] | None = None, overwrite: bool = False
    ) -> SaveStats:
        """Saves ``tree`` as step ``step``: snapshots it, then writes it (in the background when
        ``async_save``). Waits for the previous save first, so at most one snapshot is held.

        Args:
            step: a non-negative integer, higher than every saved step.
            tree: what `jaxweights.save` takes: a pytree, an optax state, an Equinox or Flax NNX module.
            metadata: extra ``__metadata__`` strings.
            overwrite: replace ``step`` if it exists (atomically); otherwise saving it again is an error.

        Returns:
            The save's `SaveStats` so far (``write_s`` is None while the write runs); the final ones are
            in ``last_save_stats`` once it ended.

        Raises:
            CheckpointWriteError: the previous background save failed (raised once; this save is not
                started), or this save failed (synchronous saves).
            ArgumentError: ``step`` is not a non-negative integer, exists (without ``overwrite``), or is
                lower than the latest step; the manager is closed.
            StructureMismatchError: a leaf cannot be stored (abstract, or neither array nor scalar),
                raised here even for an async save, before anything is snapshotted.

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> stats = manager.save(1, {"w": jnp.ones(2)}, metadata={"note": "warm-up"})
            >>> stats.step, manager.all_steps()
            (1, [1])
        """
        start = time.perf_counter()
        self._check_open()
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ArgumentError(f"step={step!r}; a step is a non-negative integer.")
        step = int(step)
        self.wait_until_finished()
        waited = time.perf_counter() - start
        latest = self.latest_step()
        if latest is not None and step < latest and not (overwrite and step in self.all_steps()):
            raise ArgumentError(
                f"Cannot save step {step}: it is lower than the latest step {latest} in {self.directory}. "
                f"Steps must increase; to start over, use a new directory."
            )
        if not overwrite and self.step_path(step).exists():
            raise ArgumentError(
                f"Step {step} already exists in {self.directory}; pass overwrite=True to replace it."
            )
        _save.savable_leaves(tree)  # a leaf that cannot be stored fails here, not in the background
        info = dict(metadata or {})
        if not self.async_save:  # written before returning: nothing to snapshot
            self._write(step, tree, info, overwrite, SaveStats(step, 0, 0.0, waited), start)
            assert self.last_save_stats is not None
            return self.last_save_stats
        snapshot = _snapshot(tree)
        stats = SaveStats(step, snapshot.nbytes, time.perf_counter() - start, waited)
        self.last_save_stats = stats
        self._thread = threading.Thread(
            target=self._write_in_background,
            args=(step, snapshot, info, overwrite, stats),
            name=f"jaxweights-save-{step}",
        )
        self._thread.start()
        return stats

    def _write_in_background(
        self, step: int, snapshot: _Snapshot, info: dict[str, str], overwrite: bool, stats: SaveStats
    ) -> None:
        try:
            self._write(step, snapshot.tree, info, overwrite, stats, None)
        except BaseException as error:  # surfaced by the next save, wait_until_finished or close
            self._error, self._error_step = error, step

    def _write(
        self,
        step: int,
        snapshot: Any,
        info: dict[str, str],
        overwrite: bool,
        stats: SaveStats,
        start: float | None,
    ) -> None:
        began = time.perf_counter()
        if jax.process_count() > 1:
            self._write_multiprocess(step, snapshot, info, overwrite)
        else:
            self._sweep()
            self._publish(step, snapshot, info, overwrite)
            self._retain(step)
        end = time.perf_counter()
        blocked = stats.blocked_s if start is None else end - start
        self.last_save_stats = dataclasses.replace(stats, blocked_s=blocked, write_s=end - began)

    def _publish(self, step: int, snapshot: Any, info: dict[str, str], overwrite: bool) -> None:
        """Writes ``step`` inside a staging folder, renames it into place, fsyncs the directory."""
        target = self.step_path(step)
        with staging(target) as stage:
            written = stage.folder / "step"
            _save.save(snapshot, written, metadata=info or None)
            stage.doing = "renaming the step into place"
            self._move_into_place(written, target, overwrite, stage.folder)

    def _move_into_place(self, written: Path, target: Path, overwrite: bool, scratch: Path) -> None:
        if overwrite and os.path.lexists(target):
            if exchange(written, target) != 0:  # no renameat2: two renames, the old step aside first
                os.rename(target, scratch / "previous")
                os.rename(written, target)
        elif os.path.lexists(target):  # appeared meanwhile: never replaced without overwrite
            appeared = OSError(errno.EEXIST, f"step folder {target} appeared during the save")
            raise write_error(target, "renaming the step into place", appeared)
        else:
            os.rename(written, target)
        fsync_dir(target.parent)

    def _write_multiprocess(self, step: int, snapshot: Any, info: dict[str, str], overwrite: bool) -> None:
        """Every process calls `jaxweights.save` on one path, which process 0 chose and broadcast;
        process 0 alone renames, fsyncs and deletes old steps; the others wait at a barrier."""
        from jax.experimental import multihost_utils

        target = self.step_path(step)
        primary = jax.process_index() == 0
        if primary:
            self._sweep()
            with staging(target) as stage:
                name = np.frombuffer(stage.folder.name.encode().ljust(256, b"\0"), np.uint8)
                multihost_utils.broadcast_one_to_all(name)
                _save.save(snapshot, stage.folder / "step", metadata=info or None)
                stage.doing = "renaming the step into place"
                self._move_into_place(stage.folder / "step", target, overwrite, stage.folder)
            self._retain(step)
        else:
            raw = multihost_utils.broadcast_one_to_all(np.zeros(256, np.uint8))
            folder = self.directory / bytes(np.asarray(raw, np.uint8)).rstrip(b"\0").decode()
            _save.save(snapshot, folder / "step", metadata=info or None)
        multihost_utils.sync_global_devices(f"jaxweights.CheckpointManager.save:{step}")

    def _sweep(self) -> None:
        """Deletes temporary entries killed saves left beside any step (`remove_stale`: only names the
        staging protocol makes, only those no live save holds)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for step in sorted({match.group(1) for match in map(_TEMPORARY.fullmatch, names) if match}):
            remove_stale(self.step_path(int(step)))

    def _retain(self, newest: int) -> None:
        """Deletes the steps ``max_to_keep`` and ``keep_every_n_steps`` no longer keep (never ``newest``,
        which is durable by now): each is renamed to a temporary name, then removed."""
        if self.max_to_keep is None:
            return
        steps = [step for step in self._steps(warn=False) if step <= newest]
        kept = set(steps[-self.max_to_keep :])
        if self.keep_every_n_steps is not None:
            kept.update(step for step in steps if step % self.keep_every_n_steps == 0)
        for step in steps:
            if step not in kept:
                folder = self.step_path(step)
                doomed = _discard_name(folder)
                try:
                    os.rename(folder, doomed)
                except OSError as error:
                    raise write_error(folder, f"deleting old step {step}", error) from error
                fsync_dir(self.directory)
                shutil.rmtree(doomed, ignore_errors=True)

    # Waiting, restoring, closing
    # -----------------------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Waits for the save in flight, if any.

        Raises:
            CheckpointWriteError: that save failed (raised once, naming the step and the cause).

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp())  # async_save: writes in the background
            >>> _ = manager.save(0, {"w": jnp.ones(2)})
            >>> manager.wait_until_finished()
            >>> manager.all_steps(), manager.last_save_stats.write_s is not None
            ([0], True)
        """
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, step = self._error, self._error_step
        if error is not None:
            self._error = self._error_step = None
            file = getattr(error, "file", None) or self.step_path(step or 0)
            raise CheckpointWriteError(
                f"The background save of step {step} to {self.directory} failed: {error} (the latest "
                f"complete step there is {self._latest()}.)",
                file=file,
            ) from error

    def restore(self, target: Any, step: int | None = None, **options: Any) -> Any:
        """Restores ``step`` (default: the latest, after waiting for a save in flight) into ``target``.

        Args:
            target: as for `jaxweights.restore`.
            step: the step to restore; None for the latest.
            **options: passed to `jaxweights.restore` (``strict``, ``cast``, ``device``, ...).

        Raises:
            CheckpointNotFoundError: there is no complete step (or not ``step``).

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> _ = manager.save(0, {"w": jnp.zeros(2)})
            >>> _ = manager.save(1, {"w": jnp.ones(2)})
            >>> manager.restore({"w": jnp.empty(2)})["w"].tolist()  # the latest step
            [1.0, 1.0]
            >>> manager.restore({"w": jnp.empty(2)}, step=0)["w"].tolist()
            [0.0, 0.0]
        """
        from ._weights import restore

        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(
                    f"{self.directory} holds no complete checkpoint step yet; save one first, or "
                    f"start training from scratch when latest_step() is None.",
                    file=self.directory,
                )
            step = steps[-1]
        elif step not in steps:
            raise CheckpointNotFoundError(
                f"Step {step} is not in {self.directory}; the steps there are {steps}.",
                file=self.step_path(step),
            )
        return restore(self.step_path(step), target, **options)

    def close(self) -> None:
        """Waits for the save in flight (raising its error, if any); later saves are refused.

        Example:
            >>> import tempfile, jax.numpy as jnp, jaxweights as jw
            >>> manager = jw.CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> manager.close()
            >>> manager.save(0, {"w": jnp.ones(2)})
            Traceback (most recent call last):
            jaxweights.errors.ArgumentError: ...
        """
        if self._closed:
            return
        self._closed = True
        self.wait_until_finished()

    def _check_open(self) -> None:
        if self._closed:
            raise ArgumentError(f"The CheckpointManager of {self.directory} is closed; create a new one.")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
