"""Opening checkpoint files safely: regular files only, never blocking, every OS error ours.

A folder, a FIFO, a socket or a device named like a checkpoint (``model.safetensors``) must not hang
the process (opening a FIFO for reading blocks until a writer appears) or leak a raw `OSError`. Every
format opens its files through `open_regular`, which opens without blocking, checks with `fstat` that
the descriptor is a regular file, and turns each `OSError` into a `jaxweights` error naming the path.
`FileIdentity` is what a file was when it was validated, so that later reads can tell it changed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from ..errors import CheckpointChangedError, CheckpointNotFoundError, CheckpointReadError

__all__ = ["FileIdentity", "open_regular", "read_prefix"]


class FileIdentity(NamedTuple):
    """A file as it was validated: the inode (device and number), the size and the modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def check(self, status: os.stat_result, path: Path) -> None:
        """Raises `CheckpointChangedError` unless ``status`` describes the same, unchanged file."""
        now = FileIdentity.of(status)
        if now == self:
            return
        if (now.device, now.inode) != (self.device, self.inode):
            what = "was replaced by another file"
        elif now.size != self.size:
            what = f"changed size ({self.size} -> {now.size} bytes): it was truncated or rewritten"
        else:
            what = "was modified (its modification time changed)"
        raise CheckpointChangedError(
            f"{path} {what} since the checkpoint was opened. Arrays already placed are unaffected; re-open "
            f"the checkpoint (jw.load_weights) to read the new file.",
            file=path,
        )


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (after following symlinks).

    Opens with ``O_NONBLOCK`` so that a FIFO cannot block, then checks the descriptor's type.

    Raises:
        CheckpointNotFoundError: the path (or a symlink's target) does not exist.
        CheckpointReadError: a folder, a FIFO, a socket or a device; a symlink loop; permission denied;
            any other refusal by the operating system.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> os.mkfifo(folder / "model.safetensors")
        >>> open_regular(folder / "model.safetensors")
        Traceback (most recent call last):
        jaxweights.errors.CheckpointReadError: ... is a FIFO (named pipe), not a regular file...
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise _read_error(path, error) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        os.close(fd)
        raise _read_error(path, error) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointReadError(
            f"{path} is {_kind(mode)}, not a regular file; jaxweights reads checkpoint files only. Remove "
            f"it or pass the weight files themselves.",
            file=path,
        )
    return fd


def read_prefix(path: Path, count: int) -> bytes:
    """Up to ``count`` bytes from the start of a regular file (see `open_regular`)."""
    fd = open_regular(path)
    try:
        return os.pread(fd, count, 0)
    except OSError as error:
        raise _read_error(path, error) from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def _read_error(path: Path, error: OSError) -> CheckpointReadError | CheckpointNotFoundError:
    code = error.errno
    if code == errno.ENOENT:
        broken = os.path.islink(path)
        what = "is a symlink to a file that does not exist" if broken else "does not exist"
        return CheckpointNotFoundError(f"{path} {what}. Check the path.", file=path)
    if code == errno.ELOOP:
        return CheckpointReadError(f"{path} is a symlink loop; point it at a checkpoint file.", file=path)
    if code == errno.EISDIR:
        return CheckpointReadError(f"{path} is a folder, not a checkpoint file.", file=path)
    if code in (errno.EACCES, errno.EPERM):
        return CheckpointReadError(
            f"{path} cannot be read: permission denied. Fix its permissions (chmod a+r) or run as its owner.",
            file=path,
        )
    return CheckpointReadError(
        f"{path} cannot be read ({error.strerror or error}); check the disk or the network filesystem.",
        file=path,
    )
