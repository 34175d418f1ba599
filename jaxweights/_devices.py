"""Device references: `DeviceRef.CPU()` / `DeviceRef.GPU(i)`, resolved to `jax.Device`s.

A *placement* is what `allocate(device=...)` accepts: a `DeviceRef`, a `jax.Device` or any
`jax.sharding.Sharding`. This module turns each into a `Sharding`; it never reads a byte.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

import jax
from jax.sharding import Sharding, SingleDeviceSharding

from .errors import DeviceError

__all__ = ["DeviceKind", "DeviceRef", "Placement", "is_cpu_only", "to_sharding", "usable_cores"]


class DeviceKind(enum.Enum):
    """The kind of device a `DeviceRef` points at.

    Example:
        >>> from jaxweights import DeviceKind, DeviceRef
        >>> DeviceRef.CPU().device_type is DeviceKind.CPU, DeviceKind.GPU.value
        (True, 'gpu')
    """

    __module__ = "jaxweights"

    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class DeviceRef:
    """A device named by kind and index among this process's local devices of that kind.

    Example:
        >>> from jaxweights import DeviceRef
        >>> DeviceRef.CPU()
        DeviceRef.CPU(0)
        >>> DeviceRef.CPU().to_jax().platform
        'cpu'
        >>> DeviceRef.from_jax(DeviceRef.CPU(1).to_jax())
        DeviceRef.CPU(1)
    """

    __module__ = "jaxweights"

    device_type: DeviceKind
    id: int = 0

    @staticmethod
    def CPU(id: int = 0) -> DeviceRef:  # noqa: N802 - MAX's spelling
        """The ``id``-th local CPU device (``cpu:0`` by default).

        Example:
            >>> from jaxweights import DeviceRef
            >>> DeviceRef.CPU(1), str(DeviceRef.CPU())
            (DeviceRef.CPU(1), 'cpu:0')
        """
        return DeviceRef(DeviceKind.CPU, id)

    @staticmethod
    def GPU(id: int = 0) -> DeviceRef:  # noqa: N802 - MAX's spelling
        """The ``id``-th local GPU device (CUDA or ROCm).

        Building a reference needs no GPU; only `to_jax` looks for one.

        Example:
            >>> from jaxweights import DeviceRef
            >>> DeviceRef.GPU(0), str(DeviceRef.GPU(2))
            (DeviceRef.GPU(0), 'gpu:2')
        """
        return DeviceRef(DeviceKind.GPU, id)

    def is_cpu(self) -> bool:
        """True for a CPU reference.

        Example:
            >>> from jaxweights import DeviceRef
            >>> DeviceRef.CPU().is_cpu(), DeviceRef.GPU().is_cpu()
            (True, False)
        """
        return self.device_type is DeviceKind.CPU

    def is_gpu(self) -> bool:
        """True for a GPU reference.

        Example:
            >>> from jaxweights import DeviceRef
            >>> DeviceRef.GPU().is_gpu(), DeviceRef.CPU().is_gpu()
            (True, False)
        """
        return self.device_type is DeviceKind.GPU

    def __repr__(self) -> str:
        return f"DeviceRef.{self.device_type.name}({self.id})"

    def __str__(self) -> str:
        return f"{self.device_type.value}:{self.id}"

    def to_jax(self) -> jax.Device:
        """The `jax.Device` this reference names.

        Raises:
            DeviceError: this process has no such device (for example a GPU on a CPU-only machine).

        Example:
            >>> from jaxweights import DeviceRef
            >>> device = DeviceRef.CPU().to_jax()
            >>> device.platform
            'cpu'
        """
        kind = self.device_type.value
        try:
            devices = jax.local_devices(backend=kind)
        except RuntimeError:
            devices = []
        if not devices:
            available = ", ".join(sorted({d.platform for d in jax.local_devices()}))
            raise DeviceError(
                f"{self!r} names a {kind.upper()} device, but this process has none (it has: "
                f"{available}). Use DeviceRef.CPU(), or install a GPU build of jaxlib "
                f"(pip install -U 'jax[cuda12]') on a machine with a GPU."
            )
        if not 0 <= self.id < len(devices):
            raise DeviceError(
                f"{self!r} is out of range: this process has {len(devices)} local {kind.upper()} "
                f"device(s), numbered 0 to {len(devices) - 1}."
            )
        return devices[self.id]

    @staticmethod
    def from_jax(device: jax.Device) -> DeviceRef:
        """The reference for a local `jax.Device`.

        Example:
            >>> import jax
            >>> from jaxweights import DeviceRef
            >>> DeviceRef.from_jax(jax.local_devices(backend="cpu")[0])
            DeviceRef.CPU(0)
        """
        kind = DeviceKind.CPU if device.platform == "cpu" else DeviceKind.GPU
        local = jax.local_devices(backend=device.platform)
        return DeviceRef(kind, local.index(device) if device in local else device.id)


Placement: TypeAlias = DeviceRef | jax.Device | Sharding


@lru_cache(maxsize=64)
def _ref_sharding(ref: DeviceRef) -> SingleDeviceSharding:
    return SingleDeviceSharding(ref.to_jax())


def to_sharding(placement: Placement) -> Sharding:
    """The `Sharding` a placement stands for (a single device becomes a `SingleDeviceSharding`)."""
    if isinstance(placement, DeviceRef):
        return _ref_sharding(placement)
    if isinstance(placement, Sharding):
        return placement
    if isinstance(placement, jax.Device):
        return SingleDeviceSharding(placement)
    raise DeviceError(
        f"device={placement!r} is not a placement. Pass a DeviceRef (DeviceRef.CPU(), "
        f"DeviceRef.GPU(0)), a jax.Device or a jax.sharding.Sharding."
    )


def is_cpu_only(sharding: Sharding) -> bool:
    """True when every device of ``sharding`` this process holds is a CPU device."""
    return all(getattr(device, "platform", None) == "cpu" for device in sharding.addressable_devices)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return max(1, len(affinity(0)))
        except OSError:  # pragma: no cover - a sandbox that hides it
            pass
    return max(1, os.cpu_count() or 1)
