from __future__ import annotations

import ast
import builtins
import pickle
from pathlib import Path

import pytest

from jaxweights import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.CheckpointError, ValueError),
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.UnsupportedFormatError, ValueError),
        (errors.DuplicateTensorError, ValueError),
        (errors.WeightNotFoundError, KeyError),
        (errors.ShapeMismatchError, ValueError),
        (errors.DTypeError, ValueError),
        (errors.QuantizationError, ValueError),
        (errors.DeviceError, ValueError),
        (errors.ShardingError, ValueError),
        (errors.StructureMismatchError, ValueError),
        (errors.CheckpointWriteError, OSError),
        (errors.NotATensorError, KeyError),
        (errors.NotATensorError, AttributeError),
        (errors.ArgumentError, TypeError),
        (errors.AccessorError, TypeError),
        (errors.GraphError, ValueError),
        (errors.IndexOutOfRangeError, IndexError),
        (errors.UnsafeCheckpointError, ValueError),
    ],
)
def test_every_error_is_a_weights_error_and_a_builtin(cls: type[errors.WeightsError], builtin: type) -> None:
    error = cls("boom", file="/tmp/x.safetensors", tensor="a.b")
    assert isinstance(error, errors.WeightsError)
    assert isinstance(error, builtin)
    assert str(error) == "boom"  # KeyError would otherwise quote it
    assert error.file == "/tmp/x.safetensors"
    assert error.tensor == "a.b"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert (again.message, again.file, again.tensor) == ("boom", "/tmp/x.safetensors", "a.b")


# Raises of built-in exceptions the package keeps on purpose, by (module, exception): protocol answers
# that Python itself expects, where a jaxweights error would change the protocol.
_ALLOWED = {
    ("_weights.py", "AttributeError"),  # __getattr__ for private and dunder names (copy, pickle, IPython)
}


def test_every_raise_in_the_package_is_a_jaxweights_error() -> None:
    package = Path(errors.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = call.id if isinstance(call, ast.Name) else None
            builtin = getattr(builtins, name, None) if name else None
            is_builtin_error = isinstance(builtin, type) and issubclass(builtin, BaseException)
            if is_builtin_error and (path.name, name) not in _ALLOWED:
                found.append(f"{path.relative_to(package)}:{node.lineno} raises {name}")
    assert not found, "raise a jaxweights.errors class instead:\n" + "\n".join(found)
