"""Pytrees <-> dotted names: key paths to checkpoint names, nested dicts/lists from names, and the
adapters that read and rebuild Flax NNX variables and modules without mutating them.

Optional libraries are never imported here: Flax NNX support switches on only when ``flax.nnx`` is
already loaded (a target built with it implies it is).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from .errors import StructureMismatchError

__all__ = [
    "LEAVES_KEY",
    "MAX_DEPTH",
    "SCALAR_TYPES",
    "Leaf",
    "flatten_target",
    "is_array_like",
    "nest",
    "path_name",
    "split_module",
]

LEAVES_KEY = "jaxweights.leaves"
"""Metadata key under which `jaxweights.save` stores non-array leaves (step counters, flags) as JSON."""

SCALAR_TYPES = (bool, int, float, str)
"""Leaf types stored as JSON under `LEAVES_KEY` instead of as tensors."""


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_name(path: Iterable[Any]) -> str:
    """The dotted name of a key path: dict keys, sequence indices and attribute names joined by dots.

    Example:
        >>> import jax
        >>> tree = {"layers": [{"w": 1}], "head": {"b": 2}}
        >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        ['head.b', 'layers.0.w']
    """
    return ".".join(_key_name(key) for key in path)


def is_array_like(value: Any) -> bool:
    """Arrays and their abstract stand-ins: what a checkpoint tensor can fill."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


class Leaf(NamedTuple):
    """One leaf of a target: its dotted name, its value (unwrapped from an NNX variable), and how to put
    a new value back in its place."""

    name: str
    value: Any
    rebuild: Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _replacer(variable: Any) -> Callable[[Any], Any]:
    def rebuild(value: Any) -> Any:
        return variable.replace(value=value)

    return rebuild


def flatten_target(tree: Any) -> tuple[list[Leaf], Any]:
    """The leaves of ``tree`` with their names, and its treedef; NNX variables count as one leaf."""
    nnx = _nnx()
    variable = getattr(nnx, "Variable", None) if nnx is not None else None

    def is_leaf(value: Any) -> bool:
        return variable is not None and isinstance(value, variable)

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    leaves = []
    for path, value in flat:
        if is_leaf(value):
            getter = getattr(value, "get_value", None)
            inner = getter() if getter is not None else value.value
            leaves.append(Leaf(path_name(path), inner, _replacer(value)))
        else:
            leaves.append(Leaf(path_name(path), value, _identity))
    names: dict[str, int] = {}
    for leaf in leaves:
        names[leaf.name] = names.get(leaf.name, 0) + 1
    clashes = sorted(name for name, count in names.items() if count > 1)
    if clashes:
        raise StructureMismatchError(
            f"Several leaves of the tree share a dotted name ({', '.join(repr(c) for c in clashes[:5])}): a "
            f"dict key containing '.' collides with a nested path. Rename the keys."
        )
    return leaves, treedef


def split_module(target: Any) -> tuple[Any, Callable[[Any], Any]] | None:
    """For a tree holding Flax NNX modules (at the top or anywhere inside): the tree with each module
    replaced by its state, and a function that merges new states back into new modules (the target is
    left as it was). None when there is no module.

    Only active when ``flax.nnx`` is already imported.
    """
    nnx = _nnx()
    if nnx is None:
        return None
    # Modules and optimizers are both graph objects (nnx.Pytree in Flax >= 0.11; nnx.Object before).
    module_type = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None) or nnx.Module
    variable = getattr(nnx, "Variable", ())

    def is_module(value: Any) -> bool:
        return isinstance(value, module_type) and not isinstance(value, (variable, nnx.State))

    parts, treedef = jax.tree_util.tree_flatten(target, is_leaf=is_module)
    if not any(is_module(part) for part in parts):
        return None
    graphdefs: list[Any] = []
    states: list[Any] = []
    for part in parts:
        if is_module(part):
            graphdef, state = nnx.split(part)
            graphdefs.append(graphdef)
            states.append(state)
        else:
            graphdefs.append(None)
            states.append(part)
    single = is_module(target)

    def merge(new_tree: Any) -> Any:
        new_parts = (
            [new_tree]
            if single
            else jax.tree_util.tree_leaves(new_tree, is_leaf=lambda v: isinstance(v, nnx.State) or v is None)
        )
        rebuilt = [
            nnx.merge(graphdef, state) if graphdef is not None else state
            for graphdef, state in zip(graphdefs, new_parts, strict=True)
        ]
        return rebuilt[0] if single else jax.tree_util.tree_unflatten(treedef, rebuilt)

    return (states[0] if single else jax.tree_util.tree_unflatten(treedef, states)), merge


