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
    if scenario.startswith(("write", "restore")):
        return run_save(scenario, path, pid, n)
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
    if scenario == "stack":  # stacked layers: each process reads only its devices' rows of each layer
        return run_stack(weights, Mesh(devices, ("x",)), path)
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


def run_stack(weights: Any, mesh: Any, path: str) -> dict[str, Any]:
    import jax
    import numpy as np
    import safetensors.numpy
    from jax.experimental.multihost_utils import process_allgather
    from jax.sharding import PartitionSpec as P

    rules = [(r"rows\.weight$", P(None, "x")), (r"cols\.weight$", P(None, None, "x")), (r"stage$", P("x"))]
    tree = weights.layers.to_pytree(stack=True, mesh=mesh, rules=rules)
    source = safetensors.numpy.load_file(path)
    equal = {}
    for rest in ("rows.weight", "cols.weight", "stage"):
        array = tree
        for part in rest.split("."):
            array = array[part]
        expected = np.stack([source[f"layers.{i}.{rest}"] for i in range(8)])
        whole = np.asarray(process_allgather(array, tiled=True))
        equal[rest] = bool(np.array_equal(whole, expected)) and all(
            np.array_equal(np.asarray(shard.data), expected[shard.index])
            for shard in array.addressable_shards
        )
    total = sum(info.nbytes for _, info in weights.layers.checkpoint.items())
    return {
        "equal": equal,
        "bytes_copied": weights.checkpoint.bytes_copied,
        "checkpoint_bytes": total,
        "processes": jax.process_count(),
    }


def sharding_of(name: str) -> Any:
    """How the save scenarios place each tensor of the values file: by the first part of its name."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices())
    line, grid = Mesh(devices, ("x",)), Mesh(devices.reshape(2, -1), ("a", "b"))
    kind = name.split(".")[0]
    specs = {"rows": (line, P("x")), "cols": (line, P(None, "x")), "grid": (grid, P("a", "b"))}
    mesh, spec = specs.get(kind, (line, P()))  # "replicated", "scalar": every device holds it whole
    return None if kind == "host" else NamedSharding(mesh, spec)


def run_save(scenario: str, path: str, pid: int, n: int) -> dict[str, Any]:
    """``write*``: every process saves the values file's tensors, sharded by `sharding_of` (``host.*`` stay
    numpy), into ``saved-N`` (shards of at most 10 kB) and ``single-N.safetensors``, and reports what it
    wrote. ``restore``: restores ``path`` (a saved folder) onto this job's shardings and compares it with
    the values file beside it, bit for bit."""
    import time
    from pathlib import Path

    import jax
    import numpy as np
    import safetensors.numpy

    import jaxweights as jw
    import jaxweights._save

    if scenario == "restore":
        source = safetensors.numpy.load_file(str(Path(path).parent / "values.safetensors"))
        target = {
            "params": {
                name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding_of(name))
                if sharding_of(name) is not None
                else np.zeros_like(value)
                for name, value in source.items()
            },
            "step": 0,
        }
        restored = jw.restore(path, target)
        exact = {}
        for name, want in source.items():
            got = restored["params"][name]
            if isinstance(got, jax.Array):
                exact[name] = all(
                    np.asarray(shard.data).tobytes() == want[shard.index].tobytes()
                    for shard in got.addressable_shards
                )
            else:
                exact[name] = np.asarray(got).tobytes() == want.tobytes()
        return {"exact": exact, "step": restored["step"], "local_devices": len(jax.local_devices())}
    source = safetensors.numpy.load_file(path)
    arrays: dict[str, Any] = {}
    for name, value in source.items():
        sharding = sharding_of(name)
        arrays[name] = value if sharding is None else jax.device_put(value, sharding)  # each device its block
    tree: dict[str, Any] = {"params": arrays, "step": 7}
    folder, single = Path(path).parent / f"saved-{n}", Path(path).parent / f"single-{n}.safetensors"
    if scenario == "write_fails" and pid == 1:  # this process's disk fills while it writes its shards

        def full_disk(*args: Any) -> None:
            raise OSError(28, "No space left on device")

        jaxweights._save._put_block = full_disk  # type: ignore[assignment]
    if scenario == "write_mismatch" and pid == 1:
        tree["params"] = {**arrays, "extra": np.ones(3, np.float32)}
    if scenario == "write_absent":  # process 1 never saves: process 0 times out instead of hanging
        jaxweights._save.BARRIER_TIMEOUT_S = 3.0
        if pid == 1:
            time.sleep(5)
            return {"skipped": True}
    started = time.perf_counter()
    jw.save(tree, folder, max_shard_size="10kB")
    stats = jaxweights._save.last_save_stats()
    jw.save(tree, single)
    single_stats = jaxweights._save.last_save_stats()
    assert stats is not None and single_stats is not None
    sharded = sum(v.nbytes for k, v in source.items() if k.split(".")[0] in ("rows", "cols", "grid"))
    whole = sum(v.nbytes for k, v in source.items() if k.split(".")[0] not in ("rows", "cols", "grid"))
    return {
        "seconds": time.perf_counter() - started,
        "tensor_bytes": stats.tensor_bytes,
        "single_tensor_bytes": single_stats.tensor_bytes,
        "header_bytes": stats.header_bytes,
        "expected_bytes": sharded // n + (whole if pid == 0 else 0),
        "total_bytes": sharded + whole,
        "fully_addressable": any(
            isinstance(a, jax.Array) and a.is_fully_addressable for k, a in arrays.items() if k[:4] != "host"
        ),
    }


if __name__ == "__main__":
    main()
