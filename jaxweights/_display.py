"""Text and HTML views of a checkpoint's tree: names, dtypes, shapes, sizes.

Display reads only the catalogue, never tensor bytes, so it is instant on any checkpoint size, and never
recurses, so a name thousands of segments deep displays like any other.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ._names import is_under, segment_key
from .formats import Checkpoint, TensorInfo

__all__ = ["Summary", "Totals", "format_bytes", "summarize", "tree_html", "tree_treescope"]


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
    params: int = 0  # their elements
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
        node.params = (tensor.size if tensor is not None else 0) + sum(
            child.params for child in node.children.values()
        )
        node.nbytes = (tensor.nbytes if tensor is not None else 0) + sum(
            child.nbytes for child in node.children.values()
        )
        shape = (own, *((label, child.layout) for label, child in node.children.items()))
        node.layout = layouts.setdefault(shape, len(layouts))
    return root


def _kind(info: TensorInfo) -> str:
    """What a tensor is stored as: its quantization encoding, else its dtype."""
    return info.encoding.name if info.encoding else info.dtype.name


def _leaf_text(info: TensorInfo) -> str:
    return f"{_kind(info)}{list(info.shape)}  {format_bytes(info.nbytes)}"


def _is_number(label: str) -> bool:
    return label.isascii() and label.isdigit()


@dataclass(frozen=True)
class _Row:
    """One line of a displayed tree: a tensor, or a group whose rows follow until its `None`."""

    label: str  # dotted when a chain of single children merged
    name: str  # full name under the view's prefix (of the first of a run)
    node: _Node
    depth: int
    last: bool  # the last row among its siblings
    run: tuple[int, str, str] | None  # (count, first label, final label) of folded repeated layers

    @property
    def leaf(self) -> bool:
        return self.node.tensor is not None and not self.node.children


def _walk(root: _Node, collapse: bool) -> Iterator[_Row | None]:
    """The rows of the tree depth first; `None` closes the latest group. Every view's one walk.

    With ``collapse``, numbered siblings of equal layout fold into the first (its ``run``), and chains
    of single children merge into one dotted label. An explicit stack, never recursion."""
    stack: list[tuple[list[tuple[str, _Node]], int, int, str]] = [(list(root.children.items()), 0, 0, "")]
    while stack:
        items, index, depth, parent = stack.pop()
        if index >= len(items):
            if depth:
                yield None
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
        while child.tensor is None and len(child.children) == 1:
            ((segment, grandchild),) = child.children.items()
            if collapse and _is_number(segment):
                break
            label, child = f"{label}.{segment}", grandchild
        name = f"{parent}.{label}" if parent else label
        folded = (run, items[index][0], items[index + run - 1][0]) if run > 1 else None
        row = _Row(label, name, child, depth, index + run >= len(items), folded)
        stack.append((items, index + run, depth, parent))  # this level goes on after the child's rows
        yield row
        if not row.leaf:
            stack.append((list(child.children.items()), 0, depth + 1, name))


def _lines(root: _Node, collapse: bool, out: list[str]) -> None:
    """Appends the tree's text lines: ``├──`` branches, names padded to align dtypes."""
    pads: list[str] = []
    for row in _walk(root, collapse):
        if row is None:
            pads.pop()
            continue
        indent = "".join(pads)
        branch, pad = ("└── ", "    ") if row.last else ("├── ", "│   ")
        note = f"  (x{row.run[0]}: {row.run[1]}..{row.run[2]} share this layout)" if row.run else ""
        node = row.node
        if row.leaf:
            assert node.tensor is not None
            out.append(f"{indent + branch + row.label:<56} {_leaf_text(node.tensor)}{note}")
            continue
        out.append(f"{indent}{branch}{row.label}  [{node.count} tensors, {format_bytes(node.nbytes)}]{note}")
        if node.tensor is not None:
            out.append(f"{indent}{pad}(itself) {_leaf_text(node.tensor)}")
        pads.append(pad)


class Totals(NamedTuple):
    """How many tensors, parameters (elements) and stored bytes a part of a checkpoint holds.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"a.w": np.ones((2, 3), np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> totals = jw.load_weights(path).summary().by_prefix["a"]
        >>> totals, totals.nbytes
        (Totals(tensors=1, parameters=6, nbytes=24), 24)
    """

    if not TYPE_CHECKING:  # type: ignore[misc]  # mypy reads every NamedTuple statement as a field
        __module__ = "jaxweights"

    tensors: int
    parameters: int
    nbytes: int


