"""PyTorch checkpoints written by ``torch.save``, read without torch and without running pickle code.

Registered as `PLUGIN` in `jaxweights.formats`: it recognises the zip format (torch >= 1.6) and the
legacy format (``_use_new_zipfile_serialization=False``), lists ``pytorch_model.bin.index.json`` or the
``*.bin`` / ``*.pt`` / ``*.pth`` files of a folder, and opens them as one `Checkpoint`.

The pickle is run by a small interpreter of its own (protocols 2 to 5), not by `pickle`: every global
comes from an allow-list of rebuild functions written here (nothing is imported), REDUCE only calls
those, BUILD only fills a state dict's attributes, and objects, nesting depth and every length are
bounded against the bytes left before anything is allocated. Anything else raises
`UnsafeCheckpointError` before a single object of it exists. The zip's central directory (ZIP64
included) is read here too, not by `zipfile`, for the few fields a stored member needs. Storages are
never read: their offsets in the file are computed (a zip member's data offset from its local header; a
legacy file's storages by walking their 8-byte counts), and each tensor becomes a `TensorInfo` over its
storage's bytes, with ``strides`` for views that are not C-contiguous. Compressed zip members,
TorchScript archives and the old tar format are refused. Nested training checkpoints get dotted names (``model.layers.0.weight``) and
their non-tensor leaves (``epoch``) become metadata.

Never imports jax, torch or `pickle`.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .._dtypes import DType
from .._shapes import c_strides, element_count
from ..errors import (
    CheckpointError,
    CheckpointReadError,
    DTypeError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    WeightsError,
)
from ._checkpoint import Checkpoint, TensorInfo, WeightsFormat
from ._files import open_regular
from ._index import gc_paused, open_files
from ._plugin import FormatPlugin

__all__ = [
    "ALLOWED_GLOBALS",
    "INDEX_NAME",
    "LEGACY_MAGIC",
    "LEGACY_PROTOCOL",
    "MAX_DEPTH",
    "MAX_LEAVES",
    "MAX_OBJECTS",
    "PLUGIN",
    "open_torch",
    "read_torch",
    "sniff",
    "weight_files",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickle of a legacy (non-zip) ``torch.save`` file."""
LEGACY_PROTOCOL = 1001
INDEX_NAME = "pytorch_model.bin.index.json"
INDEX_SUFFIXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")
MAX_DEPTH = 200
"""Deepest nesting of marks while unpickling, and of containers while naming tensors."""
MAX_OBJECTS = 50_000_000
"""Most opcodes one pickle may run (each makes at most one object; the memo store that follows one runs
with it)."""
MAX_LEAVES = 1_000_000
"""Most names (tensors and metadata leaves, counting every shared reference again) one file may give."""
MAX_STRING = 1 << 28
"""Longest string or bytes object a pickle may hold (256 MiB)."""

_ZIP_MAGIC = b"PK\x03\x04"
_TAR_NAMES = (b"sys_info\0", b"pickle\0", b"storages\0", b"tensors\0")  # members of torch's old tar format


# ---------------------------------------------------------------------------------------------
# What the pickle may name: storage types, dtypes, and the rebuild functions below
# ---------------------------------------------------------------------------------------------

_STORAGE_DTYPES: dict[str, DType | None] = {
    "FloatStorage": DType.float32,
    "HalfStorage": DType.float16,
    "BFloat16Storage": DType.bfloat16,
    "DoubleStorage": DType.float64,
    "ByteStorage": DType.uint8,
    "CharStorage": DType.int8,
    "ShortStorage": DType.int16,
    "IntStorage": DType.int32,
    "LongStorage": DType.int64,
    "BoolStorage": DType.bool,
    "ComplexFloatStorage": DType.complex64,
    "ComplexDoubleStorage": None,  # complex128: no DType; refused for the tensors that use it
    "UInt16Storage": DType.uint16,
    "UInt32Storage": DType.uint32,
    "UInt64Storage": DType.uint64,
}

_TORCH_DTYPES: dict[str, DType | None] = {
    "float32": DType.float32, "float": DType.float32, "float16": DType.float16, "half": DType.float16,
    "bfloat16": DType.bfloat16, "float64": DType.float64, "double": DType.float64,
    "uint8": DType.uint8, "int8": DType.int8, "int16": DType.int16, "short": DType.int16,
    "int32": DType.int32, "int": DType.int32, "int64": DType.int64, "long": DType.int64,
    "uint16": DType.uint16, "uint32": DType.uint32, "uint64": DType.uint64, "bool": DType.bool,
    "complex64": DType.complex64, "cfloat": DType.complex64,
    "float8_e4m3fn": DType.float8_e4m3fn, "float8_e4m3fnuz": DType.float8_e4m3fnuz,
    "float8_e5m2": DType.float8_e5m2, "float8_e5m2fnuz": DType.float8_e5m2fnuz,
    "float8_e8m0fnu": DType.float8_e8m0fnu,
    # known to torch, not readable here: refused for the tensors that use them
    "complex128": None, "cdouble": None, "complex32": None, "chalf": None, "qint8": None,
    "quint8": None, "qint32": None, "quint4x2": None, "quint2x4": None, "float4_e2m1fn_x2": None,
}  # fmt: skip


_ITEMSIZES = {dtype: dtype.size_in_bytes for dtype in DType}


class _StorageType(NamedTuple):
    """A storage class named by the pickle (``torch.FloatStorage``); ``dtype`` None: untyped (bytes)."""

    name: str
    dtype: DType | None
    itemsize: int


class _TorchDType(NamedTuple):
    """A torch dtype named by the pickle (``torch.float8_e4m3fn``); ``dtype`` None: not readable here."""

    name: str
    dtype: DType | None


class _Storage:
    """One storage of the file: its key, element type and size; ``start`` is filled in once located."""

    __slots__ = ("dtype", "key", "kind", "nbytes", "numel", "start")

    def __init__(self, key: str, kind: _StorageType, numel: int) -> None:
        self.key = key
        self.kind = kind
        self.dtype = kind.dtype
        self.numel = numel
        self.nbytes = numel * kind.itemsize
        self.start = -1


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: DType | None
    dtype_name: str


class _OrderedDict(dict[Any, Any]):
    """``collections.OrderedDict`` as the pickle builds it; BUILD may set its attributes (``_metadata``)."""

    attributes: dict[Any, Any] | None = None


class _Global:
    """An allow-listed global: REDUCE calls ``build`` with the argument tuple, nothing else is called."""

    __slots__ = ("build", "name")

    def __init__(self, name: str, build: Callable[[tuple[Any, ...]], Any] | None) -> None:
        self.name = name
        self.build = build


