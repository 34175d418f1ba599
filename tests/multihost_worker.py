"""One process of a multi-process jaxweights test job (run by tests/test_multihost.py, not by pytest).

argv: process_id num_processes port checkpoint scenario result.json
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any


def main() -> None:
    process_id, count, port, path, scenario, out = sys.argv[1:7]
    pid, n = int(process_id), int(count)
    import jax

    jax.config.update("jax_num_cpu_devices", 8 // n)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid, initialization_timeout=60
    )
    result: dict[str, Any] = {"process": pid}
    try:
        result.update(run(scenario, path, pid, n))
    except Exception as error:  # reported to the test, which decides
        result.update(error=type(error).__name__, message=str(error), trace=traceback.format_exc())
    with open(out, "w") as handle:
        json.dump(result, handle)
    jax.distributed.shutdown()


def run(scenario: str, path: str, pid: int, n: int) -> dict[str, Any]:
    import jax
    import numpy as np
    import safetensors.numpy
    from jax.experimental.multihost_utils import process_allgather
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxweights as jw

    if scenario.startswith("mismatch") and pid == 1:
        path = path.replace(".safetensors", "-other.safetensors")
    if scenario == "mismatch_without_kv_store":  # a JAX whose private key-value store moved
        import jaxweights._multihost

        jaxweights._multihost.kv_client = lambda: None  # type: ignore[attr-defined]
    weights = jw.load_weights(path)
    devices = np.array(jax.devices())
    if scenario == "foreign_mesh":
        devices = np.array([d for d in jax.devices() if d.process_index == 0])
    line = Mesh(devices, ("x",))
    grid = Mesh(devices.reshape(2, -1), ("a", "b"))

    def rule(name: str, info: jw.TensorInfo) -> jax.sharding.Sharding | None:
        if name.startswith("rows"):
            return NamedSharding(line, P("x"))
        if name.startswith("cols"):
            return NamedSharding(line, P(None, "x"))
        if name.startswith("grid"):
            return NamedSharding(grid, P("a", "b"))
        return None

    arrays = weights.allocate_all(mesh=line, rules=rule)
    if scenario == "save":  # every process calls save; process 0 writes, gathering one tensor at a time
        folder = jw.save({"params": arrays, "step": 7}, path.replace(".safetensors", "-saved"))
        return {
            "saved": str(folder),
            "fully_addressable": any(a.is_fully_addressable for a in arrays.values()),
        }
    # Compared with the reference reader's arrays bit for bit: this process's shards, and the global
    # array gathered from every process (data movement only, no arithmetic, so equality is exact).
    source = safetensors.numpy.load_file(path)
    gathered, shards_ok = {}, True
    for name, array in arrays.items():
        reference = source[name]
        whole = np.asarray(array if array.is_fully_addressable else process_allgather(array, tiled=True))
        gathered[name] = whole.dtype == reference.dtype and bool(np.array_equal(whole, reference))
        for shard in array.addressable_shards:
            shards_ok &= bool(np.array_equal(np.asarray(shard.data), reference[shard.index]))
    sharded = sum(weights[k].info.nbytes for k in arrays if k.startswith(("rows", "cols", "grid")))
    replicated_bytes = sum(
        weights[k].info.nbytes for k in arrays if not k.startswith(("rows", "cols", "grid"))
    )
    return {
        "gathered": gathered,
        "shards_ok": shards_ok,
        "bytes_copied": weights.checkpoint.bytes_copied,
        "expected_bytes": sharded // n + replicated_bytes,
        "checkpoint_bytes": weights.checkpoint.nbytes,
        "local_devices": len(jax.local_devices()),
    }


if __name__ == "__main__":
    main()