@dataclass(frozen=True, repr=False)
class Summary:
    """What `Weights.summary` returns: counts and sizes to read, the text tree to print, HTML to show.

    ``str(summary)`` is the text tree; notebooks render it as a foldable HTML tree. Built from the
    catalogue alone: no tensor byte is read.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file(
        ...     {"layers.0.w": np.ones((2, 3), np.float32), "layers.1.w": np.ones((2, 3), np.float32),
        ...      "head": np.zeros(4, np.float16)},
        ...     f"{tempfile.mkdtemp()}/model.safetensors",
        ... )
        >>> summary = jw.load_weights(path).summary()
        >>> summary.tensors, summary.parameters, summary.nbytes
        (3, 16, 56)
        >>> summary.by_dtype
        {'float32': Totals(tensors=2, parameters=12, nbytes=48), 'float16': Totals(tensors=1, parameters=4, nbytes=8)}
        >>> summary.by_prefix["layers"]
        Totals(tensors=2, parameters=12, nbytes=48)
        >>> print(summary)
        model.safetensors: 3 tensors, 16 parameters, 56 B (float32 x2, float16 x1)
        ├── head                                                 float16[4]  8 B
        └── layers  [2 tensors, 48 B]
            └── 0.w                                              float32[2, 3]  24 B  (x2: 0..1 share this layout)
    """

    __module__ = "jaxweights"

    text: str
    """The text tree, as printed."""
    tensors: int
    parameters: int
    nbytes: int
    by_dtype: Mapping[str, Totals]
    """Per dtype (or quantization encoding) name, most tensors first."""
    by_prefix: Mapping[str, Totals]
    """Per first name segment under the viewed prefix, in natural order (``""``: the prefix itself)."""
    _root: _Node = field(compare=False)
    _collapse: bool = field(compare=False)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text)

    def _repr_html_(self) -> str:
        return _html(self._root, self.text.partition("\n")[0], self._collapse)


def summarize(
    checkpoint: Checkpoint, prefix: str = "", *, collapse: bool = True, max_lines: int | None = None
) -> Summary:
    """The `Summary` of the tensors at and under ``prefix`` (see `Weights.summary`)."""
    root = _build(checkpoint, prefix)
    shown = [info for name, info in checkpoint.items() if _in_view(name, prefix)]
    dtypes = Counter(_kind(info) for info in shown)
    by_dtype: dict[str, Totals] = {}
    for kind, count in dtypes.most_common():
        of_kind = [info for info in shown if _kind(info) == kind]
        by_dtype[kind] = Totals(count, sum(i.size for i in of_kind), sum(i.nbytes for i in of_kind))
    by_prefix = {"": Totals(1, root.tensor.size, root.tensor.nbytes)} if root.tensor is not None else {}
    by_prefix.update({k: Totals(c.count, c.params, c.nbytes) for k, c in root.children.items()})
    files = ", ".join(p.name for p in checkpoint.files[:3]) + (" ..." if len(checkpoint.files) > 3 else "")
    kinds = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    title = prefix or files
    lines = [
        f"{title}: {root.count} tensors, {root.params:,} parameters, {format_bytes(root.nbytes)} ({kinds})"
    ]
    if root.tensor is not None:
        lines.append(f"(itself) {_leaf_text(root.tensor)}")
    _lines(root, collapse, lines)
    if max_lines is not None and len(lines) > max_lines:
        hidden = len(lines) - max_lines
        lines = [*lines[:max_lines], f"... {hidden} more lines (summary(max_lines=None) shows all)"]
    return Summary(
        "\n".join(lines), root.count, root.params, root.nbytes, by_dtype, by_prefix, root, collapse
    )


# Scoped by the jw- prefix; no script, no external asset. Columns align because every row spans
# from its indent to the same right edge and the dtype, shape and size columns have fixed widths.
_STYLE = """<style>
.jw-tree{font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;max-width:72em}
.jw-tree .jw-head{font-weight:bold;margin-bottom:.3em;overflow-wrap:anywhere}
.jw-tree .jw-row{display:flex;gap:1em;padding:0 .3em;white-space:nowrap}
.jw-tree .jw-row:hover{background:rgba(127,127,127,.14)}
.jw-tree .jw-name{flex:1 1 auto;min-width:0;overflow:hidden;text-overflow:ellipsis}
.jw-tree .jw-dtype{flex:0 0 8em}
.jw-tree .jw-shape{flex:0 0 14em;overflow:hidden;text-overflow:ellipsis}
.jw-tree .jw-size{flex:0 0 6.5em;text-align:right}
.jw-tree .jw-dim{opacity:.6}
.jw-tree .jw-note{opacity:.6;margin-left:1em}
.jw-tree .jw-leaf .jw-name{padding-left:1.4em}
.jw-tree summary{display:flex;list-style:none;cursor:pointer}
.jw-tree summary::-webkit-details-marker{display:none}
.jw-tree summary .jw-name::before{content:"\\25B8";display:inline-block;width:1.4em}
.jw-tree details[open]>summary .jw-name::before{content:"\\25BE"}
.jw-tree .jw-kids{margin-left:.7em;padding-left:.5em;border-left:1px solid rgba(127,127,127,.35)}
</style>"""

_OPEN_DEPTH = 2  # groups this shallow start open; deeper ones (a layer's insides) start closed
_MAX_ROWS = 2000  # a model whose tree does not fold stops here, with a count of the rest


def _cells(name: str, dtype: str, shape: str, size: str, *, dim: bool = False) -> str:
    shape_class = "jw-shape jw-dim" if dim else "jw-shape"
    return (
        f"<span class='jw-name'>{name}</span><span class='jw-dtype'>{html.escape(dtype)}</span>"
        f"<span class='{shape_class}'>{html.escape(shape)}</span>"
        f"<span class='jw-size'>{html.escape(size)}</span>"
    )