class _BadArgumentsError(Exception):
    """A rebuild function was given arguments torch never writes."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or any(type(v) is not int for v in value):
        raise _BadArgumentsError(f"{what} must be a tuple of integers")
    return value


def _rebuild_tensor(args: tuple[Any, ...], dtype: _TorchDType | None) -> _Tensor:
    storage, offset, shape, strides = args[:4]
    if type(storage) is not _Storage or type(offset) is not int:
        raise _BadArgumentsError("a tensor must be rebuilt from a storage and an integer offset")
    if type(shape) is not tuple or type(strides) is not tuple:
        raise _BadArgumentsError("a tensor's size and stride must be tuples of integers")
    for item in shape + strides:  # runs once per tensor: a plain loop, no generator or call
        if type(item) is not int:
            raise _BadArgumentsError("a tensor's size and stride must be tuples of integers")
    if dtype is None:
        return _Tensor(storage, offset, shape, strides, storage.dtype, storage.kind.name)
    return _Tensor(storage, offset, shape, strides, dtype.dtype, f"torch.{dtype.name}")


def _rebuild_tensor_v2(args: tuple[Any, ...]) -> _Tensor:
    if not 6 <= len(args) <= 7:
        raise _BadArgumentsError("_rebuild_tensor_v2 takes 6 or 7 arguments")
    return _rebuild_tensor(args, None)


def _rebuild_tensor_v3(args: tuple[Any, ...]) -> _Tensor:
    if not 7 <= len(args) <= 8 or not isinstance(args[6], _TorchDType):
        raise _BadArgumentsError("_rebuild_tensor_v3 takes 7 or 8 arguments, the 7th a torch dtype")
    return _rebuild_tensor(args, args[6])


def _rebuild_parameter(args: tuple[Any, ...]) -> _Tensor:
    if not 3 <= len(args) <= 4 or not isinstance(args[0], _Tensor):
        raise _BadArgumentsError("_rebuild_parameter takes a tensor and 2 or 3 more arguments")
    return args[0]


def _ordered_dict(args: tuple[Any, ...]) -> _OrderedDict:
    result = _OrderedDict()
    if args == ():
        return result
    if len(args) == 1 and type(args[0]) in (list, tuple):
        for pair in args[0]:
            if type(pair) is not tuple or len(pair) != 2:
                raise _BadArgumentsError("OrderedDict takes a list of (key, value) pairs")
            result[_key(pair[0])] = pair[1]
        return result
    raise _BadArgumentsError("OrderedDict takes no arguments or a list of (key, value) pairs")


def _size(args: tuple[Any, ...]) -> tuple[int, ...]:
    if len(args) != 1:
        raise _BadArgumentsError("torch.Size takes one tuple")
    return _ints(tuple(args[0]) if type(args[0]) is list else args[0], "torch.Size")


def _device(args: tuple[Any, ...]) -> str:
    if not 1 <= len(args) <= 2 or type(args[0]) is not str:
        raise _BadArgumentsError("torch.device takes a string and an optional index")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


def _encode(args: tuple[Any, ...]) -> bytes:  # how protocol 2 writes bytes objects
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise _BadArgumentsError("_codecs.encode is allowed for latin1 text only")
    return args[0].encode("latin1")


def _set(args: tuple[Any, ...]) -> set[Any]:
    if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
        raise _BadArgumentsError("set takes one list")
    return {_key(item) for item in args[0]} if args else set()


def _frozenset(args: tuple[Any, ...]) -> frozenset[Any]:
    return frozenset(_set(args))


ALLOWED_GLOBALS: dict[tuple[str, str], _Global | _StorageType | _TorchDType] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Global("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Global(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter
    ),
    ("collections", "OrderedDict"): _Global("collections.OrderedDict", _ordered_dict),
    ("torch", "Size"): _Global("torch.Size", _size),
    ("torch", "device"): _Global("torch.device", _device),
    ("_codecs", "encode"): _Global("_codecs.encode", _encode),
    ("builtins", "set"): _Global("builtins.set", _set),
    ("builtins", "frozenset"): _Global("builtins.frozenset", _frozenset),
    **{
        (module, name): _StorageType(name, dtype, 1 if dtype is None else dtype.size_in_bytes)
        for name, dtype in _STORAGE_DTYPES.items()
        if dtype is not None
        for module in ("torch", "torch.storage")
    },
    ("torch", "ComplexDoubleStorage"): _StorageType("ComplexDoubleStorage", None, 16),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None, 1),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None, 1),
    **{("torch", name): _TorchDType(name, dtype) for name, dtype in _TORCH_DTYPES.items()},
}
"""Every global a pickle may name, ``(module, name) -> what it stands for``; none is ever imported."""


def _key(value: Any) -> Any:
    """A dict key or set item: only flat, hashable scalars (hashing a deeply nested tuple could recurse
    without bound)."""
    if type(value) in (str, int, float, bool, bytes) or value is None:
        return value
    if type(value) is tuple and all(type(v) in (str, int, float, bool) or v is None for v in value):
        return value
    raise _BadArgumentsError(
        f"a dict key or set item must be a string or a number, found {type(value).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# The pickle interpreter
# ---------------------------------------------------------------------------------------------

_OPCODE_NAMES = {
    0x80: "PROTO", 0x95: "FRAME", 0x2E: "STOP", 0x28: "MARK", 0x30: "POP", 0x31: "POP_MARK", 0x32: "DUP",
    0x4A: "BININT", 0x4B: "BININT1", 0x4D: "BININT2", 0x8A: "LONG1", 0x8B: "LONG4", 0x47: "BINFLOAT",
    0x4E: "NONE", 0x88: "NEWTRUE", 0x89: "NEWFALSE", 0x58: "BINUNICODE", 0x8C: "SHORT_BINUNICODE",
    0x8D: "BINUNICODE8", 0x42: "BINBYTES", 0x43: "SHORT_BINBYTES", 0x8E: "BINBYTES8", 0x96: "BYTEARRAY8",
    0x29: "EMPTY_TUPLE", 0x74: "TUPLE", 0x85: "TUPLE1", 0x86: "TUPLE2", 0x87: "TUPLE3", 0x5D: "EMPTY_LIST",
    0x6C: "LIST", 0x61: "APPEND", 0x65: "APPENDS", 0x7D: "EMPTY_DICT", 0x64: "DICT", 0x73: "SETITEM",
    0x75: "SETITEMS", 0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x68: "BINGET",
    0x6A: "LONG_BINGET", 0x71: "BINPUT", 0x72: "LONG_BINPUT", 0x94: "MEMOIZE", 0x63: "GLOBAL",
    0x93: "STACK_GLOBAL", 0x52: "REDUCE", 0x51: "BINPERSID", 0x62: "BUILD",
    # refused
    0x69: "INST", 0x6F: "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x50: "PERSID", 0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING", 0x54: "BINSTRING",
    0x55: "SHORT_BINSTRING", 0x56: "UNICODE", 0x67: "GET", 0x70: "PUT", 0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER",
}  # fmt: skip

_I32 = struct.Struct("<i").unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_F64 = struct.Struct(">d").unpack_from


class _StopError(Exception):
    pass


class _Unpickler:
    """Runs one pickle from ``data[start]`` (bytes or an mmap) to its STOP, building only allow-listed
    objects. The pickle may run to the end of ``data``, no further; ``base`` is where ``data`` starts in
    the file (for error messages)."""

    def __init__(
        self,
        data: Any,
        start: int,
        path: Path,
        persistent_load: Callable[[Any], Any] | None,
        base: int = 0,
    ) -> None:
        self.data, self.pos, self.end, self.path, self.base = data, start, len(data), path, base
        self.persistent_load = persistent_load
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.ops: list[Callable[[], None] | None] = [None] * 256
        for code, name in _OPCODE_NAMES.items():
            self.ops[code] = getattr(self, f"_op_{name.lower()}", None)

    # -- errors -------------------------------------------------------------------------------
    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a valid PyTorch checkpoint: its pickle {what} (near byte "
            f"{self.base + self.pos}). The file is truncated or corrupt; save it again.",
            file=self.path,
        )

    def unsafe(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.path} asks to run code: its pickle {what} (near byte {self.base + self.pos}). "
            f"jaxweights builds only tensors, containers and plain values; nothing was imported or run. If "
            f"you trust the file, load it with torch and save its state_dict as safetensors.",
            file=self.path,
        )

    def load(self) -> Any:
        """Runs the pickle to its STOP; returns the object and leaves ``pos`` just past the STOP.

        The opcodes torch.save writes for every tensor run inline here, on local variables, most frequent
        first and with the checks of their ``_op_*`` methods; the others run those methods, ``pos`` and
        ``stack`` handed over and back. Fixed-size arguments need no explicit bounds check: ``data`` ends
        where the pickle may end, so reading past it raises IndexError or struct.error, both reported as
        a truncated pickle; lengths are checked before anything is sliced or allocated."""
        data, end, memo, metastack = self.data, self.end, self.memo, self.metastack
        ops, persistent_load = self.ops, self.persistent_load
        stack, pos = self.stack, self.pos
        memo_limit = 0  # memo indices up to this are fine (it trails len(memo) + 1024, which only grows)
        try:
            for _ in range(MAX_OBJECTS):
                code = data[pos]
                pos += 1
                if code == 0x72:  # LONG_BINPUT, run with the next opcode (most pushes are followed by one)
                    (index,) = _U32(data, pos)
                    if index > memo_limit:
                        memo_limit = len(memo) + 1024
                        if index > memo_limit:
                            self.pos = pos
                            raise self.fail(f"stores memo entry {index} while it holds {len(memo)}")
                    memo[index] = stack[-1]
                    pos += 4
                    code = data[pos]
                    pos += 1
                if code == 0x4B:  # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif code == 0x68:  # BINGET
                    index = data[pos]
                    pos += 1
                    try:
                        stack.append(memo[index])
                    except KeyError:
                        self.pos = pos
                        raise self.fail(f"reads memo entry {index}, which was never stored") from None
                elif code == 0x28:  # MARK
                    if len(metastack) >= MAX_DEPTH:
                        self.pos = pos
                        raise self.fail(f"nests marks deeper than {MAX_DEPTH}")
                    metastack.append(stack)
                    stack = []
                elif code == 0x58:  # BINUNICODE
                    (count,) = _U32(data, pos)
                    pos += 4
                    if count > MAX_STRING:
                        self.pos = pos
                        raise self.fail(f"holds a {count}-byte string, over the {MAX_STRING}-byte limit")
                    if pos + count > end:
                        raise self.short(pos, count)
                    stack.append(str(data[pos : pos + count], "utf-8"))
                    pos += count
                elif code == 0x74:  # TUPLE
                    items = stack
                    stack = metastack.pop()
                    stack.append(tuple(items))
                elif code == 0x86:  # TUPLE2
                    second = stack.pop()
                    stack[-1] = (stack[-1], second)
                elif code == 0x52:  # REDUCE
                    args = stack.pop()
                    func = stack[-1]
                    if type(func) is _Global and func.build is not None and type(args) is tuple:
                        stack[-1] = func.build(args)
                    else:
                        stack.append(args)
                        self.pos, self.stack = pos, stack
                        self._op_reduce()  # raises the refusal
                elif code == 0x4D:  # BININT2
                    stack.append(_U16(data, pos)[0])
                    pos += 2
                elif code == 0x51 and persistent_load is not None:  # BINPERSID
                    stack[-1] = persistent_load(stack[-1])
                elif code == 0x89:  # NEWFALSE
                    stack.append(False)
                elif code == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                else:
                    op = ops[code]
                    self.pos, self.stack = pos, stack
                    if op is None:
                        self.pos = pos - 1
                        name = _OPCODE_NAMES.get(code)
                        if name is None:
                            raise self.unsafe(f"has an unknown opcode 0x{code:02x}")
                        raise self.unsafe(f"uses opcode {name}, which jaxweights does not run")
                    op()
                    pos, stack = self.pos, self.stack
            self.pos = pos
            raise self.fail(f"runs over {MAX_OBJECTS} opcodes")
        except _StopError:
            return self.stack.pop()
        except WeightsError:
            raise
        except _BadArgumentsError as error:
            self.pos = max(self.pos, pos)  # an inline opcode leaves self.pos behind; a method moves it on
            raise self.fail(f"calls a rebuild function wrongly: {error}") from None
        except (IndexError, struct.error) as error:
            self.pos = max(self.pos, pos)
            if pos >= end or type(error) is struct.error:  # an opcode or its argument read past the end
                raise self.fail("ends before its STOP opcode") from None
            raise self.fail(f"is malformed (IndexError: {str(error)[:100]})") from None
        except (KeyError, TypeError, ValueError, RecursionError) as error:
            self.pos = max(self.pos, pos)
            raise self.fail(f"is malformed ({type(error).__name__}: {str(error)[:100]})") from None

    def short(self, pos: int, count: int) -> CheckpointError:
        """The error for ``count`` bytes claimed at ``pos`` past the end (as `take` raises it)."""
        self.pos = pos
        return self.fail(f"needs {count} bytes but {self.end - pos} are left")

    def take(self, count: int) -> int:
        """Consumes ``count`` bytes, checking they exist; returns where they start."""
        pos = self.pos
        if count < 0 or pos + count > self.end:
            raise self.fail(f"needs {count} bytes but {self.end - pos} are left")
        self.pos = pos + count
        return pos

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def text(self, count: int) -> str:
        if count > MAX_STRING:
            raise self.fail(f"holds a {count}-byte string, over the {MAX_STRING}-byte limit")
        pos = self.take(count)
        return str(self.data[pos : pos + count], "utf-8")

    def raw(self, count: int) -> bytes:
        if count > MAX_STRING:
            raise self.fail(f"holds {count} bytes, over the {MAX_STRING}-byte limit")
        pos = self.take(count)
        return bytes(self.data[pos : pos + count])

    # -- framing and stack --------------------------------------------------------------------
    def _op_proto(self) -> None:
        version = self.data[self.take(1)]
        if not 2 <= version <= 5:
            raise self.fail(f"uses protocol {version}; torch.save writes protocols 2 to 5")

    def _op_frame(self) -> None:
        (length,) = _U64(self.data, self.take(8))  # frames only group opcodes; checked, not buffered
        if length > self.end - self.pos:
            raise self.fail(f"claims a frame of {length} bytes with {self.end - self.pos} left")

    def _op_stop(self) -> None:
        if len(self.stack) != 1 or self.metastack:
            raise self.fail("stops with an unbalanced stack")
        raise _StopError

    def _op_mark(self) -> None:
        if len(self.metastack) >= MAX_DEPTH:
            raise self.fail(f"nests marks deeper than {MAX_DEPTH}")
        self.metastack.append(self.stack)
        self.stack = []

    def _op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def _op_pop_mark(self) -> None:
        self.pop_mark()

    def _op_dup(self) -> None:
        self.stack.append(self.stack[-1])

    # -- numbers, strings, constants ----------------------------------------------------------
    def _op_binint(self) -> None:
        self.stack.append(_I32(self.data, self.take(4))[0])

    def _op_binint1(self) -> None:
        self.stack.append(self.data[self.take(1)])

    def _op_binint2(self) -> None:
        self.stack.append(_U16(self.data, self.take(2))[0])

    def _op_long1(self) -> None:
        count = self.data[self.take(1)]
        pos = self.take(count)
        self.stack.append(int.from_bytes(self.data[pos : pos + count], "little", signed=True))

    def _op_long4(self) -> None:
        count = _I32(self.data, self.take(4))[0]
        if not 0 <= count <= 64:
            raise self.fail(f"holds a {count}-byte integer; checkpoints hold at most 64-byte ones")
        pos = self.take(count)
        self.stack.append(int.from_bytes(self.data[pos : pos + count], "little", signed=True))

    def _op_binfloat(self) -> None:
        self.stack.append(_F64(self.data, self.take(8))[0])

    def _op_none(self) -> None:
        self.stack.append(None)

    def _op_newtrue(self) -> None:
        self.stack.append(True)

    def _op_newfalse(self) -> None:
        self.stack.append(False)

    def _op_binunicode(self) -> None:
        self.stack.append(self.text(_U32(self.data, self.take(4))[0]))

    def _op_short_binunicode(self) -> None:
        self.stack.append(self.text(self.data[self.take(1)]))

    def _op_binunicode8(self) -> None:
        self.stack.append(self.text(_U64(self.data, self.take(8))[0]))

    def _op_binbytes(self) -> None:
        self.stack.append(self.raw(_U32(self.data, self.take(4))[0]))

    def _op_short_binbytes(self) -> None:
        self.stack.append(self.raw(self.data[self.take(1)]))

    def _op_binbytes8(self) -> None:
        self.stack.append(self.raw(_U64(self.data, self.take(8))[0]))

    def _op_bytearray8(self) -> None:
        self.stack.append(bytearray(self.raw(_U64(self.data, self.take(8))[0])))

    # -- containers -----------------------------------------------------------------------------
    def _op_empty_tuple(self) -> None:
        self.stack.append(())

    def _op_tuple(self) -> None:
        items = self.pop_mark()
        self.stack.append(tuple(items))

    def _op_tuple1(self) -> None:
        self.stack[-1] = (self.stack[-1],)

    def _op_tuple2(self) -> None:
        stack = self.stack
        second = stack.pop()
        stack[-1] = (stack[-1], second)

    def _op_tuple3(self) -> None:
        stack = self.stack
        third, second = stack.pop(), stack.pop()
        stack[-1] = (stack[-1], second, third)

    def _op_empty_list(self) -> None:
        self.stack.append([])

    def _op_list(self) -> None:
        items = self.pop_mark()
        self.stack.append(items)

    def _op_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not list:
            raise self.unsafe(f"uses APPEND on a {type(target).__name__}, not a list")
        target.append(value)

    def _op_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not list:
            raise self.unsafe(f"uses APPENDS on a {type(target).__name__}, not a list")
        target.extend(items)

    def _op_empty_dict(self) -> None:
        self.stack.append({})

    def _op_dict(self) -> None:
        items = self.pop_mark()
        self.stack.append(self._fill({}, items, "DICT"))

    def _fill(self, target: Any, items: list[Any], op: str) -> Any:
        if type(target) is not dict and type(target) is not _OrderedDict:
            raise self.unsafe(f"uses {op} on a {type(target).__name__}, not a dict")
        if len(items) % 2:
            raise self.fail(f"gives {op} an odd number of items")
        for key, value in zip(items[::2], items[1::2], strict=True):
            target[key if type(key) is str else _key(key)] = value
        return target

    def _op_setitem(self) -> None:
        stack = self.stack
        value, key = stack.pop(), stack.pop()
        self._fill(stack[-1], [key, value], "SETITEM")

    def _op_setitems(self) -> None:
        items = self.pop_mark()
        self._fill(self.stack[-1], items, "SETITEMS")

    def _op_empty_set(self) -> None:
        self.stack.append(set())

    def _op_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise self.unsafe(f"uses ADDITEMS on a {type(target).__name__}, not a set")
        target.update(_key(item) for item in items)

    def _op_frozenset(self) -> None:
        items = self.pop_mark()
        self.stack.append(frozenset(_key(item) for item in items))

    # -- memo -------------------------------------------------------------------------------------
    def _get(self, index: int) -> None:
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise self.fail(f"reads memo entry {index}, which was never stored") from None

    def _op_binget(self) -> None:
        self._get(self.data[self.take(1)])

    def _op_long_binget(self) -> None:
        self._get(_U32(self.data, self.take(4))[0])

    def _op_binput(self) -> None:
        self._put(self.data[self.take(1)])

    def _op_long_binput(self) -> None:
        self._put(_U32(self.data, self.take(4))[0])

    def _put(self, index: int) -> None:
        """Memo indices come in order (pickle writes ``len(memo)``); a jump far past them is hostile."""
        if index > len(self.memo) + 1024:
            raise self.fail(f"stores memo entry {index} while it holds {len(self.memo)}")
        self.memo[index] = self.stack[-1]

    def _op_memoize(self) -> None:
        self.memo[len(self.memo)] = self.stack[-1]

    # -- globals, calls, persistent ids -----------------------------------------------------------
    def _resolve(self, module: Any, name: Any) -> Any:
        found = ALLOWED_GLOBALS.get((module, name)) if type(module) is type(name) is str else None
        if found is None:
            shown = f"{module}.{name}" if type(module) is type(name) is str else "a non-string global"
            raise self.unsafe(f"names the global {shown[:200]!r}, which is not on the allow-list")
        return found

    def _line(self) -> str:
        end = min(self.end, self.pos + 256)
        found = self.data.find(b"\n", self.pos, end)
        if found < 0:
            raise self.fail("has a GLOBAL without a line end")
        text = str(self.data[self.pos : found], "utf-8")
        self.pos = found + 1
        return text

    def _op_global(self) -> None:
        module = self._line()
        self.stack.append(self._resolve(module, self._line()))

    def _op_stack_global(self) -> None:
        name = self.stack.pop()
        self.stack[-1] = self._resolve(self.stack[-1], name)

    def _op_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if type(func) is not _Global or func.build is None:
            shown = func.name if isinstance(func, (_StorageType, _TorchDType)) else type(func).__name__
            raise self.unsafe(f"uses REDUCE to call {shown!r}, which is not an allow-listed function")
        if type(args) is not tuple:
            raise self.fail(f"calls {func.name} with {type(args).__name__} arguments, not a tuple")
        stack[-1] = func.build(args)

    def _op_binpersid(self) -> None:
        if self.persistent_load is None:
            raise self.unsafe("uses a persistent id where no storage can be")
        self.stack[-1] = self.persistent_load(self.stack[-1])

    def _op_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not _OrderedDict or type(state) not in (dict, _OrderedDict):
            raise self.unsafe(
                f"uses BUILD on a {type(target).__name__}; only a state dict's attributes may be set"
            )
        target.attributes = state


# ---------------------------------------------------------------------------------------------
# The two layouts: zip archive and legacy stream
# ---------------------------------------------------------------------------------------------


class _Storages:
    """The storages a pickle's persistent ids declare, one per key (shared storages are read once)."""

    def __init__(self, path: Path, legacy: bool) -> None:
        self.path, self.legacy = path, legacy
        self.pid_size = 6 if legacy else 5
        self.by_key: dict[str, _Storage] = {}

    def load(self, pid: Any) -> _Storage:
        path = self.path
        if type(pid) is not tuple or len(pid) != self.pid_size or pid[0] != "storage":
            raise UnsafeCheckpointError(
                f"{path} holds a persistent id that is not a storage reference ({type(pid).__name__} of "
                f"{len(pid) if type(pid) is tuple else '?'} items); nothing was imported or run.",
                file=path,
            )
        _, kind, key, _location, numel = pid[:5]
        if type(kind) is not _StorageType or type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(
                f"{path} holds a malformed storage reference (type, key, location, size); save it again.",
                file=path,
            )
        if not key.isdigit() and (not key or "/" in key or "\\" in key or key in (".", "..") or "\0" in key):
            raise UnsafeCheckpointError(
                f"{path} holds a storage reference to {key!r}, which is not a plain name inside the "
                f"archive's data/ folder (a path traversal); nothing was read from it.",
                file=path,
            )
        if self.legacy and pid[5] is not None:
            raise UnsupportedFormatError(
                f"{path} holds storage views (torch < 0.4); load it with torch and save it again.", file=path
            )
        found = self.by_key.get(key)
        if found is None:
            found = self.by_key[key] = _Storage(key, kind, numel)
        elif found.kind != kind or found.numel != numel:
            raise CheckpointError(
                f"{path} declares storage {key!r} twice with different types or sizes "
                f"({found.kind.name} x {found.numel}, {kind.name} x {numel}).",
                file=path,
            )
        return found


