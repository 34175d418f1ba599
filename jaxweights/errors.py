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

    Example:
        >>> from jaxweights.errors import CheckpointError, WeightsError
        >>> error = CheckpointError("truncated header", file="m.safetensors", tensor="w")
        >>> isinstance(error, WeightsError), str(error), error.file, error.tensor
        (True, 'truncated header', 'm.safetensors', 'w')
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
    """A checkpoint file is malformed: truncated, bad header, offsets or shapes that do not add up.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.open_checkpoint("/dev/null")
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        CheckpointError /dev/null is not a regular file (a device, pipe or socket); pass a checkpoint file.
    """


class CheckpointChangedError(CheckpointError):
    """A file changed after the checkpoint was opened (replaced, truncated or rewritten: its inode, size
    or modification time differ from what was validated); re-open the checkpoint.

    Example:
        >>> from jaxweights.errors import CheckpointChangedError, WeightsError
        >>> error = CheckpointChangedError('m.safetensors changed; re-open it')
        >>> isinstance(error, WeightsError), isinstance(error, ValueError)
        (True, True)
    """


class CheckpointReadError(WeightsError, OSError):
    """The operating system refused a read: permission denied, an I/O error, a file that is not a
    regular file (a folder, a pipe, a device), a symlink loop.

    Example:
        >>> from jaxweights.errors import CheckpointReadError, WeightsError
        >>> error = CheckpointReadError('permission denied')
        >>> isinstance(error, WeightsError), isinstance(error, OSError)
        (True, True)
    """


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """A path given to jaxweights (or named inside an index file) does not exist.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.open_checkpoint("/no/such/m.safetensors")
        ... except FileNotFoundError as error:
        ...     print(type(error).__name__, error)
        CheckpointNotFoundError /no/such/m.safetensors does not exist. Check the path.
    """


