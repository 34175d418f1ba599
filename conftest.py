"""Test set-up shared by tests/ and the doctests: 8 fake CPU devices, so sharding runs without accelerators."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_num_cpu_devices", 8)
