from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxweights import _compat
from jaxweights._buffers import aligned_empty
from jaxweights._compat import jit_cache_size, program_constants, put_on_device


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


def hosts() -> list[np.ndarray]:
    aligned = aligned_empty((8, 16), np.dtype(np.float32))
    aligned[...] = np.arange(128, dtype=np.float32).reshape(8, 16)
    return [
        aligned,
        np.arange(6, dtype=np.int8).reshape(2, 3),
        np.zeros((0, 4), np.uint16),
        np.array(3.5, np.float32),
    ]


def test_put_on_device_matches_device_put() -> None:
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    given = hosts()
    placed = put_on_device([np.asarray(h) for h in given], sharding)
    reference = jax.device_put([np.asarray(h) for h in given], sharding)
    for ours, theirs in zip(placed, reference, strict=True):
        assert isinstance(ours, jax.Array) and ours.committed
        assert ours.sharding == theirs.sharding and ours.devices() == {device}
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # an aligned host array is aliased, as jax.device_put does on CPU
    if device.platform == "cpu":
        assert placed[0].unsafe_buffer_pointer() == given[0].ctypes.data
    assert (placed[0] + 1)[1, 0] == 17  # usable in computations


def test_put_on_device_narrows_like_device_put() -> None:
    if jax.config.read("jax_enable_x64"):
        pytest.skip("64-bit types are kept with x64 on")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    (placed,) = put_on_device([np.arange(3, dtype=np.float64)], sharding)
    assert placed.dtype == np.float32 and placed.tolist() == [0.0, 1.0, 2.0]


def test_put_on_device_falls_back_to_device_put(monkeypatch: pytest.MonkeyPatch) -> None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def refusing(*args: object) -> object:  # a JAX whose private function changed its signature
        raise TypeError("unexpected argument")

    for replacement in (lambda: None, lambda: refusing):
        monkeypatch.setattr(_compat, "_batched_device_put", replacement)
        placed = put_on_device(hosts(), sharding)
        assert [a.shape for a in placed] == [(8, 16), (2, 3), (0, 4), ()]
        assert placed[1].tolist() == [[0, 1, 2], [3, 4, 5]] and all(a.committed for a in placed)
    if len(jax.devices()) >= 2:  # several devices: the public path
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
        (split,) = put_on_device(
            [np.ones((2, 2), np.float32)], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        )
        assert len(split.sharding.device_set) == 2
