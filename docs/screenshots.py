"""Screenshots of the notebook HTML view of `Weights`, for looking at what users see.

Renders ``Weights._repr_html_`` for the default MiniLM checkpoint and for a generated 500-tensor
decoder in headless Chromium and writes one PNG each (plus the HTML) to ``--out``. Reads only
catalogues, never tensor data; needs a ``chromium`` (or ``chromium-browser``, ``google-chrome``) binary.

    python docs/screenshots.py --out /tmp
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import jaxweights as jw
from jaxweights.cli import default_checkpoint

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def generated_model(folder: Path, tensors: int = 500) -> Path:
    """A decoder-shaped checkpoint of ``tensors`` tensors (tiny shapes in the file, real names)."""
    arrays: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.zeros((8, 4), np.float16)}
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    parts += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    layer = 0
    while len(arrays) < tensors - 2:
        for part in parts:
            arrays[f"model.layers.{layer}.{part}.weight"] = np.zeros((4, 4), np.float16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            arrays[f"model.layers.{layer}.{norm}.weight"] = np.zeros(4, np.float32)
        layer += 1
    arrays["model.norm.weight"] = np.zeros(4, np.float32)
    arrays["lm_head.weight"] = np.zeros((8, 4), np.float16)
    return jw.save_file(arrays, folder / "decoder.safetensors")


def _page(body: str) -> str:
    return f"<!doctype html><meta charset='utf-8'><body style='margin:16px;background:#fff'>{body}</body>"


def screenshot(html_file: Path, png: Path, browser: str, size: str = "1200,1600") -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            f"--window-size={size}",
            html_file.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp"), help="folder for the PNGs (default /tmp)")
    args = parser.parse_args()
    browser = next((b for b in _BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit(f"no headless browser found (tried {', '.join(_BROWSERS)}); install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        models = {"minilm": default_checkpoint(), "decoder-500": generated_model(Path(scratch))}
        for stem, path in models.items():
            weights = jw.load_weights(path)
            page = args.out / f"weights-{stem}.html"
            page.write_text(_page(weights._repr_html_()), encoding="utf-8")
            png = args.out / f"weights-{stem}.png"
            screenshot(page, png, browser)
            assert weights.checkpoint.bytes_copied == 0
            print(f"{png}  ({weights.summary().tensors} tensors)")
        opened = _page(jw.load_weights(models["minilm"])._repr_html_().replace("<details>", "<details open>"))
        page = args.out / "weights-minilm-open.html"
        page.write_text(opened, encoding="utf-8")
        screenshot(page, args.out / "weights-minilm-open.png", browser)
        print(args.out / "weights-minilm-open.png", "(every group open)")


if __name__ == "__main__":
    main()
