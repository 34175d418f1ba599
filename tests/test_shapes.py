from __future__ import annotations

import numpy as np

from jaxweights._shapes import c_strides, element_count


def test_element_count_matches_numpy() -> None:
    for shape in [(), (0,), (3,), (2, 3), (4, 1, 5), (2, 0, 7)]:
        assert element_count(shape) == np.empty(shape, np.float16).size


def test_c_strides_match_numpy() -> None:
    for shape in [(), (3,), (2, 3), (4, 1, 5), (3, 2, 7, 2)]:  # numpy zeroes the strides of empty arrays
        for dtype in (np.int8, np.float16, np.float64):
            array = np.empty(shape, dtype)
            assert c_strides(shape, array.itemsize) == array.strides
