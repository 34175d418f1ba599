"""The staging protocol every save follows (`staging`, `write_atomically`, `publish_folder`,
`remove_stale`), on the system calls of `_libc`.

The protocol. A save writes into a private folder beside its target, ``.NAME.PID-RANDOM.saving``, created
with the umask's mode and ``flock``-ed for the save's whole life. A finished file is renamed over the
target; a finished folder, with the old folder's other files carried over, is swapped with the target in
one ``renameat2(RENAME_EXCHANGE)``. A symlinked target stays a symlink: what it points to is replaced.
Files get ``0666 & ~umask``, folders ``0777 & ~umask``; an existing folder keeps its mode. Every
`OSError` becomes a `CheckpointWriteError` that names the path, the step that failed and a fix, and the
staging folder is removed whether the save succeeds or fails.

Stale entries. Before writing, a save deletes its target's temporary entries that a killed save left:
only names of its own making (``.NAME.<8 chars or PID-8 hex>.saving``, ``.old``, ``.tmp``), and only those
no live save holds. Liveness is a ``flock``, not the PID in the name: the kernel drops a lock when its
holder dies, however it dies (SIGKILL, the OOM killer), while a PID is meaningless in another PID
namespace (two containers sharing a volume) or on another host (NFS), and is reused. The PID stays in
the name for people reading ``ls``. A ``.tmp`` file (``write_file`` writes one beside its target without a
lock) is deleted only when, in addition, a write lease proves that no process has it open (Linux); where
that cannot be proven it is kept.

Never imports numpy or jax. Raises `CheckpointWriteError` only, and never deletes a name it did not make.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from . import _libc
from ._libc import fsync_dir, open_elsewhere, try_lock
from .errors import CheckpointWriteError

__all__ = [
    "Staging",
    "publish_folder",
    "remove_stale",
    "staging",
    "write_atomically",
    "write_error",
]


# The staging protocol
# ---------------------------------------------------------------------------------------------

_FIXES = {
    errno.ENOSPC: "free space on that disk, or save elsewhere",
    errno.EDQUOT: "free space within your disk quota, or save elsewhere",
    errno.EACCES: "make the folder writable for this user, or save elsewhere",
    errno.EPERM: "make the folder writable for this user, or save elsewhere",
    errno.EROFS: "that file system is mounted read-only; save elsewhere",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EEXIST: "a file is in the way on that path; move it, or save elsewhere",
    errno.ENOTDIR: "a file is in the way on that path; move it, or save elsewhere",
}


def write_error(path: Path, doing: str, error: OSError) -> CheckpointWriteError:
    """The `CheckpointWriteError` for an `OSError` met while saving to ``path``: the step, the reason,
    and a fix chosen by its ``errno``.

    Example:
        >>> error = write_error(Path("ckpt"), "writing the weights", OSError(errno.ENOSPC, "No space left"))
        >>> error.file, str(error).split(". ")[0]
        ('ckpt', 'Saving to ckpt failed while writing the weights: No space left')
        >>> str(error).split("; ")[1]  # the fix, chosen by the errno
        'free space on that disk, or save elsewhere.'
    """
    reason = error.strerror or str(error) or type(error).__name__
    fix = _FIXES.get(error.errno or 0, "check the path and the disk, then save again")
    return CheckpointWriteError(
        f"Saving to {path} failed while {doing}: {reason}. Nothing was replaced and no temporary file was "
        f"left; {fix}.",
        file=path,
    )


class Staging:
    """One save's private, locked temporary folder beside its target.

    Attributes:
        shown: the path the caller named (in messages).
        target: what the save replaces: ``shown``, or where its symlinks lead.
        folder: the temporary folder, ``.NAME.PID-RANDOM.saving`` beside ``target``.
        folder_mode: the umask's mode for a new folder (``0o755`` under umask 022).
        file_mode: the umask's mode for a new file (``0o644`` under umask 022).
        doing: the step under way, named by a `CheckpointWriteError` if it fails; callers set it.
    """

    def __init__(self, shown: Path, target: Path, folder: Path, folder_mode: int) -> None:
        self.shown = shown
        self.target = target
        self.folder = folder
        self.folder_mode = folder_mode
        self.file_mode = folder_mode & 0o666
        self.doing = "writing"

    def expect_folder(self) -> None:
        """Raises `CheckpointWriteError` when the target exists and is not a folder."""
        if self.target.exists() and not self.target.is_dir():
            raise CheckpointWriteError(
                f"{self.shown} is a file, but a checkpoint folder was expected. Pass another path, or a "
                f"*.safetensors file name to write a single file.",
                file=self.shown,
            )

    def expect_file(self) -> None:
        """Raises `CheckpointWriteError` when the target is a folder."""
        if self.target.is_dir():
            raise CheckpointWriteError(
                f"Saving to {self.shown} failed: it is a folder. Pass a file name inside it (such as "
                f"{self.shown}/model.safetensors), or save a checkpoint into the folder itself with "
                f"jaxweights.save(tree, folder).",
                file=self.shown,
            )


def _resolve(path: Path) -> Path:
    """What a save replaces: ``path``, or the end of its chain of symlinks."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():
        raise CheckpointWriteError(
            f"Saving to {path} failed: it is a symlink that never reaches a file or folder (a loop). "
            f"Point it at a checkpoint, or save to another path.",
            file=path,
        )
    return target