def _is_tar(data: Any, size: int) -> bool:
    return size >= 262 and data[257:262] == b"ustar"


def _open_map(path: Path) -> tuple[mmap.mmap, int, int]:
    """``(map, size, descriptor)``: the map for the pickle and the zip directory, the descriptor for the
    small reads scattered over the file (local headers, storage counts), which `os.pread` serves without
    mapping the pages around them (touching one header per storage would map nearly every page)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise UnsupportedFormatError(f"{path} is not a PyTorch checkpoint (it is empty).", file=path)
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), size, fd
    except BaseException:
        os.close(fd)
        raise


def _read_at(fd: int, position: int, count: int) -> bytes:
    try:
        return os.pread(fd, count, position) if position >= 0 else b""
    except OSError as error:
        raise CheckpointReadError(f"Reading a PyTorch checkpoint failed ({error}).") from None


# The zip directory: torch.save writes a plain zip (stored members, ZIP64 past 4 GiB); only the central
# directory is read, and only the fields a stored member needs.
_END = struct.Struct("<IHHHHIIH")  # end of central directory record, 22 bytes
_END64_LOCATOR = struct.Struct("<IIQI")  # ZIP64 end of central directory locator, 20 bytes
_END64 = struct.Struct("<IQ4xIIQQQQ")  # ZIP64 end of central directory record, 56 bytes
_CENTRAL = struct.Struct("<I4xHH8xIIHHH8xI")  # central directory entry, 46 bytes before its name
_LOCAL = struct.Struct("<I22xHH")  # local header, 30 bytes before its name and extra field
_EXTRA = struct.Struct("<HH")
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64 = 0xFFFFFFFF
"""A central entry's 32-bit size or offset that says: the real one is in the ZIP64 extra field."""


