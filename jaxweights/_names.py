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
NameKey: TypeAlias = tuple[SegmentKey, ...]

_AFTER_ANY_SEGMENT = (2, 0, "", "")  # sorts after every segment key


def segment_key(segment: str) -> SegmentKey:
    """Sort key of one segment: numbers (ASCII digits) by value, before words in code-point order.

    Numbers compare by length and digits, never through `int`, so a 5000-digit segment costs nothing;
    ``"01"`` and ``"1"`` stay distinct (the written form breaks the tie).

    Example:
        >>> sorted(["10", "b", "2", "a", "02"], key=segment_key)
        ['02', '2', '10', 'a', 'b']
    """
    if segment.isascii() and segment.isdigit():
        digits = segment.lstrip("0") or "0"
        return (0, len(digits), digits, segment)
    return (1, 0, segment, "")


def natural_key(name: str) -> NameKey:
    """Sort key of a dotted name, segment by segment (``layers.2.w`` before ``layers.10.w``)."""
    return tuple(segment_key(segment) for segment in name.split("."))


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
        pairs = sorted((natural_key(name), name) for name in names)
        self._keys = [key for key, _ in pairs]
        self.names = [name for _, name in pairs]

    def __len__(self) -> int:
        return len(self.names)

    def _range(self, prefix: str) -> tuple[int, int]:
        if not prefix:
            return 0, len(self.names)
        key = natural_key(prefix)
        low = bisect.bisect_right(self._keys, key)
        high = bisect.bisect_left(self._keys, (*key, _AFTER_ANY_SEGMENT), lo=low)
        return low, high

    def under(self, prefix: str) -> list[str]:
        """The names strictly under ``prefix`` (whole segments), in natural order."""
        low, high = self._range(prefix)
        found = self.names[low:high]
        return [name for name in found if name] if not prefix else found

    def count_under(self, prefix: str) -> int:
        """How many names lie strictly under ``prefix``."""
        low, high = self._range(prefix)
        return high - low - (1 if not prefix and "" in self else 0)

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
