from __future__ import annotations

import pickle

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
