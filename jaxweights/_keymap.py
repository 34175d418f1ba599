"""How a target pytree's names map to checkpoint names, and what to do to a tensor on the way in.

`KeyMap` holds regex renames (target name -> checkpoint name) and transforms (target name -> function
applied after loading). `Transpose` is the transform whose effect on shapes and shardings is known
ahead of time, so sharded targets still read only their own blocks. `TORCH_TO_FLAX` is the ready-made map
from PyTorch / Hugging Face names and layouts to Flax ones; `GGUF_TO_HF` maps llama-family Hugging Face
names to GGUF ones, undoing llama.cpp's q/k row order with `UnpermuteHeads`, a transform that takes a
parameter from the checkpoint's metadata (`bind_transform`). Reads no file and keeps no state.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from .errors import ArgumentError, CheckpointError, ShapeMismatchError

__all__ = [
    "GGUF_TO_HF",
    "TORCH_TO_FLAX",
    "KeyMap",
    "TorchKernel",
    "Transpose",
    "UnpermuteHeads",
    "bind_transform",
]


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
class UnpermuteHeads:
    """Undoes llama.cpp's rotary row permutation of a query (``kind="q"``) or key (``"k"``) projection.

    llama.cpp's converter reorders each head's rows from Hugging Face's two rotary halves to interleaved
    pairs (``w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)``, on a weight or a bias); this
    transform reverses that. The head count comes from the checkpoint's metadata when `restore` binds the
    transform (`for_checkpoint`): ``{general.architecture}.attention.head_count`` for queries, and
    ``...head_count_kv`` (grouped-query attention; defaulting to ``head_count``, as llama.cpp does) for
    keys. Pass ``heads`` to set it yourself.

    Example:
        >>> import numpy as np
        >>> hf = np.arange(8)  # 2 heads of 4 rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
        >>> gguf = hf.reshape(2, 2, 2).swapaxes(1, 2).reshape(8)  # what llama.cpp writes
        >>> gguf.tolist(), np.asarray(UnpermuteHeads("q", heads=2)(gguf)).tolist()
        ([0, 2, 1, 3, 4, 6, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7])
        >>> UnpermuteHeads("k").for_checkpoint({"general.architecture": "llama", "llama.attention.head_count": 32,
        ...                                      "llama.attention.head_count_kv": 8})
        UnpermuteHeads(kind='k', heads=8)
    """

    __module__ = "jaxweights"

    kind: Literal["q", "k"] = "q"
    heads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("q", "k"):
            raise ArgumentError(f"UnpermuteHeads kind must be 'q' or 'k', not {self.kind!r}.")
        if self.heads is not None:
            heads = _positive_int(self.heads) if not isinstance(self.heads, str) else None
            if heads is None:
                raise ArgumentError(f"UnpermuteHeads heads must be a positive int, not {self.heads!r}.")
            object.__setattr__(self, "heads", heads)

    def metadata_key(self, metadata: Mapping[str, Any]) -> str:
        """The metadata key holding this kind's head count (``llama.attention.head_count_kv`` for keys)."""
        suffix = ".attention.head_count" + ("_kv" if self.kind == "k" else "")
        architecture = metadata.get("general.architecture")
        if isinstance(architecture, str):
            return architecture + suffix
        found = sorted(key for key in metadata if isinstance(key, str) and key.endswith(suffix))
        return found[0] if len(found) == 1 else "{general.architecture}" + suffix

    def for_checkpoint(self, metadata: Mapping[str, Any]) -> UnpermuteHeads:
        """This transform with the head count read from a checkpoint's metadata (itself when ``heads``
        is set).

        Raises:
            CheckpointError: the metadata holds no usable head count.
        """
        if self.heads is not None:
            return self
        key = self.metadata_key(metadata)
        value = metadata.get(key)
        if value is None and self.kind == "k":  # no grouped-query attention: as many kv heads as heads
            fallback = UnpermuteHeads("q").metadata_key(metadata)
            value = metadata.get(fallback)
            key = key if value is None else fallback
        heads = _positive_int(value)
        if heads is None:
            found = "is missing" if value is None else f"is {value!r}, not a positive integer"
            what = "key/value heads" if self.kind == "k" else "attention heads"
            raise CheckpointError(
                f"UnpermuteHeads({self.kind!r}) needs the number of {what}: the checkpoint metadata "
                f"{key!r} {found}. Pass it yourself: UnpermuteHeads({self.kind!r}, heads=N)."
            )
        return dataclasses.replace(self, heads=heads)

    def __call__(self, value: Any) -> Any:
        if self.heads is None:
            raise ArgumentError(
                f"UnpermuteHeads({self.kind!r}) has no head count yet: restore reads it from the "
                f"checkpoint's metadata (for_checkpoint), or pass heads=N."
            )
        rows = value.shape[0]
        if rows % (2 * self.heads):
            raise ShapeMismatchError(
                f"UnpermuteHeads({self.kind!r}, heads={self.heads}): {rows} rows do not split into "
                f"{self.heads} heads of an even size. Check the head count (heads=N) or the transform's "
                f"pattern."
            )
        rest = tuple(value.shape[1:])
        split = value.reshape(self.heads, rows // self.heads // 2, 2, *rest)
        return split.swapaxes(1, 2).reshape(value.shape)


def _positive_int(value: Any) -> int | None:
    """A head count from metadata: an integer, or a string of digits (safetensors metadata is text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 18):  # not "²", not 5000 digits
            return None
        value = int(text)
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number > 0 else None


def bind_transform(transform: Transform, metadata: Mapping[str, Any]) -> Transform:
    """``transform`` made ready for one checkpoint: a transform with a ``for_checkpoint(metadata)`` method
    (`UnpermuteHeads`) returns the transform to apply; any other is used as it is.

    Example:
        >>> bind_transform(UnpermuteHeads("q"), {"general.architecture": "llama",
        ...                                      "llama.attention.head_count": "32"})
        UnpermuteHeads(kind='q', heads=32)
        >>> bind_transform(Transpose(), {})
        Transpose(axes=None)
    """
    bind = getattr(transform, "for_checkpoint", None)
    return bind(metadata) if callable(bind) else transform


@dataclass(frozen=True)
class KeyMap:
    """Renames and transforms from a target's names to a checkpoint's.

    Attributes:
        renames: ``(regex, replacement)`` pairs applied in order with `re.sub` to each target name; the
            result is the checkpoint name.
        transforms: ``(regex, function)`` pairs matched with `re.search` against the *target* name; the
            first match's function is applied to the loaded tensor. `Transpose` (and `TorchKernel`) keep
            sharded reads per-block; other functions are traced once to learn the resulting shape. A
            transform with a ``for_checkpoint(metadata)`` method (`UnpermuteHeads`) is first bound to
            the checkpoint's metadata (`bind_transform`).

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


_HF_LAYER = r"^model\.layers\.(\d+)\."
_GGUF_LAYER = r"blk.\1."

GGUF_TO_HF = KeyMap(
    renames=(
        (r"^model\.embed_tokens\.", "token_embd."),
        (r"^model\.norm\.", "output_norm."),
        (r"^lm_head\.", "output."),
        *(
            (_HF_LAYER + hf + r"\.", _GGUF_LAYER + gguf + ".")
            for hf, gguf in (
                (r"self_attn\.q_proj", "attn_q"),
                (r"self_attn\.k_proj", "attn_k"),
                (r"self_attn\.v_proj", "attn_v"),
                (r"self_attn\.o_proj", "attn_output"),
                (r"mlp\.gate_proj", "ffn_gate"),
                (r"mlp\.up_proj", "ffn_up"),
                (r"mlp\.down_proj", "ffn_down"),
                (r"input_layernorm", "attn_norm"),
                (r"post_attention_layernorm", "ffn_norm"),
            )
        ),
    ),
    transforms=(
        (_HF_LAYER + r"self_attn\.q_proj\.", UnpermuteHeads("q")),
        (_HF_LAYER + r"self_attn\.k_proj\.", UnpermuteHeads("k")),
    ),
)
"""Hugging Face llama-family names (Llama, Mistral, Qwen2 and the like, PyTorch layout) read from a GGUF
checkpoint's names: ``model.embed_tokens`` <- ``token_embd``, ``model.norm`` <- ``output_norm``,
``lm_head`` <- ``output``, and per layer ``self_attn.{q,k,v,o}_proj`` <- ``attn_{q,k,v,output}``,
``mlp.{gate,up,down}_proj`` <- ``ffn_{gate,up,down}``, ``input_layernorm`` <- ``attn_norm``,
``post_attention_layernorm`` <- ``ffn_norm`` (weights and biases). Query and key projections get
`UnpermuteHeads`, with head counts from the checkpoint's metadata (grouped-query attention included).
"""
