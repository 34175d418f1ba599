"""The one home of JAX APIs that are private or changed between versions; each function has a fallback
and a test.

Nothing else in jaxweights touches a private JAX attribute or a module that moved between releases. Each
function here is small, says what it falls back to, and never raises because JAX changed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jax
import numpy as np

__all__ = ["jit_cache_size", "kv_client", "program_constants", "put_on_device"]


def jit_cache_size(jitted: Any) -> int | None:
    """Entries in a `jax.jit` function's compiled cache, or None where this JAX does not expose them.

    Uses the private ``_cache_size()`` of jitted functions (present from JAX 0.4 to at least 0.10).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = jax.jit(lambda x: x + 1)
        >>> _ = f(jnp.ones(2)), f(jnp.ones(3))
        >>> jit_cache_size(f), jit_cache_size(lambda x: x)
        (2, None)
    """
    size = getattr(jitted, "_cache_size", None)
    if not callable(size):
        return None
    try:
        return int(size())
    except Exception:  # a changed signature: report nothing rather than fail
        return None


def program_constants(closed_jaxpr: Any) -> list[Any]:
    """Every array baked into a traced program: the constants of ``closed_jaxpr`` (as
    ``jax.jit(f).trace(...).jaxpr`` gives it) and of the programs nested in it (inner ``jit``, ``cond``,
    ``scan``), and the array literals JAX inlines when ``jax_use_simplified_jaxpr_constants`` is on.

    Walking nested programs uses `jax.extend.core`, whose names moved between JAX versions; without it,
    only the outer program's ``consts`` are returned.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> table = np.ones((4, 4), np.float32)
        >>> inner = jax.jit(lambda x: x @ table)
        >>> closed = jax.jit(lambda x: jnp.tanh(inner(x))).trace(jnp.ones(4)).jaxpr
        >>> [c.shape for c in program_constants(closed)]
        [(4, 4)]
    """
    try:
        from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
    except ImportError:  # an older or newer JAX without these names
        return list(closed_jaxpr.consts)
    found: dict[int, Any] = {}

    def visit(value: Any) -> None:
        if isinstance(value, ClosedJaxpr):
            for const in value.consts:
                found.setdefault(id(const), const)
            visit(value.jaxpr)
        elif isinstance(value, Jaxpr):
            for eqn in value.eqns:
                for var in eqn.invars:
                    if isinstance(var, Literal) and hasattr(var.val, "shape"):
                        found.setdefault(id(var.val), var.val)
                for param in eqn.params.values():
                    visit(param)
            for var in value.outvars:
                if isinstance(var, Literal) and hasattr(var.val, "shape"):
                    found.setdefault(id(var.val), var.val)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(closed_jaxpr)
    return list(found.values())


def kv_client() -> Any:
    """The `jax.distributed` key-value store client of this process, or None (not initialised, or a JAX
    that no longer keeps it at ``jax._src.distributed.global_state.client``). JAX has no public handle
    to it; callers fall back to a collective (`multihost_utils.process_allgather`) when this is None.

    Example:
        >>> kv_client() is None  # a single process that never called jax.distributed.initialize
        True
    """
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def put_on_device(hosts: list[np.ndarray], sharding: jax.sharding.Sharding) -> list[jax.Array]:
    """``jax.device_put(hosts, sharding)`` for host arrays already in a dtype JAX keeps (no 64-bit type
    with x64 off) and a sharding over one device: one committed `jax.Array` each, aliasing the host
    array where XLA can (CPU, 64-byte aligned) exactly as `jax.device_put` does.

    `jax.device_put` spends ~40 us of Python per array; for checkpoints of thousands of small tensors
    that is most of the load. This calls the C++ ``batched_device_put`` that `jax.device_put` ends in
    (private, present from JAX 0.4.31 to at least 0.10) with a cached abstract value per shape and
    dtype, ~8 us per array. Falls back to `jax.device_put` where that function is missing or refuses.

    Example:
        >>> import jax, numpy as np
        >>> sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        >>> [a.shape for a in put_on_device([np.ones((2, 3), np.float32), np.arange(4)], sharding)]
        [(2, 3), (4,)]
    """
    put = _batched_device_put()
    devices = list(sharding.device_set)
    if put is None or len(devices) != 1:
        return list(jax.device_put(hosts, sharding))
    x64 = bool(jax.config.read("jax_enable_x64"))
    try:
        arrays = []
        for host in hosts:
            aval = _aval(host.shape, host.dtype, x64)
            arrays.append(
                jax.device_put(host, sharding) if aval is None else put(aval, sharding, [host], devices, True)
            )
        return arrays
    except Exception:  # a changed signature or a refused array: the public path
        return list(jax.device_put(hosts, sharding))


@lru_cache(maxsize=1)
def _batched_device_put() -> Any:
    try:
        import importlib

        from jax._src import core

        native = importlib.import_module("jax._src.lib")._jax
    except (ImportError, AttributeError):
        return None
    put = getattr(native, "batched_device_put", None)
    if put is None or not hasattr(core, "ShapedArray"):
        return None
    return put


@lru_cache(maxsize=4096)
def _aval(shape: tuple[int, ...], dtype: np.dtype[Any], x64: bool) -> Any:
    """The abstract value of a host array JAX keeps as it is, or None (a type JAX would narrow)."""
    from jax._src import core

    if np.dtype(jax.dtypes.canonicalize_dtype(dtype)) != dtype:
        return None
    return core.ShapedArray(shape, dtype)