class _Member(NamedTuple):
    """One zip member as its central directory entry describes it."""

    name: str
    method: int
    flags: int
    header: int
    compressed: int
    size: int


def _zip_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid PyTorch checkpoint: its zip directory {what}. The file is truncated or "
        f"corrupt; save or download it again.",
        file=path,
    )


_SEVERAL_DISKS = "spans several disks, which torch.save never writes"


def _zip_end(path: Path, data: Any, size: int) -> tuple[int, int, int]:
    """``(entries, directory start, directory end)`` from the end records (ZIP64 ones included)."""
    last = size - _END.size  # where the end record starts if no comment follows it
    if last < 0:
        raise _zip_error(path, "is missing (the file is shorter than its end record)")
    first, stop = max(0, last - 0xFFFF), last + 4
    while True:  # the last signature whose comment length reaches the file's end exactly
        end = data.rfind(_END_SIGNATURE, first, stop)
        if end < 0:
            raise _zip_error(path, "has no end record")
        if end + _END.size + _U16(data, end + 20)[0] == size:
            break
        stop = end + 3
    _, disk, start_disk, disk_entries, entries, length, start, _ = _END.unpack_from(data, end)
    limit = end  # the directory lies before the end records
    locator = end - _END64_LOCATOR.size
    if locator >= 0 and _END64_LOCATOR.unpack_from(data, locator)[0] == 0x07064B50:
        _, end64_disk, end64, disks = _END64_LOCATOR.unpack_from(data, locator)
        if end64 > locator - _END64.size or _END64.unpack_from(data, end64)[0] != 0x06064B50:
            raise _zip_error(path, f"has no ZIP64 end record at byte {end64}, where its locator points")
        _, _, disk, start_disk, disk_entries, entries, length, start = _END64.unpack_from(data, end64)
        limit = end64
        if end64_disk != 0 or disks > 1:
            raise _zip_error(path, _SEVERAL_DISKS)
    if disk != 0 or start_disk != 0 or disk_entries != entries:
        raise _zip_error(path, _SEVERAL_DISKS)
    if start + length > limit or entries * _CENTRAL.size > length:
        raise _zip_error(
            path, f"claims {entries} entries in {length} bytes at byte {start}, past its end record"
        )
    return entries, start, start + length


