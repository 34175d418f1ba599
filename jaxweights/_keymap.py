"""How a target pytree's names map to checkpoint names, and what to do to a tensor on the way in.

`KeyMap` holds regex renames (target name -> checkpoint name) and transforms (target name -> function
applied after loading). `Transpose` is the transform whose effect on shapes and shardings is known
ahead of time, so sharded targets still read only their own blocks. `TORCH_TO_FLAX` is the ready-made map
from PyTorch / Hugging Face names and layouts to Flax ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

__all__ = ["TORCH_TO_FLAX", "KeyMap", "TorchKernel", "Transpose"]


@dataclass(frozen=True)
class Transpose:
    """Permutes a tensor's axes after loading (``axes=None`` reverses them, as ``.T`` does).

    Example:
        >>> Transpose()((2, 3, 4)), Transpose((1, 0, 2))((2, 3, 4))
        ((4, 3, 2), (3, 2, 4))
    """

    __module__ = "jaxweights"

    axes: tuple[int, ...] | None = None

    def permutation(self, ndim: int) -> tuple[int, ...]:
        """The axis order for a tensor of ``ndim`` dimensions."""
        return tuple(range(ndim))[::-1] if self.axes is None else self.axes

    def __call__(self, value: Any) -> Any:
        if isinstance(value, tuple):  # a shape
            return tuple(value[axis] for axis in self.permutation(len(value)))
        return jnp.transpose(value, self.permutation(value.ndim))

    def source_sharding(self, target: Sharding, ndim: int) -> Sharding:
        """The sharding to load the untransposed tensor with, so that transposing it gives ``target``
        without moving data between devices."""
        if not isinstance(target, NamedSharding):
            return target
        spec = tuple(target.spec) + (None,) * (ndim - len(target.spec))
        order = self.permutation(ndim)
        source: list[Any] = [None] * ndim
        for position, axis in enumerate(order):
            source[axis] = spec[position]
        return NamedSharding(target.mesh, PartitionSpec(*source))


@dataclass(frozen=True)
class TorchKernel(Transpose):
    """PyTorch weight layout to Flax kernel layout: Linear (out, in) -> (in, out); Conv1d (out, in, k) ->
    (k, in, out); Conv2d (out, in, h, w) -> (h, w, in, out); Conv3d likewise."""

    __module__ = "jaxweights"

    def permutation(self, ndim: int) -> tuple[int, ...]:
        if ndim <= 2:
            return tuple(range(ndim))[::-1]
        return (*range(2, ndim), 1, 0)


Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class KeyMap:
    """Renames and transforms from a target's names to a checkpoint's.

    Attributes:
        renames: ``(regex, replacement)`` pairs applied in order with `re.sub` to each target name; the
            result is the checkpoint name.
        transforms: ``(regex, function)`` pairs matched with `re.search` against the *target* name; the
            first match's function is applied to the loaded tensor. `Transpose` (and `TorchKernel`) keep
            sharded reads per-block; other functions are traced once to learn the resulting shape.

    Example:
        >>> keymap = KeyMap(renames=((r"^model\\.", ""), (r"\\.kernel$", ".weight")))
        >>> keymap.checkpoint_name("model.encoder.kernel")
        'encoder.weight'
        >>> (keymap + TORCH_TO_FLAX).transform_for("dense.kernel")
        TorchKernel(axes=None)
    """

    __module__ = "jaxweights"

    renames: tuple[tuple[str, str], ...] = ()
    transforms: tuple[tuple[str, Transform], ...] = ()
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.renames))

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.renames + other.renames, self.transforms + other.transforms)

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint name a target name reads from."""
        for pattern, replacement in self._compiled:
            name = pattern.sub(replacement, name)
        return name

    def transform_for(self, name: str) -> Transform | None:
        """The transform for a target name, if any."""
        for pattern, function in self.transforms:
            if re.search(pattern, name):
                return function
        return None


def transformed_shape(
    transform: Transform, shape: tuple[int, ...], dtype: Any
) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype after ``transform``, without reading data."""
    if isinstance(transform, Transpose):
        return transform(shape), dtype
    result = jax.eval_shape(transform, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(result.shape), result.dtype


TORCH_TO_FLAX = KeyMap(
    renames=((r"\.kernel$", ".weight"), (r"\.scale$", ".weight"), (r"\.embedding$", ".weight")),
    transforms=((r"\.kernel$", TorchKernel()),),
)
"""Flax names and layouts read from a PyTorch / Hugging Face checkpoint: ``kernel`` <- ``weight``
transposed (`TorchKernel`), LayerNorm ``scale`` <- ``weight``, Embed ``embedding`` <- ``weight``; biases
keep their names."""
