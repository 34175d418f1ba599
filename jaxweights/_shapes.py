"""Shape arithmetic shared by the catalogue, the header parser, the writer and the read planner.

The one home for element counts and C-order strides. Pure Python: it must never import numpy or jax
(the format parsers and the planner rely on it staying a leaf) and never validates: callers check their
shapes before counting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from importlib import metadata

__all__ = ["MAX_DIMS", "MAX_ELEMENTS", "c_strides", "element_count", "shape_problem"]


def _numpy_major() -> int:
    try:
        return int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):  # pragma: no cover - numpy is a dependency
        return 2


MAX_DIMS = 64 if _numpy_major() >= 2 else 32
"""The most dimensions a stored tensor may have: numpy's limit (64; 32 before numpy 2), read from its
version without importing it."""

MAX_ELEMENTS = 2**60 - 1
"""The largest product of a shape's non-zero dimensions: numpy checks it even for an empty array, and
with it elements of up to 8 bytes (any dtype a load may convert to) still have a byte count that fits in
a signed 64-bit integer."""


def element_count(shape: Iterable[int]) -> int:
    """The number of elements of an array of ``shape`` (1 for a scalar's empty shape).

    Example:
        >>> element_count((2, 3, 4)), element_count(()), element_count([5, 0])
        (24, 1, 0)
    """
    return math.prod(shape)


def c_strides(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-ordered (row-major, contiguous) array: the last axis moves by ``itemsize``.

    Example:
        >>> c_strides((4, 6), 4)
        (24, 4)
        >>> c_strides((2, 3, 5), 2), c_strides((), 8)
        ((30, 10, 2), ())
    """
    strides = [itemsize] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    return tuple(strides)


def shape_problem(shape: Sequence[int], max_dims: int = MAX_DIMS) -> str | None:
    """Why no array can have ``shape`` (non-negative integers), or None when one can.

    A tensor with elements is already bounded by its bytes in the file; these limits matter for an empty
    one (``[0, 2**63]``), which numpy and XLA refuse all the same.

    Example:
        >>> shape_problem([0, 2**40, 2**40]), shape_problem([4, 2]), shape_problem([1] * 5, max_dims=4)
        ('the product of its non-zero dimensions exceeds 2**60', None, '5 dimensions, more than 4')
    """
    if len(shape) > max_dims:
        return f"{len(shape)} dimensions, more than {max_dims}"
    product = 1
    for dim in shape:
        if dim > MAX_ELEMENTS:
            return f"dimension {dim} exceeds 2**60"
        if dim:
            product *= dim
            if product > MAX_ELEMENTS:
                return "the product of its non-zero dimensions exceeds 2**60"
    return None
