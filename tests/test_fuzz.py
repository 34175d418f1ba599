"""Property-based fuzzing of every parser: mutated safetensors headers, ``model.safetensors.index.json``
files, GGUF files and PyTorch files either load (open, list, read and place every tensor) or raise a
`jaxweights.errors.WeightsError`; never another exception, never a hang (`watchdog`), never arrays
larger than the file could hold nor much host memory (`memory_cap`).

Reproducible (``derandomize=True``, no example database) and bounded to a few seconds per parser;
``benchmarks/fuzz_parsers.py`` runs the same strategies (`INPUTS`) for 100,000+ inputs per parser.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
import signal
import struct
import tempfile
import tracemalloc
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxweights as jw

WATCHDOG_SECONDS = 2.0
"""An input that takes longer than this to open and read counts as a hang."""
MEMORY_SLACK = 16 * 2**20
"""Host memory any input may use (imports and first compilations take 3 MiB at most)."""
EXAMPLES = 400
"""Inputs per parser in this file (5-20 ms each: about 20 s for the file on 2 cores)."""


# ---------------------------------------------------------------------------------------------
# Running one input
# ---------------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the watchdog: a BaseException, so no ``except Exception`` in the code under test eats it."""


@contextlib.contextmanager
def watchdog(seconds: float = WATCHDOG_SECONDS) -> Iterator[None]:
    """Raises `Hang` in the main thread if the block runs longer than ``seconds`` (wall clock)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"one input took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exercise(path: Path, budget: int) -> str:
    """Opens ``path``, lists it, reads and places every tensor (and decodes every metadata value), and
    displays it: ``"accepted"``, or ``"refused"`` when a `WeightsError` says why. Any other exception
    propagates. No array may hold more than twice ``budget`` bytes (the files' total size), or eight
    times for a dequantized block tensor (4-bit blocks become float32)."""
    limit = 2 * budget + 64
    try:
        with jw.load_weights(path) as weights:
            for key in list(weights.metadata):
                weights.metadata[key]
            for _, accessor in weights.items():
                data = accessor.data()
                assert data.nbytes <= limit, f"{data!r} holds {data.nbytes} bytes from {budget}"
                array = accessor.allocate().array
                assert array.nbytes <= limit, f"{accessor.name!r} placed {array.nbytes} bytes from {budget}"
                if accessor.info.encoding is not None:
                    dense = accessor.allocate(dtype="float32").array
                    assert dense.nbytes <= 4 * limit, f"{accessor.name!r} dequantized to {dense.nbytes}"
            weights.summary()
            repr(weights)
            weights.to_pytree(shapes_only=True)
        return "accepted"
    except jw.errors.WeightsError:
        return "refused"


@dataclass(frozen=True)
class Inputs:
    """What one parser is fuzzed with: a strategy of file contents, the valid contents it mutates, and
    how to lay one out on disk (returning the path to open and the bytes it may read)."""

    name: str
    strategy: Callable[[], st.SearchStrategy[bytes]]
    bases: Callable[[], list[bytes]]
    write: Callable[[Path, bytes], tuple[Path, int]]


def warm_up(inputs: Inputs, folder: Path) -> None:
    """Checks that every base loads, without the watchdog: starting jax and the first compilations (a
    dequantization kernel takes over a second) are not hangs."""
    for content in inputs.bases():
        path, budget = inputs.write(folder, content)
        assert exercise(path, budget) == "accepted", f"a valid {inputs.name} input was refused"


@contextlib.contextmanager
def memory_cap(limit: int) -> Iterator[None]:
    """Fails if the memory Python tracks (numpy's arrays included; not XLA's buffers) peaks above
    ``limit`` bytes while the block runs. Does nothing when `tracemalloc` already traces."""
    if tracemalloc.is_tracing():
        yield
        return
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"reading the input allocated {peak} bytes at its peak (limit {limit})"


def run_one(inputs: Inputs, folder: Path, content: bytes) -> str:
    """Writes ``content`` into ``folder`` as ``inputs`` says, exercises it under the watchdog and a cap
    on host memory: `MEMORY_SLACK` plus 64 bytes per byte of input."""
    path, budget = inputs.write(folder, content)
    with watchdog(), memory_cap(MEMORY_SLACK + 64 * budget):
        return exercise(path, budget)


def write_single(suffix: str) -> Callable[[Path, bytes], tuple[Path, int]]:
    def write(folder: Path, content: bytes) -> tuple[Path, int]:
        path = folder / f"model{suffix}"
        path.write_bytes(content)
        return path, len(content)

    return write


# ---------------------------------------------------------------------------------------------
# Generic mutations
# ---------------------------------------------------------------------------------------------

EDGE_INTS = [
    0, 1, 2, 3, 4, 7, 8, 31, 32, 64, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
    2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
]  # fmt: skip
"""Counts, lengths and dimensions that sit on a boundary."""


@st.composite
def byte_mutations(draw: st.DrawFn, base: bytes, focus: int) -> bytes:
    """One to four flips, overwrites, insertions, deletions or truncations; each edit lands in the first
    ``focus`` bytes (the header) half of the time."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        end = min(focus, len(data)) if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, max(end - 1, 0)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


ODD_TEXT = ["", ".", "..", "a..b", ".a", "a.", "." * 1000, "9" * 5000, "²", "\ud800", "a\udcffb", "\0", "__metadata__"]  # fmt: skip
"""Names and strings that have broken something once."""
ODD_SEGMENTS = ["9" * 5000, "²", "00", "01", "1" * 30, "", "." * 1000, "\ud800", "0"]
"""Put after ``layers.``, whose other children are numbers (lists in a pytree)."""
ODD_DIMS = [0, 0, 1, 2, 3, 2**31, 2**32, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**30]
SHAPES = st.lists(st.sampled_from(ODD_DIMS), max_size=6) | st.lists(
    st.sampled_from([1, 1, 1, 0]), min_size=60, max_size=70
)
"""Shapes at and past what numpy can hold (dimensions past int64, products past 2**63, over 64 axes)."""

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.sampled_from(EDGE_INTS)
    | st.integers().map(lambda n: -n)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from([*ODD_TEXT, "F32", "U8", "F4", "BF16", "I64", "F8_E4M3", "F7"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["dtype", "shape", "data_offsets"]), children, max_size=4
        )
    ),
    max_leaves=8,
)


