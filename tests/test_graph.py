from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw
from jaxweights.errors import StructureMismatchError


def mlp_checkpoint(folder: Path, name: str, hidden: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return jw.save_file(
        {
            "fc1.weight": rng.standard_normal((hidden, 16), dtype=np.float32),
            "fc1.bias": rng.standard_normal(hidden, dtype=np.float32),
            "fc2.weight": rng.standard_normal((4, hidden), dtype=np.float32),
        },
        folder / name,
    )


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    w = jw.load_weights(path)
    h = np.maximum(x @ w.fc1.weight.data().data.T + w.fc1.bias.data().data, 0)
    return np.asarray(h @ w.fc2.weight.data().data.T)


def make_forward(graph: jw.Graph) -> jw.GraphFunction:
    weights = graph.weights()

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        w1 = graph.add_weight(weights.fc1.weight.allocate())
        b1 = graph.add_weight(weights.fc1.bias.allocate())
        w2 = graph.add_weight(weights.fc2.weight.allocate())
        return jax.nn.relu(x @ w1.T + b1) @ w2.T

    return forward  # type: ignore[no-any-return]


def test_weights_flow_in_as_arguments_and_checkpoints_swap_without_recompiling(tmp_path: Path) -> None:
    first, second = (
        mlp_checkpoint(tmp_path, "a.safetensors", 32, 0),
        mlp_checkpoint(tmp_path, "b.safetensors", 32, 1),
    )
    graph = jw.Graph("mlp", weights=jw.load_weights(first))
    forward = make_forward(graph)
    x = np.random.default_rng(2).standard_normal((3, 16), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(first, x), rtol=1e-5)
    assert sorted(graph.declared) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    graph.bind(second)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(second, x), rtol=1e-5)
    graph.bind(jw.load_weights(first))
    np.testing.assert_allclose(np.asarray(forward(x)), reference(first, x), rtol=1e-5)
    assert forward.cache_size() == 1


def test_lowered_text_does_not_grow_with_the_weights(tmp_path: Path) -> None:
    sizes = {}
    for hidden in (16384, 1048576):  # fc1 holds 1 MiB, then 64 MiB
        path = mlp_checkpoint(tmp_path, f"m{hidden}.safetensors", hidden, 0)
        graph = jw.Graph("mlp", weights=jw.load_weights(path))
        text = make_forward(graph).lower(jnp.ones((2, 16))).as_text()
        assert 'dense<"0x' not in text  # no tensor constant (how XLA prints baked-in arrays)
        sizes[hidden] = len(text)
    assert abs(sizes[16384] - sizes[1048576]) < 64  # only the printed dimensions differ
    baked = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4096), dtype=np.float32))  # 256 KiB
    closure = jax.jit(lambda x: x @ baked).lower(jnp.ones((2, 16))).as_text()
    assert len(closure) > 500_000  # what a closure does instead: the constant is in the text, as hex


def test_compile_before_any_byte_is_read(tmp_path: Path) -> None:
    path = mlp_checkpoint(tmp_path, "m.safetensors", 32, 0)
    weights = jw.load_weights(path)
    graph = jw.Graph("mlp", weights=weights)

    def forward(x: jax.Array) -> jax.Array:
        w1 = graph.add_weight(weights.fc1.weight)  # an accessor: declared from the catalogue, not read
        b1 = graph.add_weight(weights.fc1.bias, dtype="bfloat16")
        w2 = graph.add_weight(weights.fc2.weight)
        return jax.nn.relu(x @ w1.T + b1) @ w2.T

    compiled = graph.compile(forward, jax.ShapeDtypeStruct((3, 16), jnp.float32))
    assert weights.checkpoint.bytes_copied == 0 and graph.bound == {}
    assert graph.declared["fc1.bias"].dtype == jnp.bfloat16
    x = np.ones((3, 16), np.float32)
    out = compiled(x)  # reads the weights now, with the declared dtype
    assert graph.bound["fc1.bias"].dtype == jnp.bfloat16
    w = jw.load_weights(path)
    b1 = w.fc1.bias.data().data.astype(jnp.bfloat16)
    expected = np.maximum(x @ w.fc1.weight.data().data.T + b1, 0) @ w.fc2.weight.data().data.T
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-2)


