"""Operating-system calls Python's `os` lacks: the C library loaded once (`libc`), and `fsync_dir`.

`_buffers` (``madvise`` ranges) and `_save` (``renameat2``) take the library from `libc`; nothing else
loads it. Where the library or a call is unavailable, callers get None and fall back: this module never
raises, and never imports numpy or jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

__all__ = ["fsync_dir", "libc"]


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library with ``errno`` capture, or None where it cannot be loaded.

    Example:
        >>> lib = libc()
        >>> lib is None or lib is libc()  # loaded once
        True
    """
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover - platforms without a loadable libc
        return None


def fsync_dir(folder: Path) -> None:
    """Makes a folder's entries (new or renamed files) durable; a no-op where folders cannot be opened.

    Example:
        >>> import tempfile
        >>> fsync_dir(Path(tempfile.mkdtemp()))
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