def _zip64_sizes(path: Path, data: Any, member: _Member, extra: int, extra_end: int) -> _Member:
    """A member whose size, compressed size or header offset is in its ZIP64 extra field (in that order,
    each only if the 32-bit field is 0xFFFFFFFF)."""
    while extra + 4 <= extra_end:
        tag, length = _EXTRA.unpack_from(data, extra)
        extra += 4
        if extra + length > extra_end:
            break
        if tag == 1:
            values: list[int] = []
            for value in (member.size, member.compressed, member.header):
                if value == _ZIP64:
                    if length < 8:
                        raise _zip_error(path, f"has a short ZIP64 field for member {member.name}")
                    value = _U64(data, extra)[0]
                    extra, length = extra + 8, length - 8
                values.append(value)
            size, compressed, header = values
            return member._replace(size=size, compressed=compressed, header=header)
        extra += length
    raise _zip_error(path, f"gives member {member.name} ZIP64 sizes but no ZIP64 field for them")


def _zip_members(path: Path, data: Any, size: int) -> dict[str, _Member]:
    """Every member of a zip archive by name, from its central directory; no member is read."""
    entries, pos, end = _zip_end(path, data, size)
    members: dict[str, _Member] = {}
    unpack = _CENTRAL.unpack_from
    for _ in range(entries):
        if pos + _CENTRAL.size > end:
            raise _zip_error(path, f"ends inside entry {len(members)} of {entries}")
        signature, flags, method, compressed, length, name_len, extra_len, comment_len, header = unpack(
            data, pos
        )
        name_end = pos + _CENTRAL.size + name_len
        if signature != 0x02014B50 or name_end + extra_len + comment_len > end:
            raise _zip_error(path, f"has a malformed entry at byte {pos}")
        raw = data[pos + _CENTRAL.size : name_end]
        try:  # names are UTF-8 when flag bit 11 says so, else code page 437 (ASCII: either)
            name = str(raw, "utf-8") if flags & 0x800 or raw.isascii() else str(raw, "cp437")
        except UnicodeDecodeError:
            raise _zip_error(path, f"has a member name that is not UTF-8 ({raw[:100]!r})") from None
        member = _Member(name, method, flags, header, compressed, length)
        if _ZIP64 in (compressed, length, header):
            member = _zip64_sizes(path, data, member, name_end, name_end + extra_len)
        members[name] = member
        pos = name_end + extra_len + comment_len
    if len(members) != entries:
        raise _zip_error(path, "names a member twice (readers could disagree on which one is meant)")
    return members