def test_declared_weights_bind_later_and_problems_are_reported_at_once(tmp_path: Path) -> None:
    graph = jw.Graph("mlp")
    weights = graph.weights()
    with pytest.raises(ValueError, match=r"allocate\(\) declares it and needs both dtype= and shape="):
        weights.fc1.weight.allocate()
    with graph:
        assert jw.Graph.current() is graph
        w1 = weights.fc1.weight.allocate(dtype=jw.DType.float32, shape=(32, 16))
        assert w1.declared and repr(w1).endswith("declared)")
        declared = graph.add_weight(w1)
        assert isinstance(declared, jax.ShapeDtypeStruct) and declared.shape == (32, 16)
        graph.add_weight(weights.fc1.bias.allocate(dtype="float32", shape=(32,)))
        graph.add_weight(weights.fc2.weight.allocate(dtype="float32", shape=(4, 32)))
    assert jw.Graph.current() is None
    with pytest.raises(ValueError, match=r"has no data yet; bind its graph"):
        _ = w1.array

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        return jax.nn.relu(x @ graph.add_weight(w1).T)

    with pytest.raises(ValueError, match=r"declared weights with no data: fc1.bias, fc1.weight, fc2.weight"):
        forward(jnp.ones((1, 16)))
    bad = {"fc1.weight": np.zeros((16, 32), np.float32), "fc1.bias": np.zeros(32, np.int32)}
    with pytest.raises(StructureMismatchError) as caught:
        graph.bind(bad)
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "'fc1.bias': dtype int32, declared float32 (bytes are never reinterpreted)" in message
    assert "'fc1.weight': shape (16, 32), declared (32, 16)" in message
    assert "missing: 'fc2.weight'" in message
    graph.bind(mlp_checkpoint(tmp_path, "m.safetensors", 32, 0))
    assert forward(jnp.ones((1, 16))).shape == (1, 32)


def test_adding_a_weight_twice(tmp_path: Path) -> None:
    path = mlp_checkpoint(tmp_path, "m.safetensors", 32, 0)
    graph = jw.Graph("mlp", weights=path)
    weights = graph.weights()
    first = graph.add_weight(weights.fc1.weight.allocate())
    again = graph.add_weight(weights.fc1.weight.allocate())
    assert again is first
    with pytest.raises(
        ValueError, match=r"Weight 'fc1.weight' already exists in graph 'mlp' as float32\[32, 16\]"
    ):
        graph.add_weight(weights.fc1.weight.allocate(dtype="bfloat16"))


def test_a_sharded_graph(tmp_path: Path, write_reference: Callable[..., Path]) -> None:
    mesh = Mesh(np.array(jax.devices()), ("model",))
    rng = np.random.default_rng(0)
    values = {
        "up": rng.standard_normal((64, 16), dtype=np.float32),
        "down": rng.standard_normal((16, 64), dtype=np.float32),
    }
    path = write_reference(values)
    weights = jw.load_weights(path)
    graph = jw.Graph("tp", weights=weights)

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        up = graph.add_weight(weights.up.allocate(device=NamedSharding(mesh, P("model"))))
        down = graph.add_weight(weights.down.allocate(device=NamedSharding(mesh, P(None, "model"))))
        return jax.nn.relu(x @ up.T) @ down.T

    x = rng.standard_normal((4, 16), dtype=np.float32)
    expected = np.maximum(x @ values["up"].T, 0) @ values["down"].T
    np.testing.assert_allclose(np.asarray(forward(x)), expected, rtol=1e-4, atol=1e-4)
    assert graph.bound["up"].sharding == NamedSharding(mesh, P("model"))
    assert (
        weights.checkpoint.bytes_copied == values["up"].nbytes + values["down"].nbytes
    )  # each byte read once
    text = forward.lower(x).as_text()
    assert "sdy.sharding" in text or "mhlo.sharding" in text
