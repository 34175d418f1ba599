"""Natural order and whole-segment prefixes: the one home of the name rules."""

from __future__ import annotations

import random

from jaxweights._names import NameIndex, is_under, join, natural_key, natural_sorted, segment_key


def test_numbers_sort_by_value_and_before_words() -> None:
    names = [f"layers.{i}.w" for i in (10, 2, 1, 11, 0)] + ["head", "layers.1x.w", "layers.b"]
    assert natural_sorted(names) == [
        "head",
        "layers.0.w",
        "layers.1.w",
        "layers.2.w",
        "layers.10.w",
        "layers.11.w",
        "layers.1x.w",
        "layers.b",
    ]


def test_huge_and_odd_numeric_segments_need_no_int_conversion() -> None:
    huge = "9" * 5000  # past Python's int-digit limit
    assert natural_sorted([f"a.{huge}", "a.10", "a.2"]) == ["a.2", "a.10", f"a.{huge}"]
    assert segment_key("01") != segment_key("1")  # distinct names keep distinct keys
    assert segment_key("²")[0] == 1  # a unicode digit is a word, not a number


def test_index_ranges_match_whole_segments() -> None:
    names = ["layers.1", "layers.1.b", "layers.10.w", "layers.1x.w", "layers.2.w", "layers.1.w", "x"]
    index = NameIndex(names)
    assert index.under("layers.1") == ["layers.1.b", "layers.1.w"]
    assert index.children("layers") == ["1", "2", "10", "1x"]
    assert index.count_under("layers") == 6 and index.count_under("nothing") == 0
    assert index.under("") == index.names and len(index) == len(names)
    assert "layers.1" in index and "layers" not in index and 3 not in index


def test_index_agrees_with_is_under_on_random_names() -> None:
    rng = random.Random(0)
    segments = ["0", "1", "2", "10", "a", "b", "1x", ""]
    names = {".".join(rng.choice(segments) for _ in range(rng.randint(1, 4))) for _ in range(400)}
    index = NameIndex(names)
    assert index.names == sorted(names, key=natural_key)
    for prefix in ["", "1", "10", "a.1", "a", "1x.0", "b.b"]:
        expected = [n for n in index.names if is_under(n, prefix)]
        assert index.under(prefix) == expected, prefix
        assert index.count_under(prefix) == len(expected)


def test_root_never_lists_the_empty_name_twice() -> None:
    index = NameIndex(["", "a", "b.c"])
    assert index.under("") == ["a", "b.c"] and index.count_under("") == 2
    assert join("", "a") == "a" and join("a", "0") == "a.0"


def test_numbers_longer_than_any_one_character_count_still_sort_by_value() -> None:
    """A segment of 1.2 million digits (a 100 MB header can hold one) once overflowed ``chr``."""
    lengths = [1, 55_263, 55_264, 55_265, 1_200_000]
    names = [f"a.{'1' * n}" for n in reversed(lengths)] + ["a.b", f"a.0{'1' * 55_264}", f"a.{'2' * 55_264}"]
    ordered = natural_sorted(names)
    assert [len(name) - 2 for name in ordered] == [1, 55_263, 55_264, 55_265, 55_264, 55_265, 1_200_000, 1]
    assert ordered[4] == f"a.{'2' * 55_264}" and ordered[-1] == "a.b"
    index = NameIndex(names)
    assert f"a.{'1' * 1_200_000}" in index and index.count_under("a") == len(names)
