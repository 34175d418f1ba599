"""Host buffers that XLA's CPU client aliases instead of copying: C-contiguous and 64-byte aligned.

Large buffers live on their own anonymous maps, which `populate` faults in with one call per chunk
ahead of the copy that fills them. They are deliberately *not* advised for transparent huge pages: a
huge-page fault can stall in memory compaction (docs/performance.md has the measurements; numpy's own
allocator advises it for large arrays, hence own maps). Numpy only; no jax, no file I/O.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

import numpy as np

from ._libc import libc
from ._shapes import element_count

__all__ = ["ALIGNMENT", "HUGE_PAGE", "aligned_empty", "populate"]

ALIGNMENT = 64
"""Byte alignment at which XLA's CPU client aliases host memory instead of copying it."""

HUGE_PAGE = 2 << 20
"""Size from which a buffer gets its own map, and the granularity of parallel copies."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any], alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised, writeable, C-contiguous array whose data is ``alignment``-byte aligned.

    Example:
        >>> aligned_empty((3, 5), np.dtype(np.float32)).ctypes.data % 64
        0
        >>> aligned_empty((1024, 1024), np.dtype(np.float32)).ctypes.data % 4096
        0
    """
    nbytes = element_count(shape) * dtype.itemsize
    if nbytes >= HUGE_PAGE:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(region, dtype=np.uint8)
        skip = 0  # maps start on a page boundary
    else:
        raw = np.empty(nbytes + alignment, dtype=np.uint8)
        skip = -raw.ctypes.data % alignment
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in with one call


def _load_madvise() -> Any:
    """libc's ``madvise``, or None off Linux or where the C library lacks it."""
    lib = libc()
    if lib is None or not sys.platform.startswith("linux") or not hasattr(lib, "madvise"):
        return None
    function = lib.madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_madvise: Any = _load_madvise()


def populate(array: np.ndarray, begin: int, end: int) -> None:
    """Faults in bytes [begin, end) of a large `aligned_empty` buffer ahead of writing them.

    One call maps the whole range instead of one fault per page during the copy; several threads can
    populate disjoint ranges at once. A no-op where unsupported.
    """
    global _madvise
    if _madvise is None or array.nbytes < HUGE_PAGE:
        return
    page = mmap.PAGESIZE
    start = (array.ctypes.data + begin) // page * page
    stop = array.ctypes.data + end
    if stop > start and _madvise(start, stop - start, _MADV_POPULATE_WRITE) != 0:
        _madvise = None  # old kernel (EINVAL): stop asking
