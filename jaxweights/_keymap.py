"""How a target pytree's names map to checkpoint names, and what to do to a tensor on the way in.

`KeyMap` holds regex renames (target name -> checkpoint name) and transforms (target name -> function
applied after loading). `Transpose` is the transform whose effect on shapes and shardings is known
ahead of time, so sharded targets still read only their own blocks; `Concat` and `Split` choose which
checkpoint tensors (or part of one) fill a target, so a fused ``qkv`` target reads each device's rows of
``q_proj``, ``k_proj`` and ``v_proj`` and nothing else. `TORCH_TO_FLAX` is the ready-made map
from PyTorch / Hugging Face names and layouts to Flax ones; `GGUF_TO_HF` maps llama-family Hugging Face
names to GGUF ones, undoing llama.cpp's q/k row order with `UnpermuteHeads`, a transform that takes a
parameter from the checkpoint's metadata (`bind_transform`). Reads no file and keeps no state.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from .errors import ArgumentError, CheckpointError, ShapeMismatchError

__all__ = [
    "GGUF_TO_HF",
    "TORCH_TO_FLAX",
    "Concat",
    "KeyMap",
    "Source",
    "Split",
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
        """The axis order for a tensor of ``ndim`` dimensions.

        Example:
            >>> Transpose().permutation(3), Transpose((1, 0, 2)).permutation(3)
            ((2, 1, 0), (1, 0, 2))
        """
        return tuple(range(ndim))[::-1] if self.axes is None else self.axes

    def __call__(self, value: Any) -> Any:
        if isinstance(value, tuple):  # a shape
            return tuple(value[axis] for axis in self.permutation(len(value)))
        return jnp.transpose(value, self.permutation(value.ndim))

    def source_sharding(self, target: Sharding, ndim: int) -> Sharding:
        """The sharding to load the untransposed tensor with, so that transposing it gives ``target``
        without moving data between devices.

        Example:
            >>> import jax
            >>> from jax.sharding import NamedSharding, PartitionSpec as P
            >>> mesh = jax.make_mesh((1,), ("x",))
            >>> Transpose().source_sharding(NamedSharding(mesh, P("x", None)), 2).spec == P(None, "x")
            True
        """
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
    (k, in, out); Conv2d (out, in, h, w) -> (h, w, in, out); Conv3d likewise.

    Example:
        >>> TorchKernel()((8, 4)), TorchKernel()((16, 3, 5, 5))  # Linear (out, in); Conv2d (out, in, h, w)
        ((4, 8), (5, 5, 3, 16))
    """

    __module__ = "jaxweights"

    def permutation(self, ndim: int) -> tuple[int, ...]:
        """The axis order for a tensor of ``ndim`` dimensions: reversed up to 2-D, else (spatial..., in, out).

        Example:
            >>> TorchKernel().permutation(2), TorchKernel().permutation(4)
            ((1, 0), (2, 3, 1, 0))
        """
        if ndim <= 2:
            return tuple(range(ndim))[::-1]
        return (*range(2, ndim), 1, 0)


Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class Concat:
    """Fills one target from several checkpoint tensors concatenated along ``axis`` (a fused ``qkv``
    projection from ``q_proj``, ``k_proj`` and ``v_proj``).

    Used as a `KeyMap` transform: the part of the target name that the transform's pattern matches is
    replaced by each of ``parts`` in turn (then the keymap's renames apply), naming the tensors to join.
    ``axis`` counts in the checkpoint's layout, before any other transform of the same name (a
    `TorchKernel` transposes the fused tensor afterwards). Each device reads only the rows of each part
    that its block of the target holds; a ``cast`` converts in the same pass.

    Example:
        >>> keymap = KeyMap(transforms=((r"qkv_proj", Concat(["q_proj", "k_proj", "v_proj"])),))
        >>> keymap.sources("layers.0.attn.qkv_proj.weight")
        ['layers.0.attn.q_proj.weight', 'layers.0.attn.k_proj.weight', 'layers.0.attn.v_proj.weight']
    """

    __module__ = "jaxweights"

    parts: Sequence[str]
    axis: int = 0

    def __post_init__(self) -> None:
        parts = (self.parts,) if isinstance(self.parts, str) else tuple(self.parts)
        if not parts or not all(isinstance(part, str) for part in parts):
            raise ArgumentError(
                f"Concat needs a list of replacement strings naming the parts, e.g. "
                f"Concat(['q_proj', 'k_proj', 'v_proj']); found {self.parts!r}."
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ArgumentError(f"Concat axis must be an int, not {self.axis!r}.")
        object.__setattr__(self, "parts", parts)


@dataclass(frozen=True)
class Split:
    r"""Fills a target from one part of a checkpoint tensor split along ``axis`` (GPT-2's fused
    ``c_attn`` into query, key and value).

    Used as a `KeyMap` transform: the part of the target name that the transform's pattern matches is
    replaced by ``source`` (then the keymap's renames apply), naming the fused tensor; the target gets
    part ``index`` of ``sections`` (equal parts when an int, else the sizes of the parts, in order).
    ``axis`` counts in the checkpoint's layout and defaults to the last one, which fits both a weight and
    its bias. Each device reads only its rows of that part.

    Example:
        >>> keymap = KeyMap(transforms=((r"attn\.k\b", Split("attn.c_attn", index=1, sections=3)),))
        >>> keymap.sources("h.0.attn.k.weight"), Split("c_attn", 2, sections=(4, 4, 2)).bounds(10)
        (['h.0.attn.c_attn.weight'], (8, 10))
    """

    __module__ = "jaxweights"

    source: str
    index: int
    sections: int | Sequence[int] = 3
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise ArgumentError(f"Split source must be a replacement string, not {self.source!r}.")
        sections: int | tuple[int, ...]
        if isinstance(self.sections, int) and not isinstance(self.sections, bool):
            sections, count = self.sections, self.sections
        elif isinstance(self.sections, bool) or not isinstance(self.sections, Sequence):
            raise ArgumentError(f"Split sections must be an int or sizes (ints >= 0), not {self.sections!r}.")
        else:
            sections = tuple(self.sections)
            count = len(sections)
            if not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sections
            ):
                raise ArgumentError(
                    f"Split sections must be an int or sizes (ints >= 0), not {self.sections!r}."
                )
        if count < 1:
            raise ArgumentError(f"Split needs at least one section, not {self.sections!r}.")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < count:
            raise ArgumentError(f"Split index must be an int in 0..{count - 1}, not {self.index!r}.")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ArgumentError(f"Split axis must be an int, not {self.axis!r}.")
        object.__setattr__(self, "sections", sections)

    def bounds(self, length: int) -> tuple[int, int]:
        """``(start, stop)`` of this part along an axis of ``length``.

        Raises:
            ShapeMismatchError: the sections do not divide (or sum to) ``length``.

        Example:
            >>> Split("c_attn", index=1, sections=3).bounds(12), Split("c_attn", 2, (4, 4, 2)).bounds(10)
            ((4, 8), (8, 10))
        """
        from ._compose import split_bounds

        return split_bounds(length, self.sections)[self.index]