def _member_start(path: Path, fd: int, size: int, member: _Member) -> int:
    """Where a stored member's bytes start: after its local header (30 bytes, name, extra field)."""
    if member.method != 0 or member.flags & 1:
        raise UnsafeCheckpointError(
            f"{path}: archive member {member.name} is compressed or encrypted; torch.save stores "
            f"members uncompressed, and jaxweights refuses others (a zip bomb could hide there). "
            f"Re-save the checkpoint with torch.save.",
            file=path,
        )
    header = member.header
    fits = header + _LOCAL.size <= size
    signature, name_len, extra_len = _LOCAL.unpack(_read_at(fd, header, _LOCAL.size)) if fits else (0, 0, 0)
    if signature != 0x04034B50:
        raise CheckpointError(
            f"{path}: archive member {member.name} has no local header at byte {header}; the file is "
            f"truncated or corrupt.",
            file=path,
        )
    start: int = header + _LOCAL.size + name_len + extra_len
    if start + member.size > size or member.compressed != member.size:
        raise CheckpointError(
            f"{path}: archive member {member.name} claims {member.size} bytes at byte {start}, "
            f"past the file's end ({size} bytes). The file is truncated; save or download it again.",
            file=path,
        )
    return start


def _read_zip(path: Path, data: Any, size: int, fd: int) -> tuple[Any, dict[str, _Storage], str]:
    members = _zip_members(path, data, size)
    pickles = sorted(name for name in members if name.endswith("/data.pkl") and name.count("/") == 1)
    if len(pickles) != 1:
        found = "no" if not pickles else f"{len(pickles)}"
        raise UnsupportedFormatError(
            f"{path} is a zip archive with {found} '<name>/data.pkl' member(s); it is not a checkpoint "
            f"written by torch.save.",
            file=path,
        )
    prefix = pickles[0][: -len("/data.pkl")]
    if f"{prefix}/constants.pkl" in members or any(name.startswith(f"{prefix}/code/") for name in members):
        raise UnsupportedFormatError(
            f"{path} is a TorchScript archive (torch.jit.save), which holds code. jaxweights reads "
            f"torch.save checkpoints only: load it with torch.jit.load and torch.save its state_dict().",
            file=path,
        )
    byteorder = "<"
    order = members.get(f"{prefix}/byteorder")
    if order is not None:
        start = _member_start(path, fd, size, order)
        text = bytes(data[start : start + min(order.size, 16)])
        if text not in (b"little", b"big"):
            raise CheckpointError(f"{path} has byteorder {text[:16]!r}; expected little or big.", file=path)
        byteorder = "<" if text == b"little" else ">"
    info = members[pickles[0]]
    start = _member_start(path, fd, size, info)
    storages = _Storages(path, legacy=False)
    pickled = bytes(data[start : start + info.size])  # a copy: the pickle may not read past its member
    root = _Unpickler(pickled, 0, path, storages.load, base=start).load()
    folder = f"{prefix}/data/"
    for key, storage in storages.by_key.items():
        member = members.get(folder + key)
        if member is None:
            raise CheckpointError(
                f"{path} has no storage {key!r} ({prefix}/data/{key}) that its pickle refers to. The "
                f"archive is incomplete; save it again.",
                file=path,
            )
        storage.start = _member_start(path, fd, size, member)
        if member.size != storage.nbytes:
            tensor = _first_user(root, key, path)
            raise CheckpointError(
                f"{path}: storage {key!r} (of tensor {tensor!r}) holds {member.size} bytes, but the "
                f"pickle declares {storage.numel} x {storage.kind.name} ({storage.nbytes} bytes). The "
                f"archive is corrupt; save it again.",
                file=path,
                tensor=tensor,
            )
    return root, storages.by_key, byteorder


