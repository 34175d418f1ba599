"""An Equinox + optax training loop that checkpoints every step with `jaxweights.CheckpointManager`, then
"restarts": a fresh model and optimizer state resume from the latest step, as after a crash.

    python examples/train_equinox.py /tmp/eqx-run

The arrays of the model (``eqx.filter(model, eqx.is_array)``), the optax state and the step counter are
saved; activation functions and other static fields stay in the code.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxweights as jw

optimizer = optax.adam(1e-2)


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(x).sum(axis=1, keepdims=True))


def fresh(seed: int = 0) -> tuple[eqx.nn.MLP, optax.OptState]:
    """A new model and optimizer state: what a restarted process builds before restoring."""
    model = eqx.nn.MLP(8, 1, width_size=32, depth=1, key=jax.random.PRNGKey(seed))
    return model, optimizer.init(eqx.filter(model, eqx.is_array))


@eqx.filter_jit
def train_step(
    model: eqx.nn.MLP, opt_state: optax.OptState, x: jax.Array, y: jax.Array
) -> tuple[eqx.nn.MLP, optax.OptState, jax.Array]:
    def loss_fn(model: eqx.nn.MLP) -> jax.Array:
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def train(directory: str, steps: int) -> list[float]:
    """Trains ``steps`` steps, resuming from the latest checkpoint in ``directory`` if there is one."""
    x, y = data()
    model, opt_state = fresh()
    losses = []
    with jw.CheckpointManager(directory, max_to_keep=3) as manager:
        start = 0
        if manager.latest_step() is not None:  # a restart: resume where the last durable step left off
            start = manager.latest_step() or 0
            target = {"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state, "step": 0}
            restored = manager.restore(target, step=start)
            model = eqx.combine(restored["model"], model)
            opt_state = restored["opt_state"]
        for step in range(start + 1, start + steps + 1):
            model, opt_state, loss = train_step(model, opt_state, x, y)
            losses.append(float(loss))
            state = {"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state, "step": step}
            manager.save(step, state)  # returns at once; the write runs in the background
    return losses


def main(directory: str) -> dict[str, Any]:
    first = train(directory, steps=5)  # "killed" after step 5
    resumed = train(directory, steps=5)  # a new process: fresh model and optimizer state, restored
    return {"first": first, "resumed": resumed, "steps": jw.CheckpointManager(directory).all_steps()}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    print(f"losses before the restart: {[round(v, 4) for v in result['first']]}")
    print(f"losses after the restart:  {[round(v, 4) for v in result['resumed']]}")
    print(f"steps kept: {result['steps']}")
