from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights.errors import CheckpointError


def test_copy_into_counts_bytes_and_checks_bounds(write_reference: Callable[..., Path]) -> None:
    values = np.arange(100, dtype=np.float32)
    with jw.open_checkpoint(write_reference({"v": values})) as checkpoint:
        info = checkpoint["v"]
        out = np.empty(40, np.float32)
        checkpoint.copy_into(info, out, offset=40)
        np.testing.assert_array_equal(out, values[10:50])
        assert checkpoint.bytes_copied == 160
        with pytest.raises(ValueError, match=r"bytes \[240, 440\) are outside tensor 'v'"):
            checkpoint.copy_into(info, np.empty(50, np.float32), offset=240)
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