def _first_user(root: Any, key: str, path: Path) -> str | None:
    """The name of the first tensor viewing storage ``key`` (for error messages)."""
    try:
        for name, value in _walk(root, path):
            if type(value) is _Tensor and value.storage.key == key:
                return name
    except CheckpointError:
        pass
    return None


def _read_legacy(path: Path, data: Any, size: int, fd: int) -> tuple[Any, dict[str, _Storage], str]:
    def plain(position: int, what: str) -> tuple[Any, int]:
        if position >= size or data[position] != 0x80:
            raise CheckpointError(
                f"{path} is not a valid legacy PyTorch checkpoint: {what} is missing.", file=path
            )
        unpickler = _Unpickler(data, position, path, None)
        return unpickler.load(), unpickler.pos

    magic, pos = plain(0, "the magic number")
    if magic != LEGACY_MAGIC:
        raise UnsupportedFormatError(
            f"{path} is a pickle, not a torch.save checkpoint (no PyTorch magic number). jaxweights "
            f"reads torch.save files only.",
            file=path,
        )
    protocol, pos = plain(pos, "the protocol version")
    if protocol != LEGACY_PROTOCOL:
        raise UnsupportedFormatError(
            f"{path} is a legacy PyTorch checkpoint of protocol {protocol!r}; jaxweights reads "
            f"{LEGACY_PROTOCOL}. Load it with torch and save it again.",
            file=path,
        )
    sys_info, pos = plain(pos, "the system information")
    if type(sys_info) is not dict or type(sys_info.get("little_endian")) is not bool:
        raise CheckpointError(
            f"{path}: its system information is not a dict saying little_endian.", file=path
        )
    byteorder = "<" if sys_info["little_endian"] else ">"
    storages = _Storages(path, legacy=True)
    unpickler = _Unpickler(data, pos, path, storages.load)
    root = unpickler.load()
    keys, pos = plain(unpickler.pos, "the list of storage keys")
    if (
        type(keys) is not list
        or sorted(map(str, keys)) != sorted(storages.by_key)
        or len(keys) != len(storages.by_key)
    ):
        raise CheckpointError(
            f"{path}: its list of storage keys does not match the storages its pickle declares. The file "
            f"is corrupt; save it again.",
            file=path,
        )
    count_format = "<Q" if byteorder == "<" else ">Q"
    for key in keys:
        storage = storages.by_key[key]
        if pos + 8 > size:
            raise CheckpointError(
                f"{path} ends before storage {key!r} (truncated); download it again.", file=path
            )
        (count,) = struct.unpack(count_format, _read_at(fd, pos, 8))
        if count != storage.numel:
            raise CheckpointError(
                f"{path}: storage {key!r} holds {count} elements, but the pickle declares {storage.numel}.",
                file=path,
            )
        storage.start = pos + 8
        pos = storage.start + storage.nbytes
        if pos > size:
            raise CheckpointError(
                f"{path} ends inside storage {key!r} ({pos} bytes needed, {size} present). The file is "
                f"truncated; download it again.",
                file=path,
            )
    return root, storages.by_key, byteorder


# ---------------------------------------------------------------------------------------------
# Tensors and names
# ---------------------------------------------------------------------------------------------


def _tensor_info(
    path: Path,
    name: str,
    tensor: _Tensor,
    byteorder: str,
    layouts: dict[tuple[int, ...], tuple[tuple[int, ...], int] | None],
) -> TensorInfo:
    """Checks a tensor's view against its storage; ``layouts`` caches each shape's C strides and size."""
    storage, offset, shape, strides, dtype, _ = tensor
    if dtype is None:
        raise DTypeError(
            f"Tensor {name!r} in {path} has element type {tensor.dtype_name}, which jaxweights cannot "
            f"represent (complex128, quantized and 4-bit packed torch types are not supported). Convert it "
            f"with torch (e.g. to complex64) before loading.",
            file=path,
            tensor=name,
        )
    itemsize = _ITEMSIZES[dtype]
    if shape in layouts:
        layout = layouts[shape]
    else:
        valid = all(d >= 0 for d in shape)
        layout = layouts[shape] = (c_strides(shape, 1), element_count(shape)) if valid else None
    if layout is not None and strides == layout[0] and offset >= 0:  # C-contiguous: the common case
        count = span = layout[1]
        contiguous = True
    else:
        if len(strides) != len(shape) or layout is None or any(s < 0 for s in strides) or offset < 0:
            raise CheckpointError(
                f"Tensor {name!r} in {path} has size {shape}, stride {strides} and offset {offset}, which "
                f"no tensor can have. The file is corrupt.",
                file=path,
                tensor=name,
            )
        expected, count = layout
        span = 0 if count == 0 else 1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        contiguous = all(d <= 1 or a == b for d, a, b in zip(shape, strides, expected, strict=True))
    if (offset + span) * itemsize > storage.nbytes:
        raise CheckpointError(
            f"Tensor {name!r} in {path} views elements {offset} to {offset + span} of storage "
            f"{storage.key!r}, which holds {storage.nbytes // itemsize} {dtype.name} elements. The file is "
            f"corrupt.",
            file=path,
            tensor=name,
        )
    start = storage.start + offset * itemsize
    if contiguous:
        return TensorInfo(name, dtype, shape, path, start, start + count * itemsize, None, byteorder)
    return TensorInfo(name, dtype, shape, path, start, start + span * itemsize, None, byteorder, strides)


_LEAF_TYPES = frozenset((str, int, float, bool))
"""Plain values that become metadata (so does None)."""


