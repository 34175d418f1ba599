"""The one bulk planner: allocate_all, to_pytree and restore share its checks, dtype rule and order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights import DType
from jaxweights._bulk import dtype_for, plan_jobs
from jaxweights.errors import DTypeError, ShardingError


@pytest.fixture
def mixed(write_reference: Callable[..., Path]) -> Path:
    tensors: dict[str, np.ndarray] = {
        f"layers.{i}.w": np.full((4, 2), i, np.float32) for i in (0, 1, 2, 10, 11)
    }
    tensors["ids"] = np.arange(4, dtype=np.int32)
    tensors["mask"] = np.array([True, False])
    return write_reference(tensors)


def test_one_dtype_converts_floats_only_in_every_bulk_load(mixed: Path) -> None:
    weights = jw.load_weights(mixed)
    arrays = weights.allocate_all(dtype="bf16")
    assert arrays["layers.2.w"].dtype == jnp.bfloat16
    assert arrays["ids"].dtype == np.int32 and arrays["mask"].dtype == np.bool_
    tree = weights.to_pytree(dtype=DType.float16)
    assert tree["layers"]["10"]["w"].dtype == np.float16 and tree["ids"].dtype == np.int32
    shapes = weights.to_pytree(dtype="float16", shapes_only=True)
    assert shapes["layers"]["10"]["w"].dtype == np.float16 and shapes["ids"].dtype == np.int32


def test_bulk_loads_come_in_natural_order(mixed: Path) -> None:
    weights = jw.load_weights(mixed)
    assert list(weights.layers.allocate_all()) == ["0.w", "1.w", "2.w", "10.w", "11.w"]
    stacked = jnp.stack(list(weights.layers.allocate_all().values()))
    assert stacked[:, 0, 0].tolist() == [0, 1, 2, 10, 11]
    assert list(weights.allocated_weights)[:5] == [f"layers.{i}.w" for i in (0, 1, 2, 10, 11)]


def test_restore_reads_through_the_same_planner(mixed: Path) -> None:
    weights = jw.load_weights(mixed)
    target = {"ids": jnp.zeros(4, jnp.int8), "mask": jnp.zeros(2, bool)}
    restored = weights.restore(target, strict=False, cast=True)
    assert restored["ids"].dtype == jnp.int8 and restored["ids"].tolist() == [0, 1, 2, 3]
    assert set(weights.allocated_weights) == {"ids", "mask"}  # recorded like allocate_all's


def test_sharding_problems_are_reported_together_before_any_read(mixed: Path) -> None:
    weights = jw.load_weights(mixed)
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    with pytest.raises(ShardingError, match=r"(?s)2 tensor\(s\).*ids.*layers\.0\.w"):
        weights.allocate_all(mesh=mesh, rules=[(r"^(ids|layers\.0\.w)$", P("x"))])
    assert weights.checkpoint.bytes_copied == 0 and not weights.allocated_weights


def test_dtype_rule_per_name_and_for_a_subtree(mixed: Path) -> None:
    checkpoint = jw.load_weights(mixed).checkpoint
    ids, weight = checkpoint["ids"], checkpoint["layers.0.w"]
    assert dtype_for(weight, None) is DType.float32 and dtype_for(ids, "bfloat16") is DType.int32
    assert dtype_for(ids, {"ids": "int16"}) is DType.int16  # a restore target's dtype is used as given
    with pytest.raises(DTypeError, match="64-bit"):
        dtype_for(weight, "float64")
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    jobs = plan_jobs([weight], mesh=mesh, rules=[("w$", P("x"))])
    assert jobs[0].sharding == NamedSharding(mesh, P("x")) and jobs[0].dtype is DType.float32


def test_int64_values_never_wrap_when_x64_is_off(write_reference: Callable[..., Path]) -> None:
    big = np.array([2**40 + 5, 1], dtype=np.int64)
    weights = jw.load_weights(write_reference({"big": big, "small": np.arange(3, dtype=np.int64)}))
    assert weights.small.allocate().array.tolist() == [0, 1, 2]
    with pytest.raises(DTypeError, match=r"(?s)'big'.*1099511627781.*int32.*jax_enable_x64"):
        weights.big.allocate()
    with pytest.raises(DTypeError, match="'big'"):
        weights.allocate_all()
    with pytest.raises(DTypeError, match="'big'"):
        weights.restore({"big": jnp.zeros(2, jnp.int32)}, strict=False)
    with pytest.raises(DTypeError, match=r"'small'.*int8|int8.*'small'"):
        jw.load_weights(
            write_reference({"small": np.array([300], np.int64)}, "b.safetensors")
        ).small.allocate(dtype="int8")
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    with pytest.raises(DTypeError, match="'big'"):  # the check holds for sharded reads too
        weights.big.allocate(device=NamedSharding(mesh, P("x")))
    jax.config.update("jax_enable_x64", True)
    try:
        assert weights.big.allocate().array.tolist() == big.tolist()
    finally:
        jax.config.update("jax_enable_x64", False)
