"""Dotted tensor names: natural order, joining, and "the names under a prefix" (whole segments).

The one home of the name rules every layer shares: ``layers.2`` sorts before ``layers.10``, and the prefix
``layers.1`` holds ``layers.1.w`` but not ``layers.10.w``. Pure Python; no numpy, no jax, no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import TypeAlias

__all__ = ["NameIndex", "is_under", "join", "natural_key", "natural_sorted", "segment_key"]

SegmentKey: TypeAlias = tuple[int, int, str, str]

_SEPARATOR = "\x00"  # stands for "." in sort keys: sorts before any character a segment holds
_NUMBER = "\x01"  # leads a number's key: numbers sort before words


def segment_key(segment: str) -> SegmentKey:
    """Sort key of one segment: numbers (ASCII digits) by value, before words in code-point order.

    Numbers compare by length and digits, never through `int`, so a 5000-digit segment costs nothing;
    ``"01"`` and ``"1"`` stay distinct (the written form breaks the tie).

    Example:
        >>> sorted(["10", "b", "2", "a", "02"], key=segment_key)
        ['2', '02', '10', 'a', 'b']
    """
    if segment.isascii() and segment.isdigit():
        digits = segment.lstrip("0") or "0"
        return (0, len(digits), digits, "" if digits == segment else segment)
    return (1, 0, segment, "")


_SHORT = 0xD800 - 0x20  # digit counts written as one character, below the surrogates
_LONG = chr(0xE000)  # leads the count of a longer number, written in decimal after its own length


def _length_key(count: int) -> str:
    """A string that sorts as ``count`` does: one character for any real name, a decimal count (itself
    led by its length) past 55,264 digits, where one character would run out of code points."""
    if count < _SHORT:
        return chr(0x20 + count)
    written = str(count)
    return f"{_LONG}{chr(0x20 + len(written))}{written}"


def _number_key(segment: str) -> str:
    digits = segment.lstrip("0") or "0"
    key = f"{_NUMBER}{_length_key(len(digits))}{digits}"
    return key if digits == segment else f"{key}{_NUMBER}{segment}"


def natural_key(name: str, segments: dict[str, str] | None = None) -> str:
    """Sort key of a dotted name: comparing keys compares names segment by segment, numbers by value
    (``layers.2.w`` before ``layers.10.w``). A string, so that sorting 100,000 names builds no tuples.
    ``segments`` caches segment keys across calls (checkpoints repeat the same few segments).

    Example:
        >>> sorted(["layers.10.w", "layers.2.w", "layers.1x"], key=natural_key)
        ['layers.2.w', 'layers.10.w', 'layers.1x']
    """
    cache = {} if segments is None else segments
    keys = []
    for segment in name.split("."):
        key = cache.get(segment)
        if key is None:
            key = cache[segment] = (
                _number_key(segment) if segment.isascii() and segment.isdigit() else segment
            )
        keys.append(key)
    return _SEPARATOR.join(keys)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order.

    Example:
        >>> natural_sorted(["layers.10.w", "layers.2.w", "layers.1.b", "embed"])
        ['embed', 'layers.1.b', 'layers.2.w', 'layers.10.w']
    """
    return sorted(names, key=natural_key)


def join(prefix: str, segment: str) -> str:
    """``prefix.segment``, or ``segment`` at the root (``prefix == ""``)."""
    return f"{prefix}.{segment}" if prefix else segment


def is_under(name: str, prefix: str) -> bool:
    """True when ``name`` lies strictly under ``prefix``, matching whole segments.

    Example:
        >>> is_under("layers.1.w", "layers.1"), is_under("layers.10.w", "layers.1"), is_under("a", "")
        (True, False, True)
    """
    if not prefix:
        return name != ""
    return name.startswith(prefix) and name[len(prefix) : len(prefix) + 1] == "."


class NameIndex:
    """Names in natural order, with the names under a prefix and the next segments found by bisection.

    Example:
        >>> index = NameIndex(["layers.10.w", "layers.2.w", "layers.1.w", "head"])
        >>> index.names
        ['head', 'layers.1.w', 'layers.2.w', 'layers.10.w']
        >>> index.under("layers"), index.children("layers")
        (['layers.1.w', 'layers.2.w', 'layers.10.w'], ['1', '2', '10'])
        >>> index.under("layers.1")
        ['layers.1.w']
    """

    __slots__ = ("_keys", "names")

    def __init__(self, names: Iterable[str]) -> None:
        unsorted = list(names)
        segments: dict[str, str] = {}
        keys = [natural_key(name, segments) for name in unsorted]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self._keys = [keys[i] for i in order]
        self.names = [unsorted[i] for i in order]

    def __len__(self) -> int:
        return len(self.names)

    def under(self, prefix: str) -> list[str]:
        """The names strictly under ``prefix`` (whole segments), in natural order."""
        if not prefix:
            return [name for name in self.names if name] if "" in self else list(self.names)
        key = natural_key(prefix)
        low = bisect.bisect_left(self._keys, key + _SEPARATOR)
        high = bisect.bisect_left(self._keys, key + chr(ord(_SEPARATOR) + 1), lo=low)
        # every name under prefix lies in [low, high); a name holding NUL characters may too
        return [name for name in self.names[low:high] if is_under(name, prefix)]

    def count_under(self, prefix: str) -> int:
        """How many names lie strictly under ``prefix``."""
        return len(self.under(prefix))

    def children(self, prefix: str) -> list[str]:
        """The distinct next segments under ``prefix``, in natural order (``2`` before ``10``)."""
        skip = len(prefix) + 1 if prefix else 0
        seen: dict[str, None] = {}
        for name in self.under(prefix):
            seen.setdefault(name[skip:].split(".", 1)[0], None)
        return list(seen)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = natural_key(name)
        at = bisect.bisect_left(self._keys, key)
        return at < len(self._keys) and self._keys[at] == key
