"""Text and HTML views of a checkpoint's tree: names, dtypes, shapes, sizes.

Display reads only the catalogue, never tensor bytes, so it is instant on any checkpoint size.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

from ._names import is_under, segment_key
from .formats import Checkpoint, TensorInfo

__all__ = ["format_bytes", "tree_html", "tree_text"]


def format_bytes(count: int) -> str:
    """Human-readable decimal size: ``1.5 kB``, ``90.9 MB``.

    Example:
        >>> format_bytes(90_868_376)
        '90.9 MB'
    """
    if count < 1000:
        return f"{int(count)} B"
    size = float(count)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    tensor: TensorInfo | None = None

    def signature(self) -> tuple[object, ...]:
        own = (self.tensor.dtype, self.tensor.shape) if self.tensor else None
        return (own, tuple((k, v.signature()) for k, v in self.children.items()))

    def stats(self) -> tuple[int, int]:
        count, nbytes = (1, self.tensor.nbytes) if self.tensor else (0, 0)
        for child in self.children.values():
            c, b = child.stats()
            count, nbytes = count + c, nbytes + b
        return count, nbytes


def _in_view(name: str, prefix: str) -> bool:
    """The tensors a view of ``prefix`` shows: the one named ``prefix`` and every one under it."""
    return name == prefix or is_under(name, prefix)


def _build(checkpoint: Checkpoint, prefix: str) -> _Node:
    root = _Node()
    skip = len(prefix) + 1 if prefix else 0
    for name, info in checkpoint.items():
        if not _in_view(name, prefix):
            continue
        node = root
        relative = name[skip:] if name != prefix else ""
        for part in relative.split(".") if relative else []:
            node = node.children.setdefault(part, _Node())
        node.tensor = info
    _sort(root)
    return root


def _sort(node: _Node) -> None:
    node.children = dict(sorted(node.children.items(), key=lambda kv: segment_key(kv[0])))
    for child in node.children.values():
        _sort(child)


def _leaf_text(info: TensorInfo) -> str:
    kind = info.encoding.name if info.encoding else info.dtype.name
    return f"{kind}{list(info.shape)}  {format_bytes(info.nbytes)}"


def _lines(node: _Node, indent: str, collapse: bool, out: list[str]) -> None:
    items = list(node.children.items())
    index = 0
    while index < len(items):
        label, child = items[index]
        run = 1
        if collapse and label.isdigit():
            signature = child.signature()
            while (
                index + run < len(items)
                and items[index + run][0].isdigit()
                and items[index + run][1].signature() == signature
            ):
                run += 1
        last = index + run >= len(items)
        # merge chains of single-child prefixes into one dotted label
        while child.tensor is None and len(child.children) == 1:
            ((segment, grandchild),) = child.children.items()
            if collapse and segment.isdigit():
                break
            label, child = f"{label}.{segment}", grandchild
        branch, pad = ("└── ", "    ") if last else ("├── ", "│   ")
        note = ""
        if run > 1:
            first, final = items[index][0], items[index + run - 1][0]
            note = f"  (x{run}: {first}..{final} share this layout)"
        if child.tensor is not None and not child.children:
            out.append(f"{indent + branch + label:<56} {_leaf_text(child.tensor)}{note}")
        else:
            count, nbytes = child.stats()
            out.append(f"{indent}{branch}{label}  [{count} tensors, {format_bytes(nbytes)}]{note}")
            if child.tensor is not None:
                out.append(f"{indent}{pad}(itself) {_leaf_text(child.tensor)}")
            _lines(child, indent + pad, collapse, out)
        index += run


def tree_text(
    checkpoint: Checkpoint, prefix: str = "", *, collapse: bool = True, max_lines: int | None = None
) -> str:
    """The tree under ``prefix`` as text, with a one-line header of counts, sizes and dtypes."""
    root = _build(checkpoint, prefix)
    count, nbytes = root.stats()
    shown = [info for name, info in checkpoint.items() if _in_view(name, prefix)]
    params = sum(info.size for info in shown)
    dtypes = Counter((info.encoding.name if info.encoding else info.dtype.name) for info in shown)
    files = ", ".join(p.name for p in checkpoint.files[:3]) + (" ..." if len(checkpoint.files) > 3 else "")
    kinds = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    title = prefix or files
    lines = [f"{title}: {count} tensors, {params:,} parameters, {format_bytes(nbytes)} ({kinds})"]
    if root.tensor is not None:
        lines.append(f"(itself) {_leaf_text(root.tensor)}")
    _lines(root, "", collapse, lines)
    if max_lines is not None and len(lines) > max_lines:
        hidden = len(lines) - max_lines
        lines = [*lines[:max_lines], f"... {hidden} more lines (summary(max_lines=None) shows all)"]
    return "\n".join(lines)


def tree_html(checkpoint: Checkpoint, prefix: str = "") -> str:
    """The collapsed tree as HTML for notebooks (a header plus a preformatted tree)."""
    text = tree_text(checkpoint, prefix, collapse=True, max_lines=200)
    head, _, body = text.partition("\n")
    return (
        f"<div><b>{html.escape(head)}</b>"
        f"<pre style='line-height:1.25;margin-top:4px'>{html.escape(body)}</pre></div>"
    )
