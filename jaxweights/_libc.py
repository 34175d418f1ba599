"""The operating system under every write: the C library loaded once (`libc`), and the calls Python's
`os` lacks (`fsync_dir`, `exchange`, `try_lock`, `open_elsewhere`).

Never imports numpy or jax. The calls never raise: callers get None or False and fall back. The staging
protocol every save follows is built on them in `_staging`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import glob
import os
from pathlib import Path
from typing import Any

__all__ = ["cudart", "exchange", "fsync_dir", "libc", "open_elsewhere", "try_lock"]


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


@functools.cache
def cudart() -> Any:
    """The CUDA runtime (``libcudart``) with ``cudaHostRegister`` / ``cudaHostUnregister`` typed, from the
    ``nvidia.cuda_runtime`` wheel that ``jax[cuda]`` installs or the system's library path; None where
    there is none (every CPU-only machine).

    Example:
        >>> lib = cudart()
        >>> lib is None or hasattr(lib, "cudaHostRegister")
        True
    """
    candidates: list[str] = []
    try:
        import nvidia.cuda_runtime as runtime  # type: ignore[import-not-found,unused-ignore]

        for folder in runtime.__path__:
            candidates += sorted(glob.glob(os.path.join(folder, "lib", "libcudart.so*")), reverse=True)
    except ImportError:
        pass
    found = ctypes.util.find_library("cudart")
    if found:
        candidates.append(found)
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            return lib
        except (OSError, AttributeError):
            continue
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


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, or None where the C library lacks it (not Linux, old glibc)."""
    lib = libc()
    if lib is None or not hasattr(lib, "renameat2"):
        return None
    function = lib.renameat2
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(first: Path, second: Path) -> int | None:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        0 once swapped; None where the system cannot swap (no ``renameat2``, a file system without
        support); else the ``errno`` of the refusal, and neither path changed.

    Example:
        >>> import tempfile
        >>> a, b = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = (a / "x").write_text("x")
        >>> code = exchange(a, b)
        >>> code is None or (code == 0 and (b / "x").exists() and not (a / "x").exists())
        True
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return None
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return 0
    code = ctypes.get_errno()
    return None if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP) else code


def try_lock(fd: int) -> bool | None:
    """Takes an exclusive ``flock`` on an open file or folder without waiting.

    Returns:
        True when taken (it lasts until the descriptor is closed, or its process dies); False when
        another open of it holds the lock; None where the system has no ``flock`` for it.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> first, second = os.open(folder, os.O_RDONLY), os.open(folder, os.O_RDONLY)
        >>> try_lock(first), try_lock(second)
        (True, False)
        >>> os.close(first); try_lock(second)
        True
        >>> os.close(second)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def open_elsewhere(fd: int) -> bool:
    """False only when a write lease proves that no other descriptor has the file open (Linux; the
    caller must own the file); True when another has it open, or when that cannot be proven.

    Example:
        >>> import tempfile
        >>> handle, name = tempfile.mkstemp()
        >>> fd = os.open(name, os.O_RDONLY)
        >>> open_elsewhere(fd)  # mkstemp's descriptor is still open
        True
        >>> os.close(handle); open_elsewhere(fd) in (False, True)  # False where leases work
        True
        >>> os.close(fd)
    """
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except (ImportError, AttributeError, OSError):
        return True
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


# ---------------------------------------------------------------------------------------------
