"""Training runs that stop and resume: the checkpoint gives back the saved state bit for bit, and the
resumed run follows an uninterrupted run bit for bit.

Bit equality of losses only holds between runs of the *same* compiled program: XLA compiles a step for
one device differently from the same step replicated over two, so their floats may differ in the last
digits on some CPUs. Each resumed run is therefore compared with an uninterrupted run that was moved to
the resumed run's layout (``jax.device_put`` onto the same sharding) at the checkpoint step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxweights as jw

STEPS, SPLIT = 10, 4


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(x).sum(axis=1, keepdims=True))


def assert_bit_identical(got: Any, want: Any) -> None:
    """Same tree paths; every array leaf equal bit for bit on the host (dtype, shape, bytes); others ``==``."""
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in got_leaves] == [
        jax.tree_util.keystr(p) for p, _ in want_leaves
    ]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        if isinstance(b, jax.Array | np.ndarray):
            assert isinstance(a, jax.Array | np.ndarray), name
            host_a, host_b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
            assert (host_a.dtype, host_a.shape) == (host_b.dtype, host_b.shape), name
            assert np.array_equal(host_a, host_b) and host_a.tobytes() == host_b.tobytes(), name
        else:
            assert a == b, name


def assert_same_placement(got: Any, want: Any) -> None:
    """Every array leaf has the same sharding: a jitted step over either runs the same compiled program."""
    got_arrays = [a for a in jax.tree.leaves(got) if isinstance(a, jax.Array)]
    want_arrays = [a for a in jax.tree.leaves(want) if isinstance(a, jax.Array)]
    assert got_arrays and len(got_arrays) == len(want_arrays)
    for a, b in zip(got_arrays, want_arrays, strict=True):
        assert a.sharding == b.sharding and a.committed == b.committed


def test_flax_nnx_with_optax_resumes_bit_identically(tmp_path: Path) -> None:
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.hidden = nnx.Linear(8, 32, rngs=rngs)
            self.out = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.out(jax.nn.gelu(self.hidden(x)))

    tx = optax.adamw(3e-3)
    x, y = data()

    @nnx.jit
    def step(model: MLP, optimizer: nnx.Optimizer[MLP]) -> jax.Array:
        def loss_fn(m: MLP) -> jax.Array:
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss  # type: ignore[no-any-return]

    def fresh(seed: int) -> tuple[MLP, nnx.Optimizer[MLP]]:
        model = MLP(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = fresh(0)
    for _ in range(SPLIT):
        step(model, optimizer)
    saved = jax.device_get({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    folder = jw.save({"model": model, "optimizer": optimizer}, tmp_path / "ckpt")

    # Resume into freshly initialised *abstract* structures, replicated over a 2x4 mesh.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    abstract_model = nnx.eval_shape(lambda: fresh(1)[0])
    abstract_optimizer = nnx.eval_shape(lambda: fresh(1)[1])
    replicate = NamedSharding(mesh, P())
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicate),
        {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)},
    )
    restored = jw.restore(folder, target)
    assert_bit_identical(restored, saved)

    # The uninterrupted run, moved to the same layout at the same step, without a checkpoint in between.
    placed = jax.device_put({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, replicate)
    assert_same_placement(restored, placed)
    runs = []
    for state in (restored, placed):
        resumed_model = nnx.merge(nnx.graphdef(abstract_model), state["model"])
        resumed_optimizer = nnx.merge(nnx.graphdef(abstract_optimizer), state["optimizer"])
        losses = [float(step(resumed_model, resumed_optimizer)) for _ in range(STEPS - SPLIT)]
        runs.append((losses, {"model": nnx.state(resumed_model), "optimizer": nnx.state(resumed_optimizer)}))
    (resumed_losses, resumed_end), (uninterrupted_losses, uninterrupted_end) = runs
    assert resumed_losses == uninterrupted_losses
    assert resumed_losses[-1] < resumed_losses[0]  # it trains: the steps did run on the restored state
    assert_bit_identical(resumed_end, uninterrupted_end)

    # Modules straight in the target work too, and come back as new modules.
    again = jw.restore(folder, {"model": fresh(2)[0], "optimizer": fresh(2)[1]})
    assert isinstance(again["model"], MLP) and again["model"] is not model
    assert_bit_identical({k: nnx.state(v) for k, v in again.items()}, saved)


def test_equinox_with_optax_resumes_bit_identically(tmp_path: Path) -> None:
    import equinox as eqx

    tx = optax.adam(1e-2)
    x, y = data()

    def fresh(seed: int) -> tuple[Any, Any]:
        model = eqx.nn.MLP(8, 1, 32, 2, key=jax.random.PRNGKey(seed))
        return model, tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model: Any, state: Any) -> tuple[Any, Any, jax.Array]:
        def loss_fn(m: Any) -> jax.Array:
            return jnp.mean((jax.vmap(m)(x) - y) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    def run(model: Any, state: Any, count: int) -> tuple[Any, Any, list[float]]:
        losses = []
        for _ in range(count):
            model, state, loss = step(model, state)
            losses.append(float(loss))
        return model, state, losses

    model, state, _ = run(*fresh(0), SPLIT)
    saved = jax.device_get({"model": model, "opt_state": state, "step": SPLIT})
    folder = jw.save({"model": model, "opt_state": state, "step": SPLIT}, tmp_path / "ckpt")

    # Restore onto 2 devices (the run above used the default device of an 8-device process).
    two = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("x",)), P())
    skeleton = eqx.filter_eval_shape(fresh, 1)
    target = jax.tree.map(
        lambda s: (
            jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=two) if isinstance(s, jax.ShapeDtypeStruct) else s
        ),
        {"model": skeleton[0], "opt_state": skeleton[1], "step": 0},
    )
    restored = jw.restore(folder, target)
    assert restored["step"] == SPLIT
    assert len(restored["model"].layers[0].weight.sharding.device_set) == 2
    assert_bit_identical(restored, saved)

    # The uninterrupted run, moved onto the same 2 devices at the same step.
    placed = jax.tree.map(lambda a: jax.device_put(a, two) if eqx.is_array(a) else a, (model, state))
    assert_same_placement((restored["model"], restored["opt_state"]), placed)
    resumed_model, resumed_state, resumed = run(restored["model"], restored["opt_state"], STEPS - SPLIT)
    uninterrupted_model, uninterrupted_state, uninterrupted = run(placed[0], placed[1], STEPS - SPLIT)
    assert resumed == uninterrupted
    assert resumed[-1] < resumed[0]  # it trains: the steps did run on the restored state
    assert_bit_identical((resumed_model, resumed_state), (uninterrupted_model, uninterrupted_state))