def _tensor_cells(name: str, info: TensorInfo) -> str:
    shape = "[" + ", ".join(str(d) for d in info.shape) + "]"
    return _cells(name, _kind(info), shape, format_bytes(info.nbytes))


def _html(root: _Node, head: str, collapse: bool) -> str:
    """The tree as nested ``<details>``: groups show their tensor count and bytes, runs of repeated
    layers fold into their first, names (untrusted) are escaped."""
    out = [_STYLE, "<div class='jw-tree'>", f"<div class='jw-head'>{html.escape(head)}</div>"]
    if root.tensor is not None:
        out.append(f"<div class='jw-row jw-leaf'>{_tensor_cells('(itself)', root.tensor)}</div>")
    rows = hidden = opened = 0
    for row in _walk(root, collapse):
        if row is None:
            if opened:
                out.append("</div></details>")
                opened -= 1
            continue
        rows += 1
        if rows > _MAX_ROWS:
            hidden += 1
            continue
        node = row.node
        label = html.escape(row.label)
        if row.run:
            count, first, final = row.run
            rest = row.label[len(first) :]  # a merged chain: "0.w" of a run 0..11 shows as "0..11.w"
            label = f"{html.escape(first)}..{html.escape(final + rest)}"
            label += f"<span class='jw-note'>x{count}, same layout</span>"
        if row.leaf:
            assert node.tensor is not None
            out.append(f"<div class='jw-row jw-leaf'>{_tensor_cells(label, node.tensor)}</div>")
            continue
        each = " each" if row.run else ""
        plural = "s" if node.count != 1 else ""
        is_open = " open" if row.depth < _OPEN_DEPTH else ""
        out.append(
            f"<details{is_open}><summary class='jw-row'>"
            f"{_cells(label, '', f'{node.count} tensor{plural}{each}', format_bytes(node.nbytes), dim=True)}"
            "</summary><div class='jw-kids'>"
        )
        opened += 1
        if node.tensor is not None:
            out.append(f"<div class='jw-row jw-leaf'>{_tensor_cells('(itself)', node.tensor)}</div>")
    if hidden:
        out.append("</div></details>" * opened)
        out.append(f"<div class='jw-dim'>... {hidden} more rows (summary(max_lines=None) lists all)</div>")
    out.append("</div>")
    return "".join(out)


def tree_html(checkpoint: Checkpoint, prefix: str = "") -> str:
    """The foldable HTML tree of the tensors under ``prefix``, repeated layers folded."""
    return summarize(checkpoint, prefix, collapse=True)._repr_html_()


def tree_treescope(checkpoint: Checkpoint, prefix: str, title: str, path: str | None) -> Any:
    """The tree as a treescope rendering (``__treescope_repr__``), or `NotImplemented` without treescope.

    Group nodes fold like treescope's own, with the same open levels as the HTML view; each row's path
    is ``weights['a.b']`` under the displayed accessor's ``path``."""
    try:
        from treescope import rendering_parts as parts  # type: ignore[import-untyped, import-not-found]
    except ImportError:
        return NotImplemented
    root = _build(checkpoint, prefix)

    def comment(text: str) -> Any:
        return parts.comment_color(parts.text(text))

    def note(row: _Row) -> str:
        return f"  (x{row.run[0]}: {row.run[1]}..{row.run[2]} share this layout)" if row.run else ""

    def leaf(label: str, info: TensorInfo, extra: str = "") -> Any:
        shown = f"{_kind(info)}{list(info.shape)}"
        return parts.siblings(f"{label}: {shown}", comment(f"  {format_bytes(info.nbytes)}{extra}"))

    def group(
        label: str, node: _Node, children: list[Any], where: str | None, extra: str, open_: bool
    ) -> Any:
        return parts.build_foldable_tree_node_from_children(
            prefix=parts.siblings(
                label, comment(f"  # {node.count} tensors, {format_bytes(node.nbytes)}{extra}")
            ),
            children=children,
            suffix="",
            path=where,
            expand_state=parts.ExpandState.EXPANDED if open_ else parts.ExpandState.COLLAPSED,
        )

    stack: list[tuple[_Row | None, list[Any]]] = [(None, [])]
    if root.tensor is not None:
        stack[0][1].append(leaf("(itself)", root.tensor))
    for row in _walk(root, True):
        if row is None:
            done, children = stack.pop()
            assert done is not None
            where = None if path is None else f"{path}[{done.name!r}]"
            is_open = done.depth < _OPEN_DEPTH
            stack[-1][1].append(group(done.label, done.node, children, where, note(done), is_open))
        elif row.leaf:
            assert row.node.tensor is not None
            stack[-1][1].append(leaf(row.label, row.node.tensor, note(row)))
        else:
            itself = row.node.tensor
            stack.append((row, [] if itself is None else [leaf("(itself)", itself)]))
    return group(title, root, stack[0][1], path, "", True)
