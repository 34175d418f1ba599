"""Text and HTML views of a checkpoint's tree: names, dtypes, shapes, sizes.

Display reads only the catalogue, never tensor bytes, so it is instant on any checkpoint size, and never
recurses, so a name thousands of segments deep displays like any other.
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
    count: int = 0  # tensors at or under this node
    nbytes: int = 0
    layout: int = 0  # equal numbers: equal trees of names, dtypes and shapes (what a run collapses)


def _in_view(name: str, prefix: str) -> bool:
    """The tensors a view of ``prefix`` shows: the one named ``prefix`` and every one under it."""
    return name == prefix or is_under(name, prefix)


def _build(checkpoint: Checkpoint, prefix: str) -> _Node:
    """The tree under ``prefix``, children in natural order, with counts, sizes and layouts filled in.

    Built and summarised without recursion (a name of 1,000 dots is 1,000 levels deep)."""
    root = _Node()
    nodes = [root]  # parents before their children
    skip = len(prefix) + 1 if prefix else 0
    for name, info in checkpoint.items():
        if not _in_view(name, prefix):
            continue
        node = root
        relative = name[skip:] if name != prefix else ""
        for part in relative.split(".") if relative else []:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
                nodes.append(child)
            node = child
        node.tensor = info
    layouts: dict[tuple[object, ...], int] = {}
    for node in reversed(nodes):  # children first
        node.children = dict(sorted(node.children.items(), key=lambda kv: segment_key(kv[0])))
        tensor = node.tensor
        own = (tensor.dtype, tensor.shape, tensor.encoding) if tensor is not None else None
        node.count = (tensor is not None) + sum(child.count for child in node.children.values())
        node.nbytes = (tensor.nbytes if tensor is not None else 0) + sum(
            child.nbytes for child in node.children.values()
        )
        shape = (own, *((label, child.layout) for label, child in node.children.items()))
        node.layout = layouts.setdefault(shape, len(layouts))
    return root


def _leaf_text(info: TensorInfo) -> str:
    kind = info.encoding.name if info.encoding else info.dtype.name
    return f"{kind}{list(info.shape)}  {format_bytes(info.nbytes)}"


def _is_number(label: str) -> bool:
    return label.isascii() and label.isdigit()


def _lines(root: _Node, collapse: bool, out: list[str]) -> None:
    """Appends the tree's lines depth first, with an explicit stack instead of recursion."""
    stack: list[tuple[list[tuple[str, _Node]], int, str]] = [(list(root.children.items()), 0, "")]
    while stack:
        items, index, indent = stack.pop()
        if index >= len(items):
            continue
        label, child = items[index]
        run = 1
        if collapse and _is_number(label):
            while (
                index + run < len(items)
                and _is_number(items[index + run][0])
                and items[index + run][1].layout == child.layout
            ):
                run += 1
        last = index + run >= len(items)
        # merge chains of single-child prefixes into one dotted label
        while child.tensor is None and len(child.children) == 1:
            ((segment, grandchild),) = child.children.items()
            if collapse and _is_number(segment):
                break
            label, child = f"{label}.{segment}", grandchild
        branch, pad = ("└── ", "    ") if last else ("├── ", "│   ")
        note = ""
        if run > 1:
            first, final = items[index][0], items[index + run - 1][0]
            note = f"  (x{run}: {first}..{final} share this layout)"
        stack.append((items, index + run, indent))  # this level goes on after the child's lines
        if child.tensor is not None and not child.children:
            out.append(f"{indent + branch + label:<56} {_leaf_text(child.tensor)}{note}")
        else:
            out.append(
                f"{indent}{branch}{label}  [{child.count} tensors, {format_bytes(child.nbytes)}]{note}"
            )
            if child.tensor is not None:
                out.append(f"{indent}{pad}(itself) {_leaf_text(child.tensor)}")
            stack.append((list(child.children.items()), 0, indent + pad))


def tree_text(
    checkpoint: Checkpoint, prefix: str = "", *, collapse: bool = True, max_lines: int | None = None
) -> str:
    """The tree under ``prefix`` as text, with a one-line header of counts, sizes and dtypes."""
    root = _build(checkpoint, prefix)
    count, nbytes = root.count, root.nbytes
    shown = [info for name, info in checkpoint.items() if _in_view(name, prefix)]
    params = sum(info.size for info in shown)
    dtypes = Counter((info.encoding.name if info.encoding else info.dtype.name) for info in shown)
    files = ", ".join(p.name for p in checkpoint.files[:3]) + (" ..." if len(checkpoint.files) > 3 else "")
    kinds = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    title = prefix or files
    lines = [f"{title}: {count} tensors, {params:,} parameters, {format_bytes(nbytes)} ({kinds})"]
    if root.tensor is not None:
        lines.append(f"(itself) {_leaf_text(root.tensor)}")
    _lines(root, collapse, lines)
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
