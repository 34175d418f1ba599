from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxweights as jw
from jaxweights._rules import resolve_shardings
from jaxweights.errors import ShardingError

P = PartitionSpec


@pytest.fixture
def infos(write_reference: Callable[..., Path]) -> list[jw.TensorInfo]:
    weights = jw.load_weights(
        write_reference(
            {
                "layers.0.attn.weight": np.ones((16, 8), np.float32),
                "layers.0.mlp.weight": np.ones((8, 32), np.float32),
                "layers.0.norm.bias": np.ones(8, np.float32),
                "embed.weight": np.ones((12, 8), np.float32),
            }
        )
    )
    return [acc.info for _, acc in weights.items()]


@pytest.fixture
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))


def test_table_rules_and_default_replication(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    result = resolve_shardings(
        infos,
        mesh=mesh,
        rules=[(r"attn\.weight$", P("x", "y")), (r"mlp\.weight$", P(None, ("x", "y")))],
        default=NamedSharding(mesh, P()),
    )
    specs = {name: s.spec for name, s in result.items()}  # type: ignore[attr-defined]
    assert specs == {
        "layers.0.attn.weight": P("x", "y"),
        "layers.0.mlp.weight": P(None, ("x", "y")),
        "layers.0.norm.bias": P(),
        "embed.weight": P(),
    }


def test_dict_rules_and_none_means_replicate(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    result = resolve_shardings(
        infos,
        mesh=mesh,
        rules={r"weight": P("x"), r"^embed": None},
        default=NamedSharding(mesh, P()),
        first_match=True,
    )
    assert result["embed.weight"].spec == P("x")  # type: ignore[attr-defined]  # first in table order wins
    result = resolve_shardings(infos, mesh=mesh, rules={r"^embed": None}, default=NamedSharding(mesh, P("x")))
    assert result["embed.weight"].spec == P()  # type: ignore[attr-defined]


def test_conflicting_patterns_are_an_error_unless_first_match(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    rules = [(r"weight$", P("x")), (r"attn", P("y"))]
    with pytest.raises(
        ShardingError,
        match=r"layers.0.attn.weight: several rules match with different specs \('weight\$' -> P\('x',\), 'attn' -> P\('y',\)\)",
    ):
        resolve_shardings(infos, mesh=mesh, rules=rules, default=NamedSharding(mesh, P()))
    result = resolve_shardings(
        infos, mesh=mesh, rules=rules, default=NamedSharding(mesh, P()), first_match=True
    )
    assert result["layers.0.attn.weight"].spec == P("x")  # type: ignore[attr-defined]
    same = [(r"weight$", P("x")), (r"attn", P("x"))]  # agreeing patterns are fine
    assert resolve_shardings(infos, mesh=mesh, rules=same, default=NamedSharding(mesh, P()))


def test_strict_lists_every_unmatched_name(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    with pytest.raises(
        ShardingError,
        match=r"3 tensor\(s\) cannot be sharded as asked:\n  embed.weight: no rule matches \(strict=True\)\n  layers.0.mlp.weight: no rule",
    ):
        resolve_shardings(
            infos, mesh=mesh, rules=[(r"attn", P("x"))], default=NamedSharding(mesh, P()), strict=True
        )


def test_indivisible_shapes_name_tensor_axis_and_mesh(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    rules = [(r"embed", P(("x", "y"))), (r"bias", P(None, "x")), (r"attn", P("x", "y"))]
    with pytest.raises(ShardingError) as caught:
        resolve_shardings(infos, mesh=mesh, rules=rules, default=NamedSharding(mesh, P()))
    message = str(caught.value)
    assert message.startswith("2 tensor(s) cannot be sharded as asked:")  # every problem at once
    assert (
        "embed.weight: Tensor 'embed.weight' of shape (12, 8) " in message
        and "dimension 0 (size 12) does not divide evenly over mesh axes ('x', 'y') (8 devices) of mesh "
        "{'x': 4, 'y': 2}"
        in message
    )
    assert "layers.0.norm.bias: Tensor 'layers.0.norm.bias' of shape (8,)" in message
    assert "attn" not in message


def test_callable_rules(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    device = jax.devices()[3]

    def rule(name: str, info: jw.TensorInfo) -> jax.sharding.Sharding | PartitionSpec | None:
        if name.startswith("embed"):
            return SingleDeviceSharding(device)
        return P("x") if len(info.shape) == 2 else None

    result = resolve_shardings(infos, mesh=mesh, rules=rule, default=NamedSharding(mesh, P()))
    assert result["embed.weight"] == SingleDeviceSharding(device)
    assert result["layers.0.mlp.weight"].spec == P("x")  # type: ignore[attr-defined]
    with pytest.raises(ShardingError, match=r"the rule returned 'rows', not a Sharding"):
        resolve_shardings(infos, mesh=mesh, rules=lambda n, i: "rows", default=NamedSharding(mesh, P()))  # type: ignore[arg-type,return-value]


def test_bad_rule_tables(infos: list[jw.TensorInfo], mesh: Mesh) -> None:
    with pytest.raises(ShardingError, match=r"Each rule is \(regex, PartitionSpec\)"):
        resolve_shardings(infos, mesh=mesh, rules=[P("x")], default=NamedSharding(mesh, P()))  # type: ignore[list-item]
    with pytest.raises(ShardingError, match=r"Rule pattern '\(' is not a valid regex"):
        resolve_shardings(infos, mesh=mesh, rules=[("(", P("x"))], default=NamedSharding(mesh, P()))
    with pytest.raises(ShardingError, match="no mesh was passed"):
        resolve_shardings(
            infos, mesh=None, rules=[(".*", P("x"))], default=SingleDeviceSharding(jax.devices()[0])
        )
