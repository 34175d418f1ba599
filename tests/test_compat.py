from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxweights._compat import jit_cache_size, program_constants


def test_jit_cache_size_counts_compiled_signatures() -> None:
    f = jax.jit(lambda x: x * 2)
    assert jit_cache_size(f) == 0
    f(jnp.ones(2))
    f(jnp.ones(2))
    f(jnp.ones(3))
    assert jit_cache_size(f) == 2


def test_jit_cache_size_falls_back_to_none() -> None:
    class Renamed:  # a jitted function of a JAX without the private method
        def __call__(self, x: object) -> object:
            return x

    class Changed:  # ... or with another signature
        def _cache_size(self, key: object) -> int:
            return 0

    assert jit_cache_size(Renamed()) is None and jit_cache_size(Changed()) is None


def big_tables() -> tuple[jax.Array, np.ndarray]:
    return jnp.ones((64, 64)), np.full((64, 64), 2.0, np.float32)


def program_with_nested_constants() -> object:
    on_device, on_host = big_tables()
    inner = jax.jit(lambda x: x @ on_device)

    def outer(x: jax.Array) -> jax.Array:
        y = inner(x) @ on_host
        return jax.lax.cond(x.sum() > 0, lambda v: v @ on_device, lambda v: v, y)

    return jax.jit(outer).trace(jnp.ones((2, 64))).jaxpr


def test_program_constants_finds_nested_and_host_arrays() -> None:
    arrays = [c for c in program_constants(program_with_nested_constants()) if np.size(c) > 1]
    assert [np.shape(c) for c in arrays] == [(64, 64), (64, 64)]  # the device table once, though used twice
    assert sorted(float(np.asarray(c)[0, 0]) for c in arrays) == [1.0, 2.0]


def test_program_constants_finds_inlined_literals() -> None:
    name = "jax_use_simplified_jaxpr_constants"
    if name not in jax.config.values:
        pytest.skip("this JAX has no simplified jaxpr constants")
    before = jax.config.values[name]
    jax.config.update(name, True)
    try:
        shapes = [np.shape(c) for c in program_constants(program_with_nested_constants())]
    finally:
        jax.config.update(name, before)
    assert shapes.count((64, 64)) == 2


def test_program_constants_falls_back_to_the_outer_consts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax.extend.core", None)  # as if the module had moved
    closed = program_with_nested_constants()
    assert [np.shape(c) for c in program_constants(closed)] == [np.shape(c) for c in closed.consts]  # type: ignore[attr-defined]


def test_kv_client_is_none_outside_a_job_and_where_jax_moved_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxweights._compat import kv_client

    assert kv_client() is None  # this process never called jax.distributed.initialize
    monkeypatch.setitem(sys.modules, "jax._src.distributed", None)  # the private module is gone
    assert kv_client() is None
