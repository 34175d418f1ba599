"""Layer-by-layer streaming: place one numbered child of an accessor, hand it out, release it, go on.

`stream_layers` is for models larger than memory: only one layer's arrays (and, for a memory-mapped
checkpoint, one layer's file pages) are held at a time. Releasing is explicit because nothing else
would do it: the tree's `allocated_weights` keeps a reference to every array placed through it, and the
arrays of 64-byte aligned tensors on CPU alias the file's pages, which stay mapped into the process
after the arrays are gone. It never parses bytes and never plans reads: it calls `Weights.to_pytree`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax

from ._devices import DeviceRef, Placement
from ._dtypes import DTypeLike
from .errors import ArgumentError
from .formats import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ._rules import Rules
    from ._weights import Weights

__all__ = ["stream_layers"]


def stream_layers(
    layers: Weights,
    *,
    device: Placement = DeviceRef.CPU(),  # noqa: B008 - an immutable default
    dtype: DTypeLike | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yields ``(number, pytree)`` for each numbered child of ``layers``, in natural order, placing one
    child at a time and releasing it when the loop moves on.

    Each pytree is the child's `Weights.to_pytree` (``device``, ``dtype``, ``mesh`` and ``rules`` as
    there). When the loop advances, and when it ends or breaks, every array of the previous pytree is
    deleted (`jax.Array.delete`, which frees its buffer whatever still refers to it) and the file
    pages behind its tensors are released (`Checkpoint.release`; a no-op under ``mmap=False``). So the
    process holds about one layer, plus what the loop body keeps of its own: results computed from a
    layer are new arrays and stay valid, but an array of the pytree kept past its iteration is deleted
    (using it raises ``RuntimeError: Array has been deleted``). Copy what must outlive the iteration
    (``jax.tree.map(jnp.copy, pytree)``). The arrays also stay listed, deleted, in `allocated_weights`.

    A loop left with ``break`` releases its last layer when the generator is closed: at once when the
    ``for`` statement held the only reference, else on ``close()`` (``contextlib.closing``).

    Args:
        layers: an accessor whose children are numbered (``weights.model.layers``).
        device: the placement of every tensor when no mesh is given.
        dtype: converts the floating-point tensors (the `allocate_all` dtype rule).
        mesh: the mesh that ``rules`` refer to.
        rules: sharding rules, as for `Weights.allocate_all`.

    Raises:
        ArgumentError: a child of ``layers`` is not numbered.
        WeightNotFoundError: nothing lives under ``layers``.

    Example:
        >>> import tempfile, numpy as np, jax.numpy as jnp, jaxweights as jw
        >>> from jaxweights._stream import stream_layers
        >>> path = jw.save_file(
        ...     {f"layers.{i}.w": np.full((2, 2), i + 1, np.float32) for i in range(3)},
        ...     f"{tempfile.mkdtemp()}/m.safetensors",
        ... )
        >>> weights = jw.load_weights(path)
        >>> x, kept = jnp.ones(2), []
        >>> for number, layer in stream_layers(weights.layers):
        ...     x = x @ layer["w"]
        ...     kept.append(layer["w"])
        >>> x.tolist(), [w.is_deleted() for w in kept]
        ([48.0, 48.0], [True, True, True])
    """
    children = list(layers)
    if not children:
        info = layers.info  # raises WeightNotFoundError, with close matches, when nothing is there
        raise ArgumentError(
            f"stream_layers streams the numbered children of an accessor, but {info.name!r} is a tensor; "
            f"pass the accessor that holds the layers (weights.model.layers).",
            tensor=info.name,
        )
    numbers = []
    for child in children:
        segment = child.name.rsplit(".", 1)[-1]
        if not (segment.isascii() and segment.isdigit()):
            raise ArgumentError(
                f"stream_layers streams numbered children, but {layers.name or 'the root'!r} has "
                f"{child.name!r}; pass the accessor that holds the layers (weights.model.layers), or "
                f"iterate it yourself (docs/streaming.md shows the loop).",
                tensor=child.name,
            )
        numbers.append(int(segment))
    checkpoint = layers.checkpoint
    for number, child in zip(numbers, children, strict=True):
        tree = child.to_pytree(device=device, dtype=dtype, mesh=mesh, rules=rules, progress=False)
        arrays = jax.tree.leaves(tree)  # taken before the body can rebind or empty the pytree
        infos = [accessor.info for _, accessor in child.items()]
        try:
            yield number, tree
        finally:
            del tree
            _release(checkpoint, infos, arrays)


def _release(checkpoint: Checkpoint, infos: list[TensorInfo], arrays: list[Any]) -> None:
    """Deletes ``arrays`` (those not deleted yet), then releases the file pages of ``infos``."""
    for array in arrays:
        if isinstance(array, jax.Array) and not array.is_deleted():
            array.delete()
    for info in infos:
        checkpoint.release(info)
