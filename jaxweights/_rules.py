"""Sharding rules for whole subtrees: which `Sharding` each tensor gets, decided before any read.

Rules are a table of (regex on the full tensor name -> `PartitionSpec`) or a callable
``(name, TensorInfo) -> Sharding | PartitionSpec | None``. Every problem (conflicting patterns,
unmatched names under ``strict``, indivisible shapes, meshes without this process's devices) is
collected and reported in one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from ._placement import check_sharding
from .errors import ShardingError
from .formats import TensorInfo

__all__ = ["Rules", "resolve_shardings"]

RuleTable: TypeAlias = Sequence[tuple[str, PartitionSpec | None]] | Mapping[str, PartitionSpec | None]
RuleFunction: TypeAlias = Callable[[str, TensorInfo], Sharding | PartitionSpec | None]
Rules: TypeAlias = RuleTable | RuleFunction


def _table(rules: RuleTable) -> list[tuple[re.Pattern[str], PartitionSpec]]:
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for entry in pairs:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ShardingError(
                f"Each rule is (regex, PartitionSpec); found {entry!r}. Example: "
                f"rules=[(r'attn\\..*\\.weight$', P('model', None))]."
            )
        pattern, spec = entry
        try:
            compiled.append((re.compile(pattern), spec if spec is not None else PartitionSpec()))
        except re.error as error:
            raise ShardingError(f"Rule pattern {pattern!r} is not a valid regex: {error}.") from None
    return compiled


def check_mesh(mesh: Mesh) -> None:
    """Raises `ShardingError` when ``mesh`` holds none of this process's devices."""
    local = set(jax.local_devices())
    if not any(device in local for device in mesh.devices.flat):
        raise ShardingError(
            f"The mesh {dict(mesh.shape)} holds none of process {jax.process_index()}'s devices "
            f"({', '.join(str(d) for d in sorted(local, key=lambda d: d.id))}); this process could not "
            f"hold any part of the arrays. Build the mesh from jax.devices() on every process."
        )


def resolve_shardings(
    infos: Iterable[TensorInfo],
    *,
    mesh: Mesh | None,
    rules: Rules | None,
    default: Sharding,
    strict: bool = False,
    first_match: bool = False,
) -> dict[str, Sharding]:
    """The sharding of every tensor, or one `ShardingError` listing every problem.

    Table rules match with `re.search` on the full name (anchor with ``^``/``$``). When several patterns
    match one name with different specs it is an error, unless ``first_match`` is set: then the first
    matching rule in table order wins. Unmatched names get ``default`` (replication over ``mesh``), or
    are errors under ``strict``.
    """
    if mesh is not None:
        check_mesh(mesh)
    table = _table(rules) if rules is not None and not callable(rules) else None
    problems: list[str] = []
    result: dict[str, Sharding] = {}
    for info in infos:
        choice: Sharding | PartitionSpec | None
        if table is not None:
            matches = [(p.pattern, spec) for p, spec in table if p.search(info.name)]
            specs = {spec for _, spec in matches}
            if len(specs) > 1 and not first_match:
                listing = ", ".join(f"{pattern!r} -> {spec}" for pattern, spec in matches)
                problems.append(
                    f"{info.name}: several rules match with different specs ({listing}); make the "
                    f"patterns disjoint, or pass first_match=True to let the first one win"
                )
                continue
            choice = matches[0][1] if matches else None
        elif rules is not None:
            choice = rules(info.name, info)  # type: ignore[operator]
        else:
            choice = None
        if choice is None:
            if strict:
                problems.append(f"{info.name}: no rule matches (strict=True)")
                continue
            sharding = default
        elif isinstance(choice, PartitionSpec):
            if mesh is None:
                raise ShardingError(
                    f"Rule for {info.name!r} gave {choice} but no mesh was passed; pass mesh=..."
                )
            sharding = NamedSharding(mesh, choice)
        elif isinstance(choice, Sharding):
            sharding = choice
        else:
            problems.append(
                f"{info.name}: the rule returned {choice!r}, not a Sharding, PartitionSpec or None"
            )
            continue
        try:
            check_sharding(info, sharding)
        except ShardingError as error:
            problems.append(f"{info.name}: {error}")
            continue
        result[info.name] = sharding
    if problems:
        listing = "\n  ".join(sorted(problems))
        raise ShardingError(f"{len(problems)} tensor(s) cannot be sharded as asked:\n  {listing}")
    return result