class UnsupportedFormatError(WeightsError, ValueError):
    """A file is not in a format jaxweights reads, or the paths mix formats.

    Example:
        >>> from jaxweights.errors import UnsupportedFormatError, WeightsError
        >>> error = UnsupportedFormatError('notes.txt is not a checkpoint')
        >>> isinstance(error, WeightsError), isinstance(error, ValueError)
        (True, True)
    """


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to run code or to build objects outside the allow-list (a pickle that names
    ``os.system``, ``builtins.exec``, an unknown class, ...). Nothing it names was imported or run.

    Example:
        >>> from jaxweights.errors import CheckpointError, UnsafeCheckpointError
        >>> issubclass(UnsafeCheckpointError, CheckpointError), issubclass(UnsafeCheckpointError, ValueError)
        (True, True)
    """


class DuplicateTensorError(CheckpointError):
    """Two files of one checkpoint hold a tensor of the same name and no index says which wins.

    Example:
        >>> from jaxweights.errors import CheckpointError, DuplicateTensorError
        >>> issubclass(DuplicateTensorError, CheckpointError), issubclass(DuplicateTensorError, ValueError)
        (True, True)
    """


class WeightNotFoundError(WeightsError, KeyError):
    """No tensor has the requested name; the message lists close matches.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"layers.0.w": np.ones(2, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weights = jw.load_weights(path)
        >>> try:
        ...     weights.layers[0].bias.data()
        ... except KeyError as error:
        ...     print(type(error).__name__, error)
        WeightNotFoundError ...
    """


class ShapeMismatchError(WeightsError, ValueError):
    """A requested shape differs from the stored one.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"layers.0.w": np.ones(2, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weights = jw.load_weights(path)
        >>> try:
        ...     weights.layers[0].w.allocate(shape=(3,))
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        ShapeMismatchError Tensor 'layers.0.w' in ... has shape (2,), but allocate() was asked for (3,). ...
    """


class DTypeError(WeightsError, ValueError):
    """A value names no supported element type, or a conversion is not possible.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.DType.from_any("int")
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        DTypeError 'int' is ambiguous: ... Pass 'int32' (or 'int64' for numpy's reading).
    """


class QuantizationError(WeightsError, ValueError):
    """A quantization encoding was requested that the stored tensor does not have.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.QuantizationEncoding.from_any("q9")
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        QuantizationError 'q9' is not a quantization encoding. Use one of: Q4_0, ...
    """


class DeviceError(WeightsError, ValueError):
    """A device reference names a device this process does not have.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.DeviceRef.CPU(99).to_jax()
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        DeviceError DeviceRef.CPU(99) is out of range: this process has ... local CPU device(s), ...
    """


class ShardingError(WeightsError, ValueError):
    """A sharding does not fit a tensor: rank mismatch, or a dimension that does not divide evenly.

    Example:
        >>> from jaxweights.errors import ShardingError, WeightsError
        >>> error = ShardingError('dimension 0 (5) does not divide over 2 devices')
        >>> isinstance(error, WeightsError), isinstance(error, ValueError)
        (True, True)
    """


class StructureMismatchError(WeightsError, ValueError):
    """A target pytree and a checkpoint disagree: missing, unexpected or mismatched tensors (all listed).

    Example:
        >>> from jaxweights.errors import StructureMismatchError, WeightsError
        >>> error = StructureMismatchError("missing: 'w'")
        >>> isinstance(error, WeightsError), isinstance(error, ValueError)
        (True, True)
    """


class CheckpointWriteError(WeightsError, OSError):
    """Saving failed (no space, read-only folder, a file where a folder should be); nothing was replaced.

    Example:
        >>> from jaxweights.errors import CheckpointWriteError
        >>> issubclass(CheckpointWriteError, OSError)
        True
    """


class NotATensorError(WeightNotFoundError, AttributeError):
    """A tensor's metadata (``.shape``, ``.dtype``) was asked of an accessor that names no tensor.

    Also an `AttributeError`, so ``hasattr(accessor, "shape")`` is False for a prefix.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"layers.0.w": np.ones(2, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weights = jw.load_weights(path)
        >>> hasattr(weights.layers, "shape"), weights.layers[0].w.shape
        (False, (2,))
    """


class IndexOutOfRangeError(WeightNotFoundError, IndexError):
    """A negative index counts past the numbered children of an accessor (``layers[-13]`` of 12).

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"layers.0.w": np.ones(2, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weights = jw.load_weights(path)
        >>> try:
        ...     weights.layers[-3]
        ... except IndexError as error:
        ...     print(type(error).__name__, error)
        IndexOutOfRangeError Index -3 is out of range for 'layers', which has 1 numbered children.
    """


class ArgumentError(WeightsError, TypeError, ValueError):
    """An argument has the wrong kind or an unusable value (metadata that is not text, a size such as
    ``"lots"``); both a `TypeError` and a `ValueError`.

    Example:
        >>> from jaxweights.errors import ArgumentError
        >>> error = ArgumentError("size 'lots' is not a number of bytes")
        >>> isinstance(error, TypeError), isinstance(error, ValueError)
        (True, True)
    """


class AccessorError(ArgumentError):
    """An accessor was used as data or called: it only names tensors; ``.data()`` / ``.allocate()`` read.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"layers.0.w": np.ones(2, np.float32)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> weights = jw.load_weights(path)
        >>> try:
        ...     weights.layers()
        ... except TypeError as error:
        ...     print(type(error).__name__, error)
        AccessorError weights.layers(...) calls an accessor: ...
    """


class GraphError(WeightsError, ValueError):
    """A `Graph` was misused: a weight with no data, a name added twice with different layouts, or a
    weight baked into a compiled program as a constant.

    Example:
        >>> import jaxweights as jw
        >>> try:
        ...     jw.Graph("g", constants="ignore")
        ... except ValueError as error:
        ...     print(type(error).__name__, error)
        GraphError Graph 'g': constants='ignore'; use 'error' (the default) or 'warn'.
    """
