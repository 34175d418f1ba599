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
from jaxweights import _compat
from jaxweights._compat import program_constants
from jaxweights._graph import GraphConstantWarning
from jaxweights.errors import GraphError, StructureMismatchError


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


def baked_bytes(function: jw.GraphFunction, *args: object) -> int:
    """Bytes of constants in the program a graph function compiles."""
    return sum(int(c.nbytes) for c in program_constants(function.trace(*args).jaxpr))


def test_weights_are_inputs_of_the_program_not_constants(tmp_path: Path) -> None:
    path = mlp_checkpoint(tmp_path, "m.safetensors", 16384, 0)  # fc1 holds 1 MiB
    graph = jw.Graph("mlp", weights=jw.load_weights(path))
    forward = make_forward(graph)
    x = jnp.ones((2, 16))
    assert baked_bytes(forward, x) < 1024
    weights_in, *_ = forward.trace(x).args_info[0]
    assert sorted(weights_in) == ["fc1.bias", "fc1.weight", "fc2.weight"]


def test_a_graph_hands_out_one_accessor_of_its_own(tmp_path: Path) -> None:
    path = mlp_checkpoint(tmp_path, "m.safetensors", 32, 0)
    mine = jw.load_weights(path)
    graph = jw.Graph("mlp", weights=mine)
    assert graph.weights() is graph.weights() and graph.weights() == graph.weights()
    assert graph.weights() != mine and graph.weights().checkpoint is mine.checkpoint
    make_forward(graph)(np.ones((1, 16), np.float32))
    assert sorted(graph.weights().allocated_weights) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    assert mine.allocated_weights == {}  # the caller's accessor keeps plain semantics
    assert jw.Graph("empty").weights() is not jw.Graph("empty").weights()


def test_allocate_inside_a_function_is_the_traced_argument(tmp_path: Path) -> None:
    first, second = (
        mlp_checkpoint(tmp_path, "a.safetensors", 384, 0),
        mlp_checkpoint(tmp_path, "b.safetensors", 384, 1),
    )
    graph = jw.Graph("mlp", weights=first)
    weights = graph.weights()
    seen: list[object] = []

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        w1 = weights.fc1.weight.allocate()  # no add_weight: allocate records it (as MAX does)
        seen.append(w1.array)
        assert graph.add_weight(w1) is w1.array
        return jax.nn.relu(x @ w1.T + weights.fc1.bias.allocate()) @ weights.fc2.weight.allocate().T

    x = np.random.default_rng(2).standard_normal((3, 16), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(first, x), rtol=1e-5)
    assert isinstance(seen[-1], jax.core.Tracer)
    assert sorted(graph.declared) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    assert baked_bytes(forward, x) < 1024  # nothing baked in
    graph.bind(second)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(second, x), rtol=1e-5)
    assert forward.cache_size() == 1


def test_any_accessor_allocating_inside_a_function_gives_the_traced_argument(tmp_path: Path) -> None:
    # small weights (under the constant limit) would otherwise be baked in silently
    first, second = (
        mlp_checkpoint(tmp_path, "a.safetensors", 8, 0),
        mlp_checkpoint(tmp_path, "b.safetensors", 8, 1),
    )
    own = jw.load_weights(first)  # the user's accessor, not graph.weights()
    graph = jw.Graph("mlp", weights=own)

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        h = jax.nn.relu(x @ own.fc1.weight.allocate().T + own.fc1.bias.allocate())
        return h @ own.fc2.weight.allocate().T

    x = np.random.default_rng(3).standard_normal((2, 16), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(first, x), rtol=1e-5)
    assert sorted(graph.declared) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    assert baked_bytes(forward, x) < 1024  # nothing baked in
    graph.bind(second)
    np.testing.assert_allclose(np.asarray(forward(x)), reference(second, x), rtol=1e-5)
    assert forward.cache_size() == 1
    assert own.fc1.weight.allocate().array.shape == (8, 16)  # outside the function it reads as before


@pytest.mark.parametrize("kind", ["jax", "numpy"])
def test_a_closed_over_array_is_an_error_naming_it(tmp_path: Path, kind: str) -> None:
    graph = jw.Graph("mlp", weights=mlp_checkpoint(tmp_path, "m.safetensors", 32, 0))
    table = np.ones((384, 384), np.float32)  # 576 KiB
    baked = jnp.asarray(table) if kind == "jax" else table
    small = np.ones((4, 4), np.float32)

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        return x @ baked + small.sum()

    with pytest.raises(GraphError, match=r"float32\[384, 384\] \(589.8 kB\).*graph\.add_weight") as caught:
        forward(jnp.ones((2, 384)))
    assert isinstance(caught.value, ValueError) and "'forward'" in str(caught.value)
    with pytest.raises(GraphError, match="add_weight"):
        forward.lower(jnp.ones((2, 384)))
    below = jnp.ones((4, 4))
    assert graph.function(lambda x: x @ below)(jnp.ones((1, 4))).shape == (1, 4)  # small: fine


def test_a_weight_read_outside_and_closed_over_is_an_error(tmp_path: Path) -> None:
    path = mlp_checkpoint(tmp_path, "m.safetensors", 4096, 0)  # fc1.weight: 256 KiB
    graph = jw.Graph("mlp", weights=path)
    outside = graph.weights().fc1.weight.allocate()  # a concrete array, read before the function

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        return x @ outside.T

    with pytest.raises(GraphError, match=r"float32\[4096, 16\].*graph\.add_weight"):
        forward(jnp.ones((1, 16)))

    @graph.function
    def fixed(x: jax.Array) -> jax.Array:
        return x @ graph.add_weight(outside).T

    assert fixed(jnp.ones((1, 16))).shape == (1, 4096)


def test_constants_warn_compiles_with_a_warning(tmp_path: Path) -> None:
    graph = jw.Graph("mlp", constants="warn")
    baked = jnp.ones((256, 256))

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        return x @ baked

    with pytest.warns(GraphConstantWarning, match=r"float32\[256, 256\].*graph\.add_weight"):
        assert forward(jnp.ones((1, 256))).shape == (1, 256)
    forward(jnp.ones((1, 256)))  # checked once per signature: no second warning
    with pytest.raises(GraphError, match="constants='loud'"):
        jw.Graph("g", constants="loud")  # type: ignore[arg-type]


def test_cache_size_falls_back_to_the_signatures_traced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = jw.Graph("mlp", weights=mlp_checkpoint(tmp_path, "m.safetensors", 32, 0))
    forward = make_forward(graph)
    forward(jnp.ones((1, 16)))
    forward(jnp.ones((2, 16)))
    forward(jnp.ones((2, 16)))
    assert forward.cache_size() == 2
    monkeypatch.setattr(_compat, "jit_cache_size", lambda jitted: None)
    assert forward.cache_size() == 2


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
    with pytest.raises(GraphError, match=r"allocate\(\) declares it and needs both dtype= and shape="):
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
    with pytest.raises(GraphError, match=r"has no data yet; bind its graph") as no_data:
        _ = w1.array
    assert isinstance(no_data.value, ValueError)

    @graph.function
    def forward(x: jax.Array) -> jax.Array:
        return jax.nn.relu(x @ graph.add_weight(w1).T)

    with pytest.raises(GraphError, match=r"declared weights with no data: fc1.bias, fc1.weight, fc2.weight"):
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
        GraphError, match=r"Weight 'fc1.weight' already exists in graph 'mlp' as float32\[32, 16\]"
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
    graph = jw.Graph("tp", weights=jw.load_weights(path))
    weights = graph.weights()  # inside the function, allocate() gives the traced argument

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
