"""Training runs that stop and resume: the loss trajectory must match an uninterrupted run bit for bit."""

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
    uninterrupted = [float(step(model, optimizer)) for _ in range(STEPS)]

    model, optimizer = fresh(0)
    first = [float(step(model, optimizer)) for _ in range(SPLIT)]
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
    resumed_model = nnx.merge(nnx.graphdef(abstract_model), restored["model"])
    resumed_optimizer = nnx.merge(nnx.graphdef(abstract_optimizer), restored["optimizer"])
    second = [float(step(resumed_model, resumed_optimizer)) for _ in range(STEPS - SPLIT)]
    assert first + second == uninterrupted

    # Modules straight in the target work too, and come back as new modules.
    again = jw.restore(folder, {"model": fresh(2)[0], "optimizer": fresh(2)[1]})
    assert isinstance(again["model"], MLP)
    np.testing.assert_array_equal(
        np.asarray(again["model"].out.kernel[...]), np.asarray(model.out.kernel[...])
    )


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

    _, _, uninterrupted = run(*fresh(0), STEPS)
    model, state, first = run(*fresh(0), SPLIT)
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
    _, _, second = run(restored["model"], restored["opt_state"], STEPS - SPLIT)
    assert first + second == uninterrupted