def _temporary_names(target: Path) -> re.Pattern[str]:
    """Names this protocol (and earlier jaxweights releases) give ``target``'s temporary entries: a random
    part of eight ``tempfile`` characters or ``PID-8 hex``, never a dot, so ``a``'s pattern never matches
    ``a.b``'s entries."""
    return re.compile(re.escape(f".{target.name}.") + r"(?:\d+-[0-9a-f]{8}|[a-z0-9_]{8})\.(saving|old|tmp)")


def remove_stale(target: Path) -> list[Path]:
    """Deletes ``target``'s temporary entries that killed saves left, and returns them.

    Only names `staging`, ``write_file`` and earlier releases give ``target``'s entries, and only those no
    live save holds: a folder whose ``flock`` this process can take; a ``.tmp`` file, in addition, only
    when nothing has it open (`open_elsewhere`). A ``.old`` folder (the previous checkpoint, moved aside
    by a swap without ``renameat2``) is renamed back when ``target`` is missing, else deleted. Never raises.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in (".ckpt.abcd1234.saving", ".ckpt.x.abcd1234.saving", ".other.abcd1234.saving"):
        ...     (folder / name).mkdir()
        >>> [path.name for path in remove_stale(folder / "ckpt")]
        ['.ckpt.abcd1234.saving']
        >>> sorted(path.name for path in folder.iterdir())  # target "ckpt.x"'s, target "other"'s
        ['.ckpt.x.abcd1234.saving', '.other.abcd1234.saving']
    """
    pattern = _temporary_names(target)
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None and _remove_if_stale(target.parent / name, match.group(1), target):
            removed.append(target.parent / name)
    return removed