Source = Concat | Split
"""A `KeyMap` transform that chooses the checkpoint tensors filling a target."""


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
        """The metadata key holding this kind's head count (``llama.attention.head_count_kv`` for keys).

        Example:
            >>> metadata = {"general.architecture": "llama"}
            >>> UnpermuteHeads("q").metadata_key(metadata), UnpermuteHeads("k").metadata_key(metadata)
            ('llama.attention.head_count', 'llama.attention.head_count_kv')
        """
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

        Example:
            >>> metadata = {"general.architecture": "llama", "llama.attention.head_count": 32}
            >>> UnpermuteHeads("q").for_checkpoint(metadata), UnpermuteHeads("k").for_checkpoint(metadata)
            (UnpermuteHeads(kind='q', heads=32), UnpermuteHeads(kind='k', heads=32))
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
            the checkpoint's metadata (`bind_transform`). `Concat` and `Split` entries are matched
            separately (the first matching one chooses the tensors, `sources`), so a name can have
            both one of them and a function (a fused kernel concatenated, then transposed).

    Example:
        >>> keymap = KeyMap(renames=((r"^model\\.", ""), (r"\\.kernel$", ".weight")))
        >>> keymap.checkpoint_name("model.encoder.kernel")
        'encoder.weight'
        >>> (keymap + TORCH_TO_FLAX).transform_for("dense.kernel")
        TorchKernel(axes=None)
    """

    __module__ = "jaxweights"

    renames: tuple[tuple[str, str], ...] = ()
    transforms: tuple[tuple[str, Transform | Source], ...] = ()
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.renames))

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.renames + other.renames, self.transforms + other.transforms)

    def checkpoint_name(self, name: str) -> str:
        r"""The checkpoint name a target name reads from.

        Example:
            >>> keymap = KeyMap(renames=((r"\.kernel$", ".weight"),))
            >>> keymap.checkpoint_name("dense.kernel"), keymap.checkpoint_name("dense.bias")
            ('dense.weight', 'dense.bias')
        """
        for pattern, replacement in self._compiled:
            name = pattern.sub(replacement, name)
        return name

    def transform_for(self, name: str) -> Transform | None:
        r"""The function applied to a target name's tensor after loading, if any (`Concat` and `Split`
        entries excluded: see `source_for`).

        Example:
            >>> keymap = KeyMap(transforms=((r"\.kernel$", Transpose()),))
            >>> keymap.transform_for("dense.kernel"), keymap.transform_for("dense.bias")
            (Transpose(axes=None), None)
        """
        for pattern, function in self.transforms:
            if not isinstance(function, (Concat, Split)) and re.search(pattern, name):
                return function
        return None

    def source_for(self, name: str) -> tuple[str, Source] | None:
        """The first `Concat` or `Split` whose pattern matches a target name, with that pattern.

        Example:
            >>> split = Split("attn.c_attn", index=1, sections=3)
            >>> keymap = KeyMap(transforms=(("attn[.]k[.]", split),))
            >>> keymap.source_for("h.0.attn.k.weight") == ("attn[.]k[.]", split)
            True
            >>> keymap.source_for("h.0.mlp.weight") is None
            True
        """
        for pattern, function in self.transforms:
            if isinstance(function, (Concat, Split)) and re.search(pattern, name):
                return pattern, function
        return None

    def sources(self, name: str) -> list[str]:
        r"""The checkpoint names a target name reads: one, or the parts of a `Concat`.

        Example:
            >>> keymap = KeyMap(renames=((r"^model\.", ""),))
            >>> keymap.sources("model.encoder.weight")
            ['encoder.weight']
        """
        found = self.source_for(name)
        if found is None:
            return [self.checkpoint_name(name)]
        pattern, source = found
        replacements = source.parts if isinstance(source, Concat) else (source.source,)
        return [self.checkpoint_name(re.sub(pattern, part, name)) for part in replacements]


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
