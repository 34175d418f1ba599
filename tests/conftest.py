"""Shared fixtures. Fakes 8 CPU devices so sharding is tested without accelerators.

The suite runs on JAX's CPU backend even where a GPU is present (see the repository's conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def write_reference(tmp_path: Path) -> Callable[..., Path]:
    """Writes tensors with the reference writer (`safetensors.numpy.save_file`) into ``tmp_path``."""

    def write(
        tensors: dict[str, np.ndarray],
        name: str = "model.safetensors",
        metadata: dict[str, str] | None = None,
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
        return path

    return write


@pytest.fixture
def transformer(write_reference: Callable[..., Path]) -> Path:
    """A small transformer-like checkpoint written by the reference writer (8-byte aligned, as HF's)."""
    rng = np.random.default_rng(0)
    tensors = {"embeddings.weight": rng.standard_normal((16, 8), dtype=np.float32)}
    for i in range(12):
        tensors[f"transformer.layers.{i}.attention.weight"] = rng.standard_normal((8, 8), dtype=np.float32)
        tensors[f"transformer.layers.{i}.mlp.weight"] = rng.standard_normal((8, 32), dtype=np.float32)
        tensors[f"transformer.layers.{i}.norm.bias"] = rng.standard_normal(8, dtype=np.float32)
    return write_reference(tensors)