def _remove_if_stale(entry: Path, kind: str, target: Path) -> bool:
    folder = kind != "tmp"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if folder else 0)
    try:
        fd = os.open(entry, flags)
    except OSError:  # gone, a symlink, or not the kind its name says
        return False
    try:
        if try_lock(fd) is not True:
            return False
        if not folder:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or open_elsewhere(fd):
                return False
            os.unlink(entry)
        elif kind == "old" and not os.path.lexists(target):
            os.rename(entry, target)  # a swap without renameat2 was killed between its two renames
        else:
            shutil.rmtree(entry, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _fresh_name(target: Path, kind: str) -> Path:
    """``.NAME.PID-RANDOM.<kind>`` beside ``target``."""
    return target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _new_folder(target: Path) -> tuple[Path, int]:
    """Creates a ``.saving`` folder beside ``target`` with the umask's mode and locks it.

    A stale-entry sweep of another save can take a folder in the instant between its creation and its
    lock; then the lock fails or the folder is gone, and another name is tried."""
    for _ in range(100):
        folder = _fresh_name(target, "saving")
        try:
            os.mkdir(folder, 0o777)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (FileExistsError, FileNotFoundError):
            continue
        if try_lock(fd) is not False and os.fstat(fd).st_nlink > 0:
            return folder, fd
        os.close(fd)
    raise CheckpointWriteError(  # pragma: no cover - a hundred collisions in a row
        f"Saving to {target} failed: no temporary folder could be created beside it.", file=target
    )


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Staging]:
    """A locked temporary folder beside ``path``'s target, after its stale entries are removed.

    On exit the folder (and whatever is left in it) is deleted and the lock released, whether the body
    succeeded or not. An `OSError` in the body becomes a `CheckpointWriteError` naming ``path`` and the
    step the body set in `Staging.doing`.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "m.bin"
        >>> with staging(target) as stage:
        ...     _ = (stage.folder / "m.bin").write_bytes(b"new")
        ...     os.replace(stage.folder / "m.bin", stage.target)
        >>> sorted(path.name for path in target.parent.iterdir())
        ['m.bin']
    """
    doing = f"creating a temporary folder beside {path}"
    try:
        target = _resolve(path)
        remove_stale(target)
        if target != path:  # names an earlier release gave the symlink itself
            remove_stale(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder, lock = _new_folder(target)
        mode = stat.S_IMODE(os.fstat(lock).st_mode)
    except CheckpointWriteError:
        raise
    except OSError as error:
        raise write_error(path, doing, error) from error
    stage = Staging(path, target, folder, mode & 0o7777)
    try:
        if mode & 0o700 != 0o700:  # an umask such as 0o277 would lock this process out of its own folder
            os.chmod(folder, mode | 0o700)
        yield stage
    except CheckpointWriteError:
        raise
    except OSError as error:
        raise write_error(path, stage.doing, error) from error
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _set_mode(path: Path, mode: int) -> None:
    """Sets a written file's mode durably (``fchmod``, ``fsync``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Writes one file through `staging`: ``write(staged)`` writes the whole file at ``staged``, which
    then gets the umask's mode and replaces ``path``'s target in one rename.

    Returns:
        ``path``.

    Raises:
        CheckpointWriteError: ``path`` is a folder, or the system refused a step; ``path`` is untouched
            and no temporary entry remains.

    Example:
        >>> import tempfile
        >>> path = write_atomically(f"{tempfile.mkdtemp()}/m.bin", lambda staged: staged.write_bytes(b"x"))
        >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
        (b'x', ['m.bin'])
    """
    path = Path(path)
    with staging(path) as stage:
        stage.expect_file()
        staged = stage.folder / stage.target.name
        stage.doing = "writing the file"
        write(staged)
        stage.doing = "setting the file's mode"
        _set_mode(staged, stage.file_mode)
        stage.doing = "renaming the file into place"
        os.replace(staged, stage.target)
        fsync_dir(stage.target.parent)
    return path


def publish_folder(stage: Staging, replaced: Collection[str]) -> None:
    """Swaps a finished staging folder in for its target folder, atomically.

    Every file already in ``stage.folder`` gets the umask's mode. Everything else in the target folder
    (``config.json``, tokenizers, subfolders, unrelated files) is carried over: files as hard links (a
    copy across devices), symlinks as symlinks, folders entry by entry with their modes; only names in
    ``replaced`` (the previous checkpoint's own files) and names the staging folder already holds are not.
    The folder takes the target's mode (the umask's for a new target) and is swapped in with one
    `exchange`, or, where the system cannot swap, two renames (the previous folder kept as
    ``.NAME.PID-RANDOM.old`` in between, which `remove_stale` renames back if a kill lands there).
    Anything that appears in the previous folder meanwhile is moved over afterwards. The previous
    checkpoint ends up in ``stage.folder``, which `staging` deletes.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "ckpt"
        >>> target.mkdir(); _ = (target / "old.bin").write_text("1"); _ = (target / "notes").write_text("n")
        >>> with staging(target) as stage:
        ...     _ = (stage.folder / "new.bin").write_text("2")
        ...     publish_folder(stage, replaced={"old.bin"})
        >>> sorted(path.name for path in target.iterdir()), len(list(target.parent.iterdir()))
        (['new.bin', 'notes'], 1)
    """
    stage.doing = "setting the files' mode"
    for entry in sorted(stage.folder.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            _set_mode(entry, stage.file_mode)
    target = stage.target
    if not target.is_dir():
        os.chmod(stage.folder, stage.folder_mode)
        fsync_dir(stage.folder)
        stage.doing = "renaming the checkpoint into place"
        os.rename(stage.folder, target)
        fsync_dir(target.parent)
        return
    written = set(os.listdir(stage.folder))
    for name in sorted(os.listdir(target)):
        if name not in replaced and name not in written:
            stage.doing = f"copying {name} into the new checkpoint"
            _carry(target / name, stage.folder / name)
    stage.doing = "swapping in the new checkpoint"
    os.chmod(stage.folder, stat.S_IMODE(os.stat(target).st_mode))
    fsync_dir(stage.folder)
    previous = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try_lock(previous)  # the previous folder, about to sit at stage.folder: no sweep takes it early
        code = _libc.exchange(stage.folder, target)
        if code is None:
            _swap_by_renames(stage)
        elif code:
            raise write_error(stage.shown, stage.doing, OSError(code, os.strerror(code)))
        fsync_dir(target.parent)
        if _move_newcomers(stage, set(replaced)):
            fsync_dir(target)
    finally:
        os.close(previous)


def _carry(source: Path, target: Path) -> None:
    """Copies one entry of the previous folder into the new one (see `publish_folder`). Sockets, pipes
    and devices are not copied: `_move_newcomers` moves them after the swap."""
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(info.st_mode):
        os.mkdir(target, 0o700)
        for name in sorted(os.listdir(source)):
            _carry(source / name, target / name)
        shutil.copystat(source, target, follow_symlinks=False)
    elif stat.S_ISREG(info.st_mode):
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:  # another device, a file system without hard links, a link count at its limit
            shutil.copy2(source, target, follow_symlinks=False)


def _swap_by_renames(stage: Staging) -> None:
    """The swap where ``renameat2`` is missing: target -> ``.old``, staging -> target, ``.old`` ->
    staging. Not atomic: a kill between the first two renames leaves the target missing, and the next save
    renames ``.old`` back (`remove_stale`)."""
    old = _fresh_name(stage.target, "old")
    os.rename(stage.target, old)
    try:
        os.rename(stage.folder, stage.target)
    except BaseException:
        os.rename(old, stage.target)
        raise
    os.rename(old, stage.folder)


def _move_newcomers(stage: Staging, replaced: set[str]) -> bool:
    """Moves into the new folder what the previous one (now at ``stage.folder``) holds and the new one
    lacks: files created during the save, and entries `_carry` does not copy; True when it moved any.
    Whatever cannot be moved keeps the previous folder from deletion: it is renamed
    ``.NAME.PID-RANDOM.kept``, a name no sweep touches."""
    moved = False
    try:
        for name in sorted(os.listdir(stage.folder)):
            if name not in replaced and not os.path.lexists(stage.target / name):
                os.rename(stage.folder / name, stage.target / name)
                moved = True
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(stage.folder, _fresh_name(stage.target, "kept"))
    return moved