MAX_DEPTH = 256
"""The deepest nesting `nest` builds: jax's pytree functions recurse once per level and fail near Python's
recursion limit (1000 levels by default); real checkpoints nest fewer than 20."""

_MISSING = object()


def nest(items: Iterable[tuple[str, Any]], *, lists: bool = True) -> Any:
    """Nested dicts from ``(dotted relative name, value)`` pairs; numbered children that run 0..n-1 become
    lists when ``lists`` is set. A lone ``("", value)`` is the value itself. Never recurses, so names
    with thousands of segments cost no more than their length.

    Raises:
        StructureMismatchError: a name is both a tensor and a prefix of others (``a`` and ``a.b``, or
            ``""`` and anything), or has more than `MAX_DEPTH` segments.

    Example:
        >>> nest([("layers.0.w", 1), ("layers.1.w", 2), ("head", 3)])
        {'layers': [{'w': 1}, {'w': 2}], 'head': 3}
    """
    root: dict[str, Any] = {}
    inner: list[tuple[dict[str, Any], str, dict[str, Any]]] = []  # (parent, key, node), parents first
    nodes = {id(root)}  # the dicts made here, not values that happen to be dicts
    whole: Any = _MISSING
    for name, value in items:
        if name == "" or whole is not _MISSING:
            if whole is not _MISSING or root:
                raise StructureMismatchError(
                    "The tensor named by the prefix itself is also a prefix of other tensors; a nested "
                    "pytree cannot hold both. Load them separately (or use items())."
                )
            whole = value
            continue
        parts = name.split(".")
        if len(parts) > MAX_DEPTH:
            raise StructureMismatchError(
                f"{name[:80]!r}{'...' if len(name) > 80 else ''} nests {len(parts)} levels deep; pytrees built here nest at most "
                f"{MAX_DEPTH} (jax's pytree functions recurse once per level and fail near Python's "
                f"recursion limit). Read such tensors with items()."
            )
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part, _MISSING)
            if child is _MISSING:
                child = node[part] = {}
                nodes.add(id(child))
                inner.append((node, part, child))
            elif id(child) not in nodes:
                raise StructureMismatchError(
                    f"{'.'.join(parts[: depth + 1])!r} is a tensor and also a prefix of {name!r}; a nested "
                    f"pytree cannot hold both. Load them separately (or use items())."
                )
            node = child
        if parts[-1] in node:
            raise StructureMismatchError(
                f"{name!r} is a tensor and also a prefix of other tensors; a nested pytree cannot hold both."
            )
        node[parts[-1]] = value
    if whole is not _MISSING:
        return whole
    if lists:
        for parent, key, node in reversed(inner):  # children before their parents
            parent[key] = _as_list(node)
        return _as_list(root)
    return root


def _as_list(node: dict[str, Any]) -> Any:
    """``node``'s values as a list when its keys are exactly ``"0"`` .. ``"n-1"`` (no int() of a key, so a
    5000-digit or non-ASCII digit segment stays a key); else ``node``."""
    if node and all(str(index) in node for index in range(len(node))):
        return [node[str(index)] for index in range(len(node))]
    return node
