from __future__ import annotations

import io
from pathlib import Path

import jax
import numpy as np

import jaxweights as jw
from jaxweights._loader import Job, load_all
from jaxweights._progress import Progress


def test_progress_reaches_the_stream(tmp_path: Path) -> None:
    tensors = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(8)}
    weights = jw.load_weights(jw.save_file(tensors, tmp_path / "m.safetensors"))
    stream = io.StringIO()
    bar = Progress(8 * 16384, 8, enabled=True, stream=stream)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    load_all(
        weights.checkpoint, [Job(a.info, a.info.dtype, device) for _, a in weights.items()], progress=bar
    )
    bar.close()
    assert "100% 131.1 kB / 131.1 kB, 8/8 tensors" in stream.getvalue()
    assert stream.getvalue().startswith("\rjaxweights: ") and stream.getvalue().endswith("\n")


def test_progress_is_off_for_pipes_and_small_loads() -> None:
    assert not Progress(10**12, 1, stream=io.StringIO()).enabled  # not a terminal

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not Progress(1000, 1, stream=Terminal()).enabled  # too small to bother
    assert Progress(10**12, 1, stream=Terminal()).enabled
    assert not Progress(10**12, 1, stream=Terminal(), enabled=False).enabled