def json_bytes(value: Any, ascii_only: bool) -> bytes:
    """JSON text, with any lone surrogate kept (as invalid UTF-8) when not escaped."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------
# Safetensors headers
# ---------------------------------------------------------------------------------------------


@functools.cache
def safetensors_base() -> bytes:
    values = {
        "a.w": np.arange(24, dtype=np.float32).reshape(4, 6),
        "a.b": np.arange(5, dtype=np.int8),
        "c": np.ones(3, np.float16),
        "layers.0.d": np.ones((2, 2), ml_dtypes.bfloat16),
        "layers.1.e": np.array([True, False, True]),
        "f": np.zeros(4, ml_dtypes.float4_e2m1fn),
        "z": np.zeros((0, 3), np.float32),
    }
    with tempfile.TemporaryDirectory() as folder:
        return jw.save_file(values, Path(folder) / "m.safetensors", metadata={"format": "pt"}).read_bytes()


ST_ITEMSIZE = {"F32": 4, "I8": 1, "F16": 2, "BF16": 2, "BOOL": 1, "F4": 1}


def split_safetensors(content: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(content[:8], "little")
    return json.loads(content[8 : 8 + length]), content[8 + length :]


def with_header(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


@st.composite
def header_edits(draw: st.DrawFn) -> bytes:
    """A valid header edited as JSON (values replaced, keys removed, added, renamed or repeated), then
    written back with a correct or a random length prefix and a data section of the right size or not."""
    header, data = split_safetensors(safetensors_base())
    names = [name for name in header if name != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        kinds = ["entry", "field", "dim", "offset", "drop", "add", "rename", "metadata", "shape", "shape", "layer"]  # fmt: skip
        kind = draw(st.sampled_from(kinds))
        if kind == "shape" and type(entry) is dict:
            entry["shape"] = shape = draw(SHAPES)
            code, offsets = entry.get("dtype"), entry.get("data_offsets")
            size = (ST_ITEMSIZE.get(code, 1) if type(code) is str else 1) * int(np.prod(shape, dtype=object))
            begin = offsets[0] if type(offsets) is list and offsets and type(offsets[0]) is int else 0
            if size <= 64:  # the span agrees, so only the shape's limits can refuse it
                entry["data_offsets"] = [begin, begin + size]
        elif kind == "layer" and name in header:
            header[f"layers.{draw(st.sampled_from(ODD_SEGMENTS))}"] = header.pop(name)
        elif kind == "entry":
            header[name] = draw(JSON_VALUES)
        elif kind == "field" and type(entry) is dict:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
        elif kind in ("dim", "offset") and type(entry) is dict:
            values = entry.get("shape" if kind == "dim" else "data_offsets")
            if type(values) is list and values:
                values[draw(st.integers(0, len(values) - 1))] = draw(
                    st.sampled_from(EDGE_INTS) | JSON_SCALARS
                )
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "add":
            header[draw(st.sampled_from(ODD_TEXT) | st.text(max_size=8))] = draw(JSON_VALUES)
        elif kind == "rename" and name in header:
            header[draw(st.sampled_from(ODD_TEXT) | st.text(max_size=8))] = header.pop(name)
        elif kind == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
    text = json_bytes(header, draw(st.booleans()))
    if draw(st.booleans()):  # repeat one key, possibly escaped
        key = draw(st.sampled_from(["__metadata__", "dtype", *names]))
        spelled = draw(st.sampled_from([key, key.replace("d", "\\u0064", 1), key.replace("a", "\\u0061", 1)]))
        text = (
            text[:1]
            + json.dumps(spelled).encode()
            + b": "
            + json_bytes(draw(JSON_VALUES), True)
            + b", "
            + text[1:]
        )
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + b"\0" * 64
    length = None if draw(st.integers(0, 4)) else draw(st.sampled_from(EDGE_INTS))
    return with_header(text, data, length)


_NUMBER = re.compile(rb"(?<![\w.\\])-?\d+")
HUGE_LITERALS = [b"1" * 20, b"1" * 400, b"9" * 5000, b"-0", b"1e400", b"18446744073709551616", b"9223372036854775808",
                 b"-1", b"0.5", b"1E2", b"00", b"2e0", b"NaN", b"Infinity", b"true", b"null", b"[]", b"{}"]  # fmt: skip


@st.composite
def number_edits(draw: st.DrawFn, text: bytes) -> bytes:
    """One or two numbers of JSON ``text`` replaced by huge, negative, fractional or non-numeric
    literals."""
    for _ in range(draw(st.integers(1, 2))):
        spans = [match.span() for match in _NUMBER.finditer(text)]
        start, end = draw(st.sampled_from(spans))
        text = text[:start] + draw(st.sampled_from(HUGE_LITERALS)) + text[end:]
    return text


def safetensors_inputs() -> st.SearchStrategy[bytes]:
    base = safetensors_base()
    header_end = 8 + int.from_bytes(base[:8], "little")
    header, data = split_safetensors(base)
    numbers = number_edits(json.dumps(header).encode()).map(lambda text: with_header(text, data))
    return st.one_of(byte_mutations(base, header_end), header_edits(), numbers)


# ---------------------------------------------------------------------------------------------
# index.json
# ---------------------------------------------------------------------------------------------

SHARDS = {
    "model-00001-of-00002.safetensors": {"a.w": np.arange(6, dtype=np.float32), "a.b": np.ones(2, np.int8)},
    "model-00002-of-00002.safetensors": {"c": np.ones(3, np.float16), "layers.0.w": np.zeros(4, np.uint8)},
}


def write_index(folder: Path, content: bytes) -> tuple[Path, int]:
    """The two shards of `SHARDS` (written once per folder) and ``content`` as their index."""
    for name, values in SHARDS.items():
        if not (folder / name).exists():
            jw.save_file(values, folder / name)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(content)
    return index, len(content) + sum((folder / name).stat().st_size for name in SHARDS)


def valid_index() -> dict[str, Any]:
    weight_map = {tensor: shard for shard, values in SHARDS.items() for tensor in values}
    return {"metadata": {"total_size": 42}, "weight_map": weight_map}


FILE_NAMES = [*SHARDS, "", ".", "..", "../x.safetensors", "/etc/passwd", "C:\\x", "a\0b", "\ud800", "sub/",
              "model.safetensors.index.json", "missing.safetensors", "./model-00001-of-00002.safetensors"]  # fmt: skip
TENSOR_NAMES = [tensor for values in SHARDS.values() for tensor in values]


@st.composite
def index_documents(draw: st.DrawFn) -> bytes:
    """Weight maps of real and odd tensor and file names, with random metadata."""
    names = st.sampled_from(TENSOR_NAMES + ODD_TEXT) | st.text(max_size=6)
    files = st.sampled_from(FILE_NAMES) | st.text(max_size=6)
    document: dict[str, Any] = {"weight_map": draw(st.dictionaries(names, files, max_size=6))}
    if draw(st.booleans()):
        document["metadata"] = draw(JSON_VALUES)
    return json_bytes(document, draw(st.booleans()))


def index_inputs() -> st.SearchStrategy[bytes]:
    base = json.dumps(valid_index()).encode()
    return st.one_of(
        JSON_VALUES.flatmap(
            lambda value: st.booleans().map(lambda ascii_only: json_bytes(value, ascii_only))
        ),
        index_documents(),
        byte_mutations(base, len(base)),
        number_edits(base),
    )


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


@functools.cache
def gguf_base() -> bytes:
    """A small file by gguf-py, the reference writer: metadata arrays, a Q8_0, an F32 and an F16 tensor."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_head_count(4)
        writer.add_token_list([f"tok{i}".encode() for i in range(12)])
        writer.add_token_scores([float(i) for i in range(12)])
        writer.add_string("general.name", "fuzz")
        values = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor("blk.0.q", gguf.quants.quantize(values, q8), raw_dtype=q8)
        writer.add_tensor("blk.0.w", values)
        writer.add_tensor("blk.0.h", values[:, :8].astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@dataclass
class Field:
    """One field of a GGUF file laid out by hand: an unsigned integer (``size`` bytes) or raw bytes."""

    value: int | bytes
    size: int = 0  # 4 or 8 for integers


def _string(text: str) -> list[Field]:
    data = text.encode()
    return [Field(len(data), 8), Field(data)]


def gguf_fields() -> list[Field]:
    """A valid GGUF v3 file as fields (counts, lengths, types, dimensions and offsets are integers)."""
    fields = [Field(b"GGUF"), Field(3, 4), Field(3, 8), Field(4, 8)]  # magic, version, tensors, kvs
    fields += [*_string("general.alignment"), Field(4, 4), Field(32, 4)]
    fields += [*_string("general.name"), Field(8, 4), *_string("fuzz")]
    fields += [*_string("tokens"), Field(9, 4), Field(8, 4), Field(2, 8), *_string("a"), *_string("bc")]
    fields += [
        *_string("nested"),
        Field(9, 4),
        Field(9, 4),
        Field(1, 8),
        Field(5, 4),
        Field(2, 8),
        Field(b"\1\2\3\4\5\6\7\x08"),
    ]
    fields += [*_string("w"), Field(2, 4), Field(4, 8), Field(2, 8), Field(0, 4), Field(0, 8)]  # F32 [2, 4]
    fields += [*_string("q"), Field(1, 4), Field(32, 8), Field(8, 4), Field(32, 8)]  # Q8_0 [32]
    fields += [*_string("h"), Field(3, 4), Field(2, 8), Field(1, 8), Field(2, 8), Field(1, 4), Field(96, 8)]
    return fields


def gguf_bytes(fields: list[Field]) -> bytes:
    head = b"".join(
        f.value if isinstance(f.value, bytes) else f.value.to_bytes(f.size, "little") for f in fields
    )
    head += b"\0" * (-len(head) % 32)
    return head + bytes(range(128))  # w: bytes 0-31, q: 32-65, h: 96-103


@st.composite
def gguf_structure_edits(draw: st.DrawFn) -> bytes:
    """One to three counts, lengths, types, dimensions or offsets of a hand-laid file set to a boundary
    value or a random one; the rest of the file stays as it was."""
    fields = gguf_fields()
    numbers = [index for index, field in enumerate(fields) if field.size]
    for _ in range(draw(st.integers(1, 3))):
        field = fields[draw(st.sampled_from(numbers))]
        value = draw(st.sampled_from(EDGE_INTS) | st.integers(0, 2**64 - 1) | st.integers(0, 600))
        field.value = value % (1 << (8 * field.size))
    return gguf_bytes(fields)


def gguf_inputs() -> st.SearchStrategy[bytes]:
    base = gguf_base()
    return st.one_of(
        byte_mutations(base, 900), gguf_structure_edits(), byte_mutations(gguf_bytes(gguf_fields()), 400)
    )


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------


@functools.cache
def torch_bases() -> tuple[bytes, bytes]:
    """A ``torch.save`` zip file and a legacy file of the same state dict (views and shared storage)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=generator)
    state = {
        "a.w": weight,
        "a.t": weight.t(),  # a strided view of the same storage
        "a.b": torch.arange(5, dtype=torch.int8),
        "c": torch.ones(3, dtype=torch.float16),
        "layers.0.s": weight[1:3, ::2],
        "step": 7,
    }
    files = []
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        files.append(buffer.getvalue())
    return files[0], files[1]


@st.composite
def zip_member_edits(draw: st.DrawFn) -> bytes:
    """The zip file rebuilt with one member (the pickle most often) mutated: a valid archive whose
    content is not."""
    base = torch_bases()[0]
    with zipfile.ZipFile(io.BytesIO(base)) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    names = [name for name, _ in members]
    pickle_name = next(name for name in names if name.endswith("data.pkl"))
    target = draw(st.sampled_from([pickle_name, pickle_name, *names]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, draw(byte_mutations(data, len(data))) if name == target else data)
    return out.getvalue()


@functools.cache
def torch_values() -> list[Any]:
    import torch

    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return [
        weight, weight.t(), weight[:, 1], weight[0:0], torch.ones((), dtype=torch.bfloat16),
        torch.zeros(2, 0, 3, dtype=torch.float16), torch.tensor([True, False]), torch.arange(3, dtype=torch.int64),
        7, 2.5, "text", None, [weight[0], 1], {"inner": weight[1]},
    ]  # fmt: skip


@st.composite
def torch_state_dicts(draw: st.DrawFn) -> bytes:
    """``torch.save`` of state dicts with odd names (dots, huge numbers, surrogates, nesting) over views,
    empty tensors, scalars and non-tensor leaves, zip or legacy."""
    import torch

    names = st.sampled_from(
        ODD_TEXT + [f"layers.{segment}" for segment in ODD_SEGMENTS] + ["layers.0", "layers.1"]
    )
    state = draw(st.dictionaries(names | st.text(max_size=6), st.sampled_from(torch_values()), max_size=5))
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=draw(st.booleans()))
    return buffer.getvalue()


def torch_inputs() -> st.SearchStrategy[bytes]:
    zipped, legacy = torch_bases()
    return st.one_of(
        byte_mutations(zipped, len(zipped)),
        byte_mutations(legacy, len(legacy)),
        zip_member_edits(),
        torch_state_dicts(),
    )


# ---------------------------------------------------------------------------------------------
# The parsers
# ---------------------------------------------------------------------------------------------

INPUTS = {
    "safetensors": Inputs(
        "safetensors", safetensors_inputs, lambda: [safetensors_base()], write_single(".safetensors")
    ),
    "index": Inputs("index", index_inputs, lambda: [json.dumps(valid_index()).encode()], write_index),
    "gguf": Inputs(
        "gguf", gguf_inputs, lambda: [gguf_base(), gguf_bytes(gguf_fields())], write_single(".gguf")
    ),
    "torch": Inputs("torch", torch_inputs, lambda: list(torch_bases()), write_single(".pt")),
}
"""Every parser's fuzz inputs, shared with ``benchmarks/fuzz_parsers.py``."""


@pytest.mark.parametrize("parser", ["safetensors", "index", "gguf", "torch"])
def test_mutated_inputs_load_or_raise_a_jaxweights_error(parser: str, tmp_path: Path) -> None:
    if parser == "torch":
        pytest.importorskip("torch")
    inputs = INPUTS[parser]
    warm_up(inputs, tmp_path)  # the valid bases load, so mutations start from files that do
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(content=inputs.strategy())
    def check(content: bytes) -> None:
        folder = tmp_path / "case"
        folder.mkdir(exist_ok=True)
        try:
            outcomes[run_one(inputs, folder, content)] += 1
        finally:
            shutil.rmtree(folder)

    check()
    assert outcomes["refused"] >= EXAMPLES // 5, outcomes  # the mutations reach the parser's checks
    assert sum(outcomes.values()) >= EXAMPLES, outcomes
