from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights.errors import ArgumentError, CheckpointError, ShapeMismatchError


def test_copy_into_counts_bytes_and_checks_bounds(write_reference: Callable[..., Path]) -> None:
    values = np.arange(100, dtype=np.float32)
    with jw.open_checkpoint(write_reference({"v": values})) as checkpoint:
        info = checkpoint["v"]
        out = np.empty(40, np.float32)
        checkpoint.copy_into(info, out, offset=40)
        np.testing.assert_array_equal(out, values[10:50])
        assert checkpoint.bytes_copied == 160
        with pytest.raises(
            ShapeMismatchError, match=r"bytes \[240, 440\) are outside tensor 'v', which holds 400"
        ):
            checkpoint.copy_into(info, np.empty(50, np.float32), offset=240)
        with pytest.raises(ArgumentError, match=r"C-contiguous, writeable output buffer for tensor 'v'"):
            checkpoint.copy_into(info, np.empty((10, 2), np.float32)[:, 0])
        fresh = checkpoint.read(info)
        assert fresh.flags.writeable and fresh.ctypes.data % 64 == 0
        np.testing.assert_array_equal(fresh, values)
        assert checkpoint.nbytes == 400 and len(checkpoint) == 1 and "v" in checkpoint
        assert repr(checkpoint) == "<Checkpoint safetensors: 1 tensors in 1 file(s)>"


def test_a_file_truncated_after_opening_is_an_error_not_a_crash(write_reference: Callable[..., Path]) -> None:
    path = write_reference({"v": np.arange(1 << 16, dtype=np.float32)})
    checkpoint = jw.open_checkpoint(path)
    with open(path, "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(CheckpointError, match="changed size since it was opened"):
        checkpoint.view(checkpoint["v"])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors ended after \d+ bytes while reading tensor 'v'"
    ):
        checkpoint.read(checkpoint["v"])  # preadv: a short read, not a SIGBUS
    checkpoint.close()


def test_closed_checkpoint_refuses_reads_but_views_stay_valid(write_reference: Callable[..., Path]) -> None:
    values = np.arange(10, dtype=np.float32)
    checkpoint = jw.open_checkpoint(write_reference({"v": values}))
    view = checkpoint.view(checkpoint["v"])
    checkpoint.close()
    np.testing.assert_array_equal(view, values)  # the map lives while a view does
    with pytest.raises(CheckpointError, match="is closed; open it again"):
        checkpoint.view(checkpoint["v"])


def test_special_files_are_refused_without_opening(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe.safetensors is not a regular file"):
        jw.load_weights(fifo)  # opening a FIFO for reading would block forever


def test_public_classes_show_their_public_module() -> None:
    for cls in (jw.Checkpoint, jw.TensorInfo, jw.WeightsFormat, jw.QuantizationEncoding, jw.BlockParameters):
        assert cls.__module__ == "jaxweights" and getattr(jw, cls.__name__) is cls


def test_copy_block_releases_the_pages_of_a_strided_block(write_reference: Callable[..., Path]) -> None:
    values = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    with jw.open_checkpoint(write_reference({"v": values})) as checkpoint:
        out = np.empty((2, 3, 5), np.float64)
        checkpoint.copy_block(checkpoint["v"], out, ((1, 3), (2, 5), (0, 5)))
        np.testing.assert_array_equal(out, values[1:3, 2:5])
        assert checkpoint.bytes_copied == out.size * 4
