"""Shape arithmetic shared by the catalogue, the header parser, the writer and the read planner.

The one home for element counts and C-order strides. Pure Python: it must never import numpy or jax
(the format parsers and the planner rely on it staying a leaf) and never validates: callers check their
shapes before counting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["c_strides", "element_count"]


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
