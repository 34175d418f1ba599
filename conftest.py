"""Test set-up shared by tests/ and the doctests: 8 fake CPU devices, so sharding runs without accelerators.

Public classes set ``__module__ = "jaxweights"`` (so reprs and docs show ``jaxweights.Weights``), which
would make doctest skip them and their methods in the modules that define them. ``_from_module`` below
collects such a class's examples in its defining module (the one its functions' globals belong to), and
nowhere else.
"""

import doctest
import os
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# JAX's CPU backend even where a GPU is present (the tests build meshes of 8 devices);
# JAXWEIGHTS_TEST_ACCELERATORS=1 keeps the accelerators for tests/test_gpu.py (benchmarks/device_check.py)
if os.environ.get("JAXWEIGHTS_TEST_ACCELERATORS") != "1":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)

_standard_from_module = doctest.DocTestFinder._from_module  # type: ignore[attr-defined]


def _home(cls: type) -> str | None:
    """The module that defines ``cls``: the globals of any function in its body."""
    for value in vars(cls).values():
        function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        names = getattr(function, "__globals__", None)
        if names is not None:
            return str(names.get("__name__"))
    return None


def _from_module(self: doctest.DocTestFinder, module: Any, value: Any) -> bool:
    if isinstance(value, type) and value.__module__ == "jaxweights" and module is not None:
        home = _home(value)
        if home is not None:
            return home == module.__name__
    return bool(_standard_from_module(self, module, value))


doctest.DocTestFinder._from_module = _from_module  # type: ignore[attr-defined]
