"""The plug-in surface every format module registers in `jaxweights.formats.FORMATS`: `FormatPlugin`
(recognise its magic bytes, list its files in a folder, open them, optionally write), with `FormatWriter`,
`TensorSpec` and `spec_of` for the writing side. Pure data and signatures; no I/O, never imports jax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from .._dtypes import DType
from .._shapes import element_count
from ..errors import UnsupportedFormatError
from ._checkpoint import Checkpoint, WeightsFormat

__all__ = ["FormatPlugin", "FormatWriter", "TensorSpec", "WriteTensor", "spec_of"]


class TensorSpec(NamedTuple):
    """A tensor to write: its name, dtype and shape (the bytes come later, from a `WriteTensor`)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in a file (float4 packs two elements per byte)."""
        return element_count(self.shape) * self.dtype.size_in_bits // 8


WriteTensor = Callable[[TensorSpec, BinaryIO], None]
"""Writes exactly ``spec.nbytes`` bytes of one tensor at the file's current position."""


def spec_of(name: str, value: Any) -> TensorSpec:
    """The spec of an array-like, read from its ``shape``/``dtype`` without converting it.

    Example:
        >>> import numpy as np
        >>> spec_of("w", np.zeros((2, 3), np.float16))
        TensorSpec(name='w', dtype=<DType.float16>, shape=(2, 3))
    """
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        value = np.asarray(value)
        shape, dtype = value.shape, value.dtype
    return TensorSpec(
        name, dtype if isinstance(dtype, DType) else DType.from_numpy(dtype), tuple(int(d) for d in shape)
    )


@dataclass(frozen=True)
class FormatWriter:
    """How a format writes checkpoints; everything `jaxweights.save` needs from it, named once.

    Attributes:
        write_file: ``(path, specs, write, metadata) -> path``: one file, atomically (temporary sibling,
            fsync, rename), calling ``write`` once per tensor in `write_order`.
        write_folder: ``(folder, specs, write, metadata, max_shard_size) -> files``: one file or shards
            plus an index into an existing (temporary) folder, every file fsynced.
        write_order: ``(specs, max_shard_size) -> specs``: the order ``write`` is called in by
            ``write_folder`` (by ``write_file`` when ``max_shard_size`` is None), so the other
            processes of a job can take part in process 0's gathers in step.
        write_array: ``(out, value)``: one whole array's bytes at ``out``'s position (a `WriteTensor`'s
            usual body).
        write_at: ``(out, data, position)``: uint8 ``data`` at an absolute ``position`` of ``out``, leaving
            its current position alone (for blocks of a sharded array written in place).
    """

    write_file: Callable[[Path, Sequence[TensorSpec], WriteTensor, Mapping[str, str] | None], Path]
    write_folder: Callable[
        [Path, Sequence[TensorSpec], WriteTensor, Mapping[str, str] | None, int], list[Path]
    ]
    write_order: Callable[[Sequence[TensorSpec], int | None], list[TensorSpec]]
    write_array: Callable[[BinaryIO, Any], None]
    write_at: Callable[[BinaryIO, np.ndarray, int], None]


@dataclass(frozen=True)
class FormatPlugin:
    """The surface every format module registers in `jaxweights.formats.FORMATS`.

    Attributes:
        name: the format.
        title: its name in messages (``"GGUF"``).
        suffixes: endings of its file names. They find its files in a folder when ``expand`` is None,
            tell which files of a folder a save replaces, and claim a file no plugin recognises by its
            magic bytes, so that this format's parser says precisely what is wrong with it (only when
            the plugin has ``open``).
        sniff: ``(head, path) -> bool``: True when the file's first bytes (``HEAD_SIZE`` of them, fewer
            for a short file) are this format's. Never raises.
        expand: ``folder -> files``: this format's files in a folder, an index preferred; empty when there
            are none. None: the files ending in one of ``suffixes``, sorted.
        open: ``files -> Checkpoint``, validating every header before it returns. None: the format is
            recognised but not read yet, and opening it raises `UnsupportedFormatError`.
        writer: how to write this format, or None.

    Example:
        >>> from jaxweights.formats import FORMATS
        >>> [(plugin.name.value, plugin.open is not None) for plugin in FORMATS]
        [('safetensors', True), ('gguf', True), ('pytorch', True)]
    """

    name: WeightsFormat
    title: str
    suffixes: tuple[str, ...]
    sniff: Callable[[bytes, Path], bool]
    expand: Callable[[Path], list[Path]] | None = None
    open: Callable[[Sequence[Path]], Checkpoint] | None = None
    writer: FormatWriter | None = None

    def files_in(self, folder: Path) -> list[Path]:
        """This format's files in ``folder`` (see ``expand``)."""
        if self.expand is not None:
            return self.expand(folder)
        return sorted(path for path in folder.iterdir() if path.name.endswith(self.suffixes))

    def owns(self, path: Path) -> bool:
        """True when ``path``'s name ends in one of ``suffixes``."""
        return path.name.endswith(self.suffixes)

    def require_writer(self) -> FormatWriter:
        """The writer, or `UnsupportedFormatError` when this format cannot be written."""
        if self.writer is None:
            raise UnsupportedFormatError(
                f"jaxweights cannot write {self.title} files; save as safetensors instead."
            )
        return self.writer
