"""A Flax NNX + optax training loop that checkpoints every step with `jaxweights.CheckpointManager`, then
"restarts": a fresh model and optimizer resume from the latest step, as after a crash or a preemption.

    python examples/train_flax.py /tmp/flax-run

Each step is a plain safetensors folder (``/tmp/flax-run/<step>/model.safetensors``).
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxweights as jw


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(x).sum(axis=1, keepdims=True))


def fresh(seed: int = 0) -> tuple[MLP, nnx.Optimizer[MLP]]:
    """A new model and optimizer: what a restarted process builds before restoring."""
    model = MLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer[MLP], x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model: MLP) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return jnp.asarray(loss)


def train(directory: str, steps: int) -> list[float]:
    """Trains ``steps`` steps, resuming from the latest checkpoint in ``directory`` if there is one."""
    x, y = data()
    model, optimizer = fresh()
    losses = []
    with jw.CheckpointManager(directory, max_to_keep=3) as manager:
        start = 0
        if manager.latest_step() is not None:  # a restart: resume where the last durable step left off
            start = manager.latest_step() or 0
            restored = manager.restore({"model": model, "optimizer": optimizer}, step=start)
            model, optimizer = restored["model"], restored["optimizer"]
        for step in range(start + 1, start + steps + 1):
            losses.append(float(train_step(model, optimizer, x, y)))
            manager.save(step, {"model": model, "optimizer": optimizer})  # returns at once
    return losses


def main(directory: str) -> dict[str, Any]:
    first = train(directory, steps=5)  # "killed" after step 5
    resumed = train(directory, steps=5)  # a new process: fresh model and optimizer, restored
    return {"first": first, "resumed": resumed, "steps": jw.CheckpointManager(directory).all_steps()}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    print(f"losses before the restart: {[round(v, 4) for v in result['first']]}")
    print(f"losses after the restart:  {[round(v, 4) for v in result['resumed']]}")
    print(f"steps kept: {result['steps']}")
