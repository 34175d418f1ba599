"""The jaxweights error hierarchy.

Every error derives from `WeightsError` and from the built-in a caller would naturally catch
(`ValueError`, `KeyError`, `FileNotFoundError`, ...). Messages name the tensor and the file where one is
involved, state what was expected and what was found, and suggest a fix. This module imports nothing
from the rest of the package.
"""

from __future__ import annotations

import os

__all__ = [
    "AccessorError",
    "ArgumentError",
    "CheckpointChangedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "DTypeError",
    "DeviceError",
    "DuplicateTensorError",
    "GraphError",
    "IndexOutOfRangeError",
    "NotATensorError",
    "QuantizationError",
    "ShapeMismatchError",
    "ShardingError",
    "StructureMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "WeightNotFoundError",
    "WeightsError",
]


class WeightsError(Exception):
    """Root of every error jaxweights raises.

    Attributes:
        file: the checkpoint file involved, if any.
        tensor: the tensor name involved, if any.
    """

    def __init__(
        self, message: str, *, file: str | os.PathLike[str] | None = None, tensor: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = os.fspath(file) if file is not None else None
        self.tensor = tensor

    def __str__(self) -> str:
        # KeyError's str() would quote the message; every subclass prints it as written.
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.file, self.tensor))


def _rebuild(cls: type[WeightsError], message: str, file: str | None, tensor: str | None) -> WeightsError:
    return cls(message, file=file, tensor=tensor)


class CheckpointError(WeightsError, ValueError):
    """A checkpoint file is malformed: truncated, bad header, offsets or shapes that do not add up."""


class CheckpointChangedError(CheckpointError):
    """A file changed after the checkpoint was opened (replaced, truncated or rewritten: its inode, size
    or modification time differ from what was validated); re-open the checkpoint."""


class CheckpointReadError(WeightsError, OSError):
    """The operating system refused a read: permission denied, an I/O error, a file that is not a
    regular file (a folder, a pipe, a device), a symlink loop."""


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """A path given to jaxweights (or named inside an index file) does not exist."""


class UnsupportedFormatError(WeightsError, ValueError):
    """A file is not in a format jaxweights reads, or the paths mix formats."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to run code or to build objects outside the allow-list (a pickle that names
    ``os.system``, ``builtins.exec``, an unknown class, ...). Nothing it names was imported or run."""


class DuplicateTensorError(CheckpointError):
    """Two files of one checkpoint hold a tensor of the same name and no index says which wins."""


class WeightNotFoundError(WeightsError, KeyError):
    """No tensor has the requested name; the message lists close matches."""


class ShapeMismatchError(WeightsError, ValueError):
    """A requested shape differs from the stored one."""


class DTypeError(WeightsError, ValueError):
    """A value names no supported element type, or a conversion is not possible."""


class QuantizationError(WeightsError, ValueError):
    """A quantization encoding was requested that the stored tensor does not have."""


class DeviceError(WeightsError, ValueError):
    """A device reference names a device this process does not have."""


class ShardingError(WeightsError, ValueError):
    """A sharding does not fit a tensor: rank mismatch, or a dimension that does not divide evenly."""


class StructureMismatchError(WeightsError, ValueError):
    """A target pytree and a checkpoint disagree: missing, unexpected or mismatched tensors (all listed)."""


class CheckpointWriteError(WeightsError, OSError):
    """Saving failed (no space, read-only folder, a file where a folder should be); nothing was replaced."""


class NotATensorError(WeightNotFoundError, AttributeError):
    """A tensor's metadata (``.shape``, ``.dtype``) was asked of an accessor that names no tensor.

    Also an `AttributeError`, so ``hasattr(accessor, "shape")`` is False for a prefix.
    """


class IndexOutOfRangeError(WeightNotFoundError, IndexError):
    """A negative index counts past the numbered children of an accessor (``layers[-13]`` of 12)."""


class ArgumentError(WeightsError, TypeError, ValueError):
    """An argument has the wrong kind or an unusable value (metadata that is not text, a size such as
    ``"lots"``); both a `TypeError` and a `ValueError`."""


class AccessorError(ArgumentError):
    """An accessor was used as data or called: it only names tensors; ``.data()`` / ``.allocate()`` read."""


class GraphError(WeightsError, ValueError):
    """A `Graph` was misused: a weight with no data, a name added twice with different layouts, or a
    weight baked into a compiled program as a constant."""
