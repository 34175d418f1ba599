from __future__ import annotations

import jax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxweights import DeviceRef
from jaxweights._devices import to_sharding
from jaxweights.errors import DeviceError


def test_cpu_refs_resolve_to_local_cpu_devices() -> None:
    assert DeviceRef.CPU().to_jax() == jax.local_devices(backend="cpu")[0]
    assert DeviceRef.CPU(3).to_jax() == jax.local_devices(backend="cpu")[3]
    assert DeviceRef.from_jax(jax.devices()[5]) == DeviceRef.CPU(5)
    assert str(DeviceRef.CPU(2)) == "cpu:2"
    assert repr(DeviceRef.GPU(1)) == "DeviceRef.GPU(1)"
    assert DeviceRef.GPU().is_gpu() and DeviceRef.CPU().is_cpu()


def test_out_of_range_cpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match=r"DeviceRef.CPU\(99\) is out of range: this process has 8"):
        DeviceRef.CPU(99).to_jax()


@pytest.mark.skipif(bool(jax.devices()[0].platform == "gpu"), reason="needs a machine without GPU")
def test_gpu_ref_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(
        DeviceError, match=r"DeviceRef.GPU\(0\) names a GPU device, but this process has none"
    ):
        DeviceRef.GPU(0).to_jax()


def test_placements_become_shardings() -> None:
    device = jax.devices()[2]
    assert to_sharding(DeviceRef.CPU(2)) == SingleDeviceSharding(device)
    assert to_sharding(device) == SingleDeviceSharding(device)
    named = NamedSharding(Mesh(jax.devices(), ("x",)), PartitionSpec("x"))
    assert to_sharding(named) is named
    with pytest.raises(DeviceError, match=r"device='cuda' is not a placement"):
        to_sharding("cuda")  # type: ignore[arg-type]


def test_cores_come_from_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxweights._devices import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() == 3
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert usable_cores() == 1


def test_is_cpu_only() -> None:
    import jax
    from jax.sharding import SingleDeviceSharding

    from jaxweights._devices import is_cpu_only

    assert is_cpu_only(SingleDeviceSharding(jax.devices("cpu")[0]))