def _walk(root: Any, path: Path) -> list[tuple[str, Any]]:
    """``(dotted name, tensor or plain value)`` for every leaf under ``root``, in the pickle's order."""
    found: list[tuple[str, Any]] = []
    todo: list[tuple[str, Iterator[tuple[Any, Any]]]] = []  # open containers: name prefix, children left
    name, value, visited = "", root, 0
    while True:
        visited += 1
        if visited > MAX_LEAVES or len(todo) > MAX_DEPTH:
            raise CheckpointError(
                f"{path} nests its objects deeper than {MAX_DEPTH} or names more than {MAX_LEAVES} "
                f"objects (counting shared ones again); it is not a checkpoint torch.save would write.",
                file=path,
            )
        kind = type(value)
        if kind is _Tensor or value is None or kind in _LEAF_TYPES:
            found.append((name, value))
        elif kind is _TorchDType:
            found.append((name, f"torch.{value.name}"))
        elif isinstance(value, dict):
            todo.append((f"{name}." if name else "", iter(value.items())))
        elif kind is list or kind is tuple:
            todo.append((f"{name}." if name else "", enumerate(value)))
        # else: bytes, sets, storages on their own: neither tensors nor metadata
        while todo:
            prefix, children = todo[-1]
            child = next(children, None)
            if child is not None:
                name, value = f"{prefix}{child[0]}", child[1]
                break
            todo.pop()
        else:
            return found


def read_torch(path: Path) -> tuple[list[TensorInfo], dict[str, Any], int]:
    """Parses and validates one ``torch.save`` file without reading a storage byte.

    Returns:
        The tensors in the pickle's order, the non-tensor leaves by dotted name, and the file size.

    Raises:
        UnsafeCheckpointError: the pickle names a global off the allow-list or an opcode that builds
            arbitrary objects; nothing it names was imported or run.
        UnsupportedFormatError: a TorchScript archive, the old tar format, compressed members.
        CheckpointError: the file is truncated or malformed.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "tiny.pt"
        >>> _ = path.write_bytes(b"\\x80\\x02cos\\nsystem\\n.")  # a pickle that would call os.system
        >>> read_torch(path)
        Traceback (most recent call last):
        jaxweights.errors.UnsafeCheckpointError: ... names the global 'os.system', which is not on the allow-list ...
    """
    with gc_paused():  # tens of thousands of small objects, no cycles: see gc_paused
        return _read_file(path)


def _read_file(path: Path) -> tuple[list[TensorInfo], dict[str, Any], int]:
    data, size, fd = _open_map(path)
    try:
        if _is_tar(data, size):
            raise UnsupportedFormatError(
                f"{path} is in PyTorch's old tar format (torch < 0.4), which jaxweights does not read. "
                f"Load it with torch and save it again.",
                file=path,
            )
        if data[:4] == _ZIP_MAGIC:
            root, storages, byteorder = _read_zip(path, data, size, fd)
        elif data[0] == 0x80:
            root, storages, byteorder = _read_legacy(path, data, size, fd)
        else:
            raise UnsupportedFormatError(
                f"{path} is not a PyTorch checkpoint (it starts with {bytes(data[:8])!r}).", file=path
            )
    finally:
        data.close()
        os.close(fd)
    if any(storage.start < 0 for storage in storages.values()):  # pragma: no cover - located above
        raise CheckpointError(f"{path} has a storage that could not be located.", file=path)
    tensors: list[TensorInfo] = []
    metadata: dict[str, Any] = {}
    layouts: dict[tuple[int, ...], tuple[tuple[int, ...], int] | None] = {}
    for name, value in _walk(root, path):
        if type(value) is _Tensor:
            tensors.append(_tensor_info(path, name, value, byteorder, layouts))
        else:
            metadata[name] = value
    return tensors, metadata, size


# ---------------------------------------------------------------------------------------------
# Several files, the index, the plug-in
# ---------------------------------------------------------------------------------------------


def open_torch(paths: Sequence[Path]) -> Checkpoint:
    """Opens ``torch.save`` files and ``pytorch_model.bin.index.json`` indexes as one `Checkpoint`.

    Raises:
        DuplicateTensorError: a name appears in two files and no index says which holds it.
        CheckpointNotFoundError: an index names a file that does not exist.
        UnsafeCheckpointError, UnsupportedFormatError, CheckpointError: see `read_torch`.
    """
    with gc_paused():
        return open_files(paths, WeightsFormat.pytorch, read_torch)


def _legacy_head(head: bytes) -> bool:
    """A pickle (protocol 2 to 5) whose first object is the legacy magic number, as far as ``head`` shows;
    a safetensors header length of 0x280 also starts with b"\\x80\\x02", but not with the magic."""
    if len(head) < 4 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    rest = head[11:] if head[2:3] == b"\x95" else head[2:]  # skip a protocol-4 FRAME
    expected = b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
    shown = min(len(rest), len(expected))
    return shown >= 2 and rest[:shown] == expected[:shown]


def sniff(head: bytes, path: Path) -> bool:
    """True for a ``torch.save`` zip archive, a legacy pickle (protocol 2 to 5), the old tar format, or
    a JSON index named ``*.bin.index.json``.

    Example:
        >>> sniff(b"PK\\x03\\x04", Path("m.pt")), sniff(b"\\x80\\x02\\x8a\\x0a", Path("m.bin")), sniff(b"{", Path("m.json"))
        (True, True, False)
    """
    if head[:4] == _ZIP_MAGIC or _legacy_head(head):
        return True
    if head.startswith(_TAR_NAMES):
        return True
    return path.name.endswith(INDEX_SUFFIXES) and head.lstrip()[:1] == b"{"


def weight_files(folder: Path) -> list[Path]:
    """``pytorch_model.bin.index.json`` (or the one ``*.bin.index.json``) in a folder, else its
    ``*.bin``, ``*.pt`` and ``*.pth`` files, sorted."""
    indexes = sorted(path for path in folder.iterdir() if path.name.endswith(INDEX_SUFFIXES))
    if folder / INDEX_NAME in indexes:
        return [folder / INDEX_NAME]
    if len(indexes) == 1:
        return indexes
    if len(indexes) > 1:
        raise UnsupportedFormatError(
            f"{folder} holds several indexes ({', '.join(p.name for p in indexes)}); pass the one you "
            f"want to load.",
            file=folder,
        )
    return sorted(p for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth")) and p.is_file())


PLUGIN = FormatPlugin(
    name=WeightsFormat.pytorch,
    title="PyTorch",
    suffixes=(".bin", ".pt", ".pth", ".bin.index.json"),
    sniff=sniff,
    expand=weight_files,
    open=open_torch,
)
