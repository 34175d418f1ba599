"""Security of the PyTorch reader (jaxweights/formats/torch.py): every hostile checkpoint of issue 10 is
refused with a jaxweights error, and no code it names ever runs.

Hostile checkpoints are built byte by byte: pickles from single opcodes (`op`, `call`, `tensor`, ...),
wrapped in a torch.save-like zip (`zip_checkpoint`) or the legacy layout (`legacy_checkpoint`). Every
payload, if executed, creates the file `marker`; `test_payloads_are_live` proves that each one does under
the standard unpickler, so a test that finds no marker shows the reader ran nothing.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights.errors import CheckpointError, UnsafeCheckpointError, WeightsError
from jaxweights.formats.torch import read_torch

NAME = "layer.weight"
"""The tensor name every hand-built checkpoint uses; structural errors must name it."""

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# -- pickle opcodes, one value at a time ---------------------------------------------------------------
class op:  # noqa: N801 - a namespace of opcode bytes, read like the pickletools names
    PROTO2 = b"\x80\x02"
    PROTO4 = b"\x80\x04"
    MARK = b"("
    STOP = b"."
    TUPLE = b"t"
    TUPLE1 = b"\x85"
    EMPTY_TUPLE = b")"
    EMPTY_DICT = b"}"
    EMPTY_LIST = b"]"
    SETITEM = b"s"
    SETITEMS = b"u"
    APPEND = b"a"
    APPENDS = b"e"
    REDUCE = b"R"
    BUILD = b"b"
    BINPERSID = b"Q"
    PERSID = b"P"
    STACK_GLOBAL = b"\x93"
    INST = b"i"
    OBJ = b"o"
    NEWOBJ = b"\x81"
    NEWOBJ_EX = b"\x92"
    EXT1 = b"\x82"
    EXT2 = b"\x83"
    EXT4 = b"\x84"
    NEWFALSE = b"\x89"
    NONE = b"N"
    POP = b"0"


def text(value: str) -> bytes:
    """BINUNICODE: a str with a 4-byte length."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def binbytes(value: bytes) -> bytes:
    """BINBYTES: bytes with a 4-byte length."""
    return b"B" + struct.pack("<I", len(value)) + value


def integer(value: int) -> bytes:
    """BININT for 32-bit values, else LONG1."""
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def put(index: int) -> bytes:
    return b"q" + bytes([index])


def get(index: int) -> bytes:
    return b"h" + bytes([index])


def glob(module: str, name: str) -> bytes:
    """GLOBAL: ``module\\nname\\n``."""
    return b"c" + f"{module}\n{name}\n".encode()


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL: the two names as strings, then the opcode."""
    return text(module) + text(name) + op.STACK_GLOBAL


def tup(*items: bytes) -> bytes:
    return op.MARK + b"".join(items) + op.TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` with REDUCE."""
    return func + tup(*args) + op.REDUCE


def document(value: bytes, proto: bytes = op.PROTO2) -> bytes:
    """A whole pickle of one value."""
    return proto + value + op.STOP


def state_dict(entries: Mapping[str, bytes], proto: bytes = op.PROTO2) -> bytes:
    """A pickle of a dict from names to the values the given opcodes push."""
    items = b"".join(text(key) + value for key, value in entries.items())
    return document(op.EMPTY_DICT + op.MARK + items + op.SETITEMS, proto)


def storage(key: str, numel: int, storage_type: str = "FloatStorage", *, legacy: bool = False) -> bytes:
    """The persistent id torch.save writes for a storage: ("storage", type, key, location, numel), and in
    the legacy layout a sixth item, the view metadata (None)."""
    fields = [text("storage"), glob("torch", storage_type), text(key), text("cpu"), integer(numel)]
    return tup(*fields, *([op.NONE] if legacy else [])) + op.BINPERSID


def tensor(
    key: str = "0",
    numel: int = 6,
    offset: int = 0,
    size: Sequence[int] = (2, 3),
    stride: Sequence[int] = (3, 1),
    storage_type: str = "FloatStorage",
    hooks: bytes | None = None,
    legacy: bool = False,
) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    if hooks is None:
        hooks = call(glob("collections", "OrderedDict"))
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage(key, numel, storage_type, legacy=legacy),
        integer(offset),
        tup(*map(integer, size)),
        tup(*map(integer, stride)),
        op.NEWFALSE,
        hooks,
    )


def floats(count: int) -> bytes:
    return np.arange(count, dtype="<f4").tobytes()


# -- containers --------------------------------------------------------------------------------------
def zip_checkpoint(
    path: Path,
    pickle_bytes: bytes,
    members: Mapping[str, bytes] | None = None,
    *,
    compress: bool = False,
    prefix: str = "archive",
    raw_members: Mapping[str, bytes] | None = None,
) -> Path:
    """A zip archive laid out like torch.save's: ``<prefix>/data.pkl``, ``<prefix>/data/<key>`` for each of
    `members`, ``<prefix>/version``, ``<prefix>/byteorder``; stored (data members 64-byte aligned, as
    torch aligns them) unless `compress`. `raw_members` are written under exactly the names given."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    entries = [(f"{prefix}/data.pkl", pickle_bytes)]
    entries += [(f"{prefix}/data/{key}", data) for key, data in (members or {}).items()]
    entries += [(f"{prefix}/version", b"3\n"), (f"{prefix}/byteorder", b"little")]
    entries += list((raw_members or {}).items())
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            header = 30 + len(name.encode())
            offset = archive.fp.tell() if archive.fp is not None else 0
            padding = -(offset + header + 4) % 64
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            archive.writestr(info, data)
    return path


def legacy_checkpoint(
    path: Path,
    main_pickle_bytes: bytes,
    keys: Sequence[str],
    storages: Sequence[tuple[int, bytes]],
    *,
    magic: bytes | None = None,
    protocol: bytes | None = None,
    sys_info: bytes | None = None,
    keys_pickle: bytes | None = None,
) -> Path:
    """The legacy (non-zip) torch.save layout: magic-number pickle, protocol pickle (1001), sys_info
    pickle, the main pickle, a pickle of the storage keys, then each storage as (element count as 8-byte
    little-endian, raw bytes). Any of the leading pickles can be replaced by hostile bytes."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [
        magic if magic is not None else pickle.dumps(LEGACY_MAGIC, protocol=2),
        protocol if protocol is not None else pickle.dumps(1001, protocol=2),
        sys_info if sys_info is not None else pickle.dumps(info, protocol=2),
        main_pickle_bytes,
        keys_pickle if keys_pickle is not None else pickle.dumps(list(keys), protocol=2),
    ]
    parts += [struct.pack("<q", count) + data for count, data in storages]
    path.write_bytes(b"".join(parts))
    return path


def load_all(path: Path) -> dict[str, np.ndarray]:
    """Opens a checkpoint and reads every tensor (errors may come from the open or from a read)."""
    return {name: np.array(acc.data().data) for name, acc in jw.load_weights(path).items()}


# -- payloads: each pushes one value; executed, it creates the marker ---------------------------------
Payload = Callable[[Path], bytes]


def touch(marker: Path) -> bytes:
    return text(f"touch {marker}")


def os_system(marker: Path) -> bytes:
    return call(glob("os", "system"), touch(marker))


def posix_system(marker: Path) -> bytes:
    return call(glob("posix", "system"), touch(marker))


def builtins_exec(marker: Path) -> bytes:
    return call(glob("builtins", "exec"), text(f"open({str(marker)!r}, 'w').close()"))


def builtins_getattr(marker: Path) -> bytes:
    """``getattr(__import__("os"), "system")("touch marker")``."""
    os_module = call(glob("builtins", "__import__"), text("os"))
    return call(call(glob("builtins", "getattr"), os_module, text("system")), touch(marker))


def stack_os_system(marker: Path) -> bytes:
    return call(stack_glob("os", "system"), touch(marker))


def stack_builtins_exec(marker: Path) -> bytes:
    return call(stack_glob("builtins", "exec"), text(f"open({str(marker)!r}, 'w').close()"))


def load_from_bytes(marker: Path) -> bytes:
    """``torch.storage._load_from_bytes(b)``: torch.load(b, weights_only=False) of a pickle running os.system."""
    return call(glob("torch.storage", "_load_from_bytes"), binbytes(document(os_system(marker))))


def inst(marker: Path) -> bytes:
    """INST: ``(<args> ios\\nsystem\\n`` calls os.system(args) with no GLOBAL or REDUCE."""
    return op.MARK + touch(marker) + op.INST + b"os\nsystem\n"


def obj(marker: Path) -> bytes:
    """OBJ: ``(<callable> <args> o``."""
    return op.MARK + glob("os", "system") + touch(marker) + op.OBJ


PAYLOADS: dict[str, Payload] = {
    "os.system": os_system,
    "posix.system": posix_system,
    "builtins.exec": builtins_exec,
    "builtins.getattr": builtins_getattr,
    "stack os.system": stack_os_system,
    "stack builtins.exec": stack_builtins_exec,
    "torch.storage._load_from_bytes": load_from_bytes,
    "INST": inst,
    "OBJ": obj,
}

GLOBAL_NAMES = {
    "os.system": r"os\.system",
    "posix.system": r"posix\.system",
    "builtins.exec": r"builtins\.exec",
    "builtins.getattr": r"builtins\.(getattr|__import__)",
    "stack os.system": r"os\.system",
    "stack builtins.exec": r"builtins\.exec",
    "torch.storage._load_from_bytes": r"torch\.storage\._load_from_bytes",
    "INST": r"INST",
    "OBJ": r"OBJ|os\.system",
}
"""What the refusal must name, per payload."""


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


def _proto(payload: str) -> bytes:
    return op.PROTO4 if payload.startswith("stack") else op.PROTO2


# -- controls ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payloads_are_live(payload: str, marker: Path) -> None:
    """The standard unpickler runs every payload: a missing marker below means the reader ran nothing."""
    if payload == "torch.storage._load_from_bytes":
        pytest.importorskip("torch")
        # torch.load runs the inner pickle as the magic number, then finds it is not the magic number
        with pytest.raises(RuntimeError, match="magic number"):
            pickle.loads(document(PAYLOADS[payload](marker), _proto(payload)))
    else:
        pickle.loads(document(PAYLOADS[payload](marker), _proto(payload)))
    assert marker.exists()


@pytest.mark.parametrize("new_zipfile", [True, False])
def test_torch_save_loads(tmp_path: Path, new_zipfile: bool) -> None:
    """Positive control: a real torch.save of a small state dict loads, values equal."""
    torch = pytest.importorskip("torch")
    values = {
        "layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "layer.bias": torch.tensor([1, -2, 3], dtype=torch.int64),
        "half": torch.linspace(0, 1, 5, dtype=torch.float16),
        "param": torch.nn.Parameter(torch.ones(4)),
    }
    path = tmp_path / "model.pt"
    torch.save(values, path, _use_new_zipfile_serialization=new_zipfile)
    loaded = load_all(path)
    assert sorted(loaded) == sorted(values)
    for name, value in values.items():
        np.testing.assert_array_equal(loaded[name], value.detach().numpy())


def test_hand_built_zip_loads(tmp_path: Path) -> None:
    """Control for the helpers: a well-formed hand-built zip checkpoint loads, so refusals below are real."""
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: tensor()}), {"0": floats(6)})
    np.testing.assert_array_equal(load_all(path)[NAME], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_hand_built_legacy_loads(tmp_path: Path) -> None:
    """Control for the helpers: a well-formed hand-built legacy checkpoint loads."""
    path = legacy_checkpoint(
        tmp_path / "m.bin", state_dict({NAME: tensor(legacy=True)}), ["0"], [(6, floats(6))]
    )
    np.testing.assert_array_equal(load_all(path)[NAME], np.arange(6, dtype=np.float32).reshape(2, 3))


# -- globals off the allow-list ------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [name for name in PAYLOADS if name not in ("INST", "OBJ")])
def test_global_off_allow_list_refused_in_zip(payload: str, tmp_path: Path, marker: Path) -> None:
    pickle_bytes = state_dict({NAME: PAYLOADS[payload](marker)}, _proto(payload))
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes)
    with pytest.raises(UnsafeCheckpointError, match=GLOBAL_NAMES[payload]):
        load_all(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["magic", "protocol", "sys_info", "main", "keys_pickle"])
def test_global_off_allow_list_refused_in_every_legacy_pickle(
    where: str, tmp_path: Path, marker: Path
) -> None:
    """torch.load unpickles all five leading pickles of a legacy file; each is a place to hide code."""
    hostile = document(os_system(marker))
    main = hostile if where == "main" else state_dict({NAME: tensor(legacy=True)})
    heads = {where: hostile} if where != "main" else {}
    path = legacy_checkpoint(tmp_path / "m.bin", main, ["0"], [(6, floats(6))], **heads)  # type: ignore[arg-type]
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        load_all(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch._utils", "_rebuild_tensor_v2.__globals__"),
        ("torch", "os.system"),
        ("torch._utils", "os"),
        ("torch.serialization", "load"),
        ("torch", "load"),
        ("collections", "OrderedDict.__init__"),
        ("__builtin__", "eval"),
        ("subprocess", "Popen"),
        ("nt", "system"),
        ("torch._utils\nos", "system"),
    ],
)
@pytest.mark.parametrize("stack", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
def test_near_miss_globals_refused(module: str, name: str, stack: bool, tmp_path: Path, marker: Path) -> None:
    """Names that only look allowed (dotted attributes of allowed names, torch's own loaders) are refused."""
    if not stack and "\n" in module:
        pytest.skip("GLOBAL cannot carry a newline in its module name")
    func = stack_glob(module, name) if stack else glob(module, name)
    pickle_bytes = state_dict({NAME: call(func, touch(marker))}, op.PROTO4 if stack else op.PROTO2)
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes)
    with pytest.raises(UnsafeCheckpointError):
        load_all(path)
    assert not marker.exists()


def test_payload_hidden_in_real_torch_pickle(tmp_path: Path, marker: Path) -> None:
    """A real torch.save pickle whose backward-hooks argument is os.system(...) instead of OrderedDict()."""
    torch = pytest.importorskip("torch")
    real = _torch_zip_pickle(torch, tmp_path)
    hooks = b"ccollections\nOrderedDict\nq\n)R"
    assert real.count(hooks) == 1
    hostile = real.replace(hooks, b"cos\nsystem\nq\n" + touch(marker) + op.TUPLE1 + op.REDUCE)
    path = zip_checkpoint(tmp_path / "m.pt", hostile, {"0": floats(6)})
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        load_all(path)
    assert not marker.exists()


# -- REDUCE on anything but the rebuild functions ------------------------------------------------------
@pytest.mark.parametrize(
    "func",
    [
        glob("torch", "FloatStorage"),
        glob("torch", "float32"),
        glob("torch", "Size") + tup(integer(2)) + op.TUPLE1 + op.REDUCE,  # a Size instance, called
        text("os.system"),
        op.EMPTY_DICT,
        storage("0", 6),
        tensor(),
    ],
    ids=["storage-type", "dtype", "size-instance", "str", "dict", "storage", "tensor"],
)
def test_reduce_on_non_rebuild_refused(func: bytes, tmp_path: Path, marker: Path) -> None:
    pickle_bytes = state_dict({NAME: call(func, touch(marker))})
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes, {"0": floats(6)})
    with pytest.raises(UnsafeCheckpointError):
        load_all(path)
    assert not marker.exists()


# -- opcodes that build arbitrary objects --------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "opcode"),
    [
        (inst, "INST"),
        (obj, r"OBJ|os\.system"),  # the GLOBAL it calls is refused first
        (lambda m: glob("collections", "OrderedDict") + op.EMPTY_TUPLE + op.NEWOBJ, "NEWOBJ"),
        (lambda m: glob("os", "system") + tup(touch(m)) + op.NEWOBJ, "NEWOBJ|os\\.system"),
        (
            lambda m: glob("collections", "OrderedDict") + op.EMPTY_TUPLE + op.EMPTY_DICT + op.NEWOBJ_EX,
            "NEWOBJ_EX",
        ),
        (lambda m: op.EXT1 + b"\x01", "EXT1"),
        (lambda m: op.EXT2 + b"\x01\x00", "EXT2"),
        (lambda m: op.EXT4 + b"\x01\x00\x00\x00", "EXT4"),
    ],
    ids=["INST", "OBJ", "NEWOBJ", "NEWOBJ-os", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"],
)
def test_object_building_opcodes_refused(value: Payload, opcode: str, tmp_path: Path, marker: Path) -> None:
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value(marker)}, op.PROTO4))
    with pytest.raises(UnsafeCheckpointError, match=opcode):
        load_all(path)
    assert not marker.exists()


# -- BUILD, SETITEM, APPEND on the wrong things -------------------------------------------------------
@pytest.mark.parametrize(
    "target",
    [
        glob("collections", "OrderedDict"),
        glob("torch", "FloatStorage"),
        glob("torch._utils", "_rebuild_tensor_v2"),
    ],
    ids=["OrderedDict-class", "storage-class", "rebuild-function"],
)
def test_build_on_class_refused(target: bytes, tmp_path: Path, marker: Path) -> None:
    """BUILD on a class or function would set its attributes (``__reduce__``, ``__setstate__``) for all."""
    state = op.EMPTY_DICT + text("__setstate__") + glob("os", "system") + op.SETITEM
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: target + state + op.BUILD}))
    with pytest.raises(UnsafeCheckpointError):
        load_all(path)
    assert not marker.exists()


def test_build_with_non_dict_state_refused(tmp_path: Path, marker: Path) -> None:
    """BUILD on an OrderedDict is torch's ``_metadata``; with state that is not a dict it is refused."""
    target = call(glob("collections", "OrderedDict"))
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: target + touch(marker) + op.BUILD}))
    with pytest.raises(CheckpointError):
        load_all(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        text("abc") + text("k") + integer(1) + op.SETITEM,
        integer(7) + text("k") + integer(1) + op.SETITEM,
        glob("collections", "OrderedDict") + text("k") + integer(1) + op.SETITEM,
        tensor() + text("k") + integer(1) + op.SETITEM,
        storage("0", 6) + text("k") + integer(1) + op.SETITEM,
        op.EMPTY_TUPLE + op.MARK + text("k") + integer(1) + op.SETITEMS,
        op.EMPTY_LIST + text("k") + integer(1) + op.SETITEM,
        op.EMPTY_DICT + integer(1) + op.APPEND,
        text("abc") + integer(1) + op.APPEND,
        op.EMPTY_TUPLE + op.MARK + integer(1) + op.APPENDS,
        glob("torch", "Size") + integer(1) + op.APPEND,
    ],
    ids=[
        "setitem-str",
        "setitem-int",
        "setitem-class",
        "setitem-tensor",
        "setitem-storage",
        "setitems-tuple",
        "setitem-list",
        "append-dict",
        "append-str",
        "appends-tuple",
        "append-class",
    ],
)
def test_setitem_append_on_non_container_refused(value: bytes, tmp_path: Path, marker: Path) -> None:
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}), {"0": floats(6)})
    with pytest.raises(CheckpointError):
        load_all(path)
    assert not marker.exists()


# -- persistent ids ----------------------------------------------------------------------------------
def _pid(*fields: bytes) -> bytes:
    return tup(*fields) + op.BINPERSID


FLOAT_STORAGE = glob("torch", "FloatStorage")


@pytest.mark.parametrize(
    ("pid", "error"),
    [
        (text("0") + op.BINPERSID, UnsafeCheckpointError),
        (_pid(text("module"), FLOAT_STORAGE, text("0"), text("cpu"), integer(6)), UnsafeCheckpointError),
        (
            _pid(text("storage"), glob("collections", "OrderedDict"), text("0"), text("cpu"), integer(6)),
            CheckpointError,  # an allowed global as the type: malformed, not hostile
        ),
        (
            _pid(text("storage"), glob("os", "system"), text("0"), text("cpu"), integer(6)),
            UnsafeCheckpointError,
        ),
        (
            _pid(text("storage"), text("FloatStorage"), text("0"), text("cpu"), integer(6)),
            CheckpointError,
        ),
        (op.PERSID + b"0\n", UnsafeCheckpointError),
        (_pid(text("storage"), FLOAT_STORAGE, integer(0), text("cpu"), integer(6)), CheckpointError),
        (_pid(text("storage")), CheckpointError),
        (_pid(text("storage"), FLOAT_STORAGE, text("0"), text("cpu"), text("6")), CheckpointError),
    ],
    ids=[
        "bare-str",
        "not-storage",
        "ordereddict-type",
        "os-system-type",
        "str-type",
        "PERSID",
        "int-key",
        "short-tuple",
        "str-numel",
    ],
)
def test_persistent_id_not_a_storage_refused(
    pid: bytes, error: type[CheckpointError], tmp_path: Path, marker: Path
) -> None:
    value = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        pid,
        integer(0),
        tup(integer(6)),
        tup(integer(1)),
        op.NEWFALSE,
        call(glob("collections", "OrderedDict")),
    )
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}), {"0": floats(6)})
    with pytest.raises(error):
        load_all(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "key", ["../data.pkl", "../version", "../../etc/passwd", "/etc/passwd", "0/../../data.pkl", ".."]
)
def test_storage_key_outside_data_refused(key: str, tmp_path: Path) -> None:
    """A key must name a member directly under ``data/``; ``../data.pkl`` exists in the archive but is not a
    storage, and an extra member named ``archive/data/../data.pkl`` is there to be found by a naive join."""
    raw = {f"archive/data/{key}": floats(6)}
    path = zip_checkpoint(
        tmp_path / "m.pt", state_dict({NAME: tensor(key=key)}), {"0": floats(6)}, raw_members=raw
    )
    with pytest.raises(UnsafeCheckpointError, match=re.escape(key)):
        load_all(path)


@pytest.mark.parametrize("key", ["", "0\x00", "1"])
def test_storage_key_without_member_refused(key: str, tmp_path: Path) -> None:
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: tensor(key=key)}), {"0": floats(6)})
    with pytest.raises(CheckpointError):
        load_all(path)


def test_real_torch_pickle_with_traversal_key_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    real = _torch_zip_pickle(torch, tmp_path)
    hostile = real.replace(text("0"), text("../../etc/passwd"), 1)
    assert hostile != real
    path = zip_checkpoint(tmp_path / "m.pt", hostile, {"0": floats(6)})
    with pytest.raises(UnsafeCheckpointError, match=re.escape("../../etc/passwd")):
        load_all(path)


def test_legacy_key_not_listed_refused(tmp_path: Path) -> None:
    """In the legacy layout a storage key must be one of the listed keys."""
    path = legacy_checkpoint(
        tmp_path / "m.bin", state_dict({NAME: tensor(key="../1", legacy=True)}), ["0"], [(6, floats(6))]
    )
    with pytest.raises(CheckpointError):
        load_all(path)


# -- sizes that do not add up ----------------------------------------------------------------------------
@pytest.mark.parametrize(("numel", "member_floats"), [(7, 6), (6, 5), (6, 7), (2**40, 6)])
def test_storage_size_disagrees_with_member(numel: int, member_floats: int, tmp_path: Path) -> None:
    value = tensor(numel=numel, size=(6,), stride=(1,))
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}), {"0": floats(member_floats)})
    with pytest.raises(CheckpointError, match=re.escape(NAME)):
        load_all(path)


def test_real_torch_pickle_with_inflated_storage_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    real = _torch_zip_pickle(torch, tmp_path)
    numel = text("cpu") + put(6) + b"K\x06" + op.TUPLE
    assert real.count(numel) == 1
    hostile = real.replace(numel, text("cpu") + put(6) + integer(1 << 20) + op.TUPLE)
    path = zip_checkpoint(tmp_path / "m.pt", hostile, {"0": floats(6)})
    with pytest.raises(CheckpointError, match=r"\bw\b"):
        load_all(path)


@pytest.mark.parametrize(("count", "data_floats"), [(7, 6), (2**40, 6), (-1, 6), (2**63 - 1, 6)])
def test_legacy_storage_count_disagrees(count: int, data_floats: int, tmp_path: Path) -> None:
    """The legacy count is followed by fewer bytes than it claims (or is negative)."""
    main = state_dict({NAME: tensor(numel=6, size=(6,), stride=(1,), legacy=True)})
    path = legacy_checkpoint(tmp_path / "m.bin", main, ["0"], [(count, floats(data_floats))])
    with pytest.raises(CheckpointError):
        load_all(path)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (1, (2, 3), (3, 1)),  # one element past the end
        (0, (3, 3), (3, 1)),  # too many rows
        (0, (2, 3), (4, 1)),  # stride reaches past the end
        (6, (1,), (1,)),  # offset at the end
        (-1, (2, 3), (3, 1)),  # negative offset
        (0, (2, -3), (3, 1)),  # negative size
        (5, (2, 3), (-3, -1)),  # negative strides
        (0, (2**31, 2**31), (2**31, 1)),  # extent overflows int64 arithmetic in C-like readers
        (2**62, (1,), (1,)),  # offset * itemsize overflows int64
    ],
    ids=[
        "offset",
        "rows",
        "stride",
        "offset-end",
        "neg-offset",
        "neg-size",
        "neg-stride",
        "huge",
        "huge-offset",
    ],
)
def test_view_out_of_bounds(
    offset: int, size: tuple[int, ...], stride: tuple[int, ...], tmp_path: Path
) -> None:
    value = tensor(offset=offset, size=size, stride=stride)
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}), {"0": floats(6)})
    with pytest.raises(CheckpointError, match=re.escape(NAME)):
        load_all(path)


# -- length claims, memo abuse ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        b"X" + struct.pack("<I", 0xFFFFFFFF) + b"abc",  # BINUNICODE of 4 GiB
        b"B" + struct.pack("<I", 0xFFFFFFFF) + b"abc",  # BINBYTES of 4 GiB
        b"\x8d" + struct.pack("<Q", 1 << 60) + b"abc",  # BINUNICODE8
        b"\x8e" + struct.pack("<Q", 1 << 60) + b"abc",  # BINBYTES8
        b"\x96" + struct.pack("<Q", 1 << 60) + b"abc",  # BYTEARRAY8
        b"\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"\x01",  # LONG4 of 2 GiB
        b"T" + struct.pack("<I", 0xFFFFFFFF) + b"abc",  # BINSTRING
        b"\x8c\xff" + b"abc",  # SHORT_BINUNICODE past the end
        b"\x95" + struct.pack("<Q", 1 << 40) + text("x"),  # FRAME of a TiB
    ],
    ids=[
        "BINUNICODE",
        "BINBYTES",
        "BINUNICODE8",
        "BINBYTES8",
        "BYTEARRAY8",
        "LONG4",
        "BINSTRING",
        "short",
        "FRAME",
    ],
)
def test_huge_length_claims_refused(value: bytes, tmp_path: Path) -> None:
    pickle_bytes = op.PROTO4 + op.EMPTY_DICT + text(NAME) + value + op.SETITEM + op.STOP
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes)
    with pytest.raises(CheckpointError):
        load_all(path)


def test_huge_length_claim_in_legacy_keys_pickle(tmp_path: Path) -> None:
    keys = op.PROTO2 + op.EMPTY_LIST + b"X" + struct.pack("<I", 0xFFFFFFF0) + b"0" + op.APPEND + op.STOP
    path = legacy_checkpoint(
        tmp_path / "m.bin", state_dict({NAME: tensor(legacy=True)}), ["0"], [(6, floats(6))], keys_pickle=keys
    )
    with pytest.raises(CheckpointError):
        load_all(path)


@pytest.mark.parametrize("index", [0xFFFFFFFF, 0x7FFFFFFF, 1 << 28])
def test_long_binput_huge_memo_index_refused(index: int, tmp_path: Path) -> None:
    """LONG_BINPUT of a huge index must not size a memo list to it."""
    value = tensor() + b"r" + struct.pack("<I", index)
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}), {"0": floats(6)})
    with pytest.raises(CheckpointError):
        load_all(path)


@pytest.mark.parametrize(
    "value",
    [get(5), b"j" + struct.pack("<I", 1 << 31), b"g7\n", put(0) + get(1)],
    ids=["BINGET", "LONG_BINGET", "GET", "neighbour"],
)
def test_memo_miss_refused(value: bytes, tmp_path: Path) -> None:
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: integer(1) + op.POP + value}))
    with pytest.raises(CheckpointError):
        load_all(path)


# -- compressed members --------------------------------------------------------------------------------
def test_compressed_members_refused(tmp_path: Path) -> None:
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: tensor()}), {"0": floats(6)}, compress=True)
    with pytest.raises(CheckpointError):
        load_all(path)


def test_zip_bomb_storage_refused(tmp_path: Path) -> None:
    """A deflated 64 MiB storage of zeros (about 64 KiB on disk) claimed as a small tensor's storage."""
    numel = 16 << 20
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl", state_dict({NAME: tensor(numel=numel, size=(numel,), stride=(1,))})
        )
        archive.writestr("archive/data/0", bytes(4 * numel), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("archive/version", b"3\n")
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError):
        load_all(path)


# -- deep and cyclic structures ------------------------------------------------------------------------
DEPTH = 100_000


@pytest.mark.parametrize(
    "value",
    [
        op.EMPTY_LIST * (DEPTH + 1) + op.APPEND * DEPTH,
        op.EMPTY_LIST + (op.MARK + op.EMPTY_LIST) * DEPTH + op.APPENDS * DEPTH,
        op.EMPTY_TUPLE + op.TUPLE1 * DEPTH,
        op.EMPTY_DICT + (text("k") + op.EMPTY_DICT) * DEPTH + op.SETITEM * DEPTH,
        op.MARK * DEPTH + op.EMPTY_DICT,
    ],
    ids=["lists", "appends", "tuples", "dicts", "marks"],
)
def test_deep_nesting_refused(value: bytes, tmp_path: Path) -> None:
    """100,000 levels: a jaxweights error, never RecursionError or MemoryError."""
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}))
    with pytest.raises(WeightsError):
        load_all(path)


def test_deep_nesting_as_whole_pickle_refused(tmp_path: Path) -> None:
    """The root itself is {"k": {"k": ...}} 100,000 levels deep."""
    pickle_bytes = document(op.EMPTY_DICT + (text("k") + op.EMPTY_DICT) * DEPTH + op.SETITEM * DEPTH)
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes)
    with pytest.raises(WeightsError):
        load_all(path)


@pytest.mark.parametrize(
    "value",
    [
        op.EMPTY_LIST + put(0) + get(0) + op.APPEND,
        op.EMPTY_DICT + put(0) + text("self") + get(0) + op.SETITEM,
        op.EMPTY_DICT + put(0) + text("a") + op.EMPTY_DICT + text("b") + get(0) + op.SETITEM + op.SETITEM,
        call(glob("collections", "OrderedDict")) + put(0) + text("self") + get(0) + op.SETITEM,
    ],
    ids=["list", "dict", "dict-cycle", "ordereddict"],
)
def test_self_reference_refused(value: bytes, tmp_path: Path) -> None:
    """A container that holds itself: a jaxweights error, never RecursionError."""
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: value}))
    with pytest.raises(WeightsError):
        load_all(path)


def test_shared_references_explosion_refused(tmp_path: Path) -> None:
    """A billion laughs: 30 levels, each a list of ten references to the level below (10**30 leaves)."""
    levels = op.EMPTY_LIST + put(0)
    for level in range(1, 31):
        levels += op.POP + op.EMPTY_LIST + op.MARK + get(level - 1) * 10 + op.APPENDS + put(level)
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: levels}))
    start = time.monotonic()
    with pytest.raises(CheckpointError):
        load_all(path)
    assert time.monotonic() - start < 10, (
        "an 806-byte file must be refused at once, not after a walk of its shared references"
    )


def test_root_that_references_itself_refused(tmp_path: Path) -> None:
    """The state dict itself holds itself under a name, next to a real tensor."""
    pickle_bytes = document(
        op.EMPTY_DICT + put(0) + op.MARK + text(NAME) + tensor() + text("loop") + get(0) + op.SETITEMS
    )
    path = zip_checkpoint(tmp_path / "m.pt", pickle_bytes, {"0": floats(6)})
    with pytest.raises(WeightsError):
        load_all(path)


# -- torch-produced pickles to patch ---------------------------------------------------------------------
def _torch_zip_pickle(torch: object, tmp_path: Path) -> bytes:
    """The data.pkl torch.save writes for ``{"w": torch.ones(2, 3)}`` (one storage, key "0")."""
    path = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2, 3)}, path)  # type: ignore[attr-defined]
    with zipfile.ZipFile(path) as archive:
        return archive.read("real/data.pkl")


# -- the zip directory, read without zipfile -----------------------------------------------------------
def _zip64_checkpoint(path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch.save-like archive in ZIP64 shape, as torch writes one past 4 GiB: ZIP64 end record and
    locator (the plain end record holding 0xFFFF / 0xFFFFFFFF), and central entries whose sizes and header
    offsets are 0xFFFFFFFF with the real ones in a ZIP64 extra field. zipfile's limits are lowered so a
    small archive takes that shape."""
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP64_LIMIT", 1)
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
        zip_checkpoint(path, state_dict({NAME: tensor()}), {"0": floats(6)})
    data = bytearray(path.read_bytes())  # zipfile keeps values that fit in the plain end record; not all do
    struct.pack_into("<HHII", data, data.rindex(b"PK\x05\x06") + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_zip64_archive_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _zip64_checkpoint(tmp_path / "m.pt", monkeypatch)
    data = path.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    assert data[end - 20 : end - 16] == b"PK\x06\x07"  # the locator, then the ZIP64 end record it names
    assert struct.unpack_from("<HHII", data, end + 8) == (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    with zipfile.ZipFile(path) as archive:  # a valid archive, read the reference way
        infos = {info.filename: info for info in archive.infolist()}
        assert archive.testzip() is None
    assert infos["archive/data/0"].header_offset > 0
    np.testing.assert_array_equal(load_all(path)[NAME], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_archive_with_a_comment_loads(tmp_path: Path) -> None:
    """The end record is then not the file's last 22 bytes: it is the last one whose comment length
    reaches the file's end (not a lookalike inside the comment)."""
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: tensor()}), {"0": floats(6)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.comment = b"PK\x05\x06 lookalike in a comment, " + b"x" * 1000
    np.testing.assert_array_equal(load_all(path)[NAME], np.arange(6, dtype=np.float32).reshape(2, 3))


def _end(data: bytearray) -> int:
    return data.rindex(b"PK\x05\x06")


def _first_entry(data: bytearray) -> int:
    return data.index(b"PK\x01\x02")  # no member of these archives holds the signature


def _set(fmt: str, where: Callable[[bytearray], int], *values: int) -> Callable[[bytearray], None]:
    def patch(data: bytearray) -> None:
        struct.pack_into(fmt, data, where(data), *values)

    return patch


def _entry_of(name: bytes) -> Callable[[bytearray], int]:
    """Where the central entry of member ``name`` starts."""

    def where(data: bytearray) -> int:
        pos = _first_entry(data)
        while not data[pos + 46 :].startswith(name):
            pos = data.index(b"PK\x01\x02", pos + 4)
        return pos

    return where


def _drop_end_record(data: bytearray) -> None:
    del data[-22:]


def _bad_utf8_name(data: bytearray) -> None:
    """Flag bit 11 (the name is UTF-8) on the first entry, then a name byte no UTF-8 text holds."""
    entry = _first_entry(data)
    struct.pack_into("<H", data, entry + 8, 0x800)
    data[entry + 46] = 0xFF


CORRUPT_DIRECTORIES: dict[str, Callable[[bytearray], None]] = {
    "no-end-record": _drop_end_record,
    "directory-past-end": _set("<I", lambda d: _end(d) + 16, 0x7FFFFFF0),
    "directory-too-long": _set("<I", lambda d: _end(d) + 12, 0x7FFFFFF0),
    "too-many-entries": _set("<HH", lambda d: _end(d) + 8, 0xFFFE, 0xFFFE),
    "several-disks": _set("<H", lambda d: _end(d) + 4, 1),
    "entry-signature": _set("<I", _first_entry, 0x02014B51),
    "name-past-directory": _set("<H", lambda d: _first_entry(d) + 28, 0xFFFF),
    "zip64-size-without-field": _set("<I", lambda d: _entry_of(b"archive/data/0")(d) + 24, 0xFFFFFFFF),
    "header-offset-wrong": _set("<I", lambda d: _entry_of(b"archive/data/0")(d) + 42, 1),
    "header-offset-past-end": _set("<I", lambda d: _entry_of(b"archive/data/0")(d) + 42, 0x7FFFFFF0),
    "size-past-end": _set("<II", lambda d: _entry_of(b"archive/data/0")(d) + 20, 1 << 30, 1 << 30),
    "bad-utf8-name": _bad_utf8_name,
}


@pytest.mark.parametrize("corrupt", list(CORRUPT_DIRECTORIES))
def test_corrupt_zip_directory_names_the_file(corrupt: str, tmp_path: Path) -> None:
    """Malformed end records and central entries: a CheckpointError naming the file, never struct.error,
    IndexError or a zipfile error."""
    path = zip_checkpoint(tmp_path / "m.pt", state_dict({NAME: tensor()}), {"0": floats(6)})
    data = bytearray(path.read_bytes())
    CORRUPT_DIRECTORIES[corrupt](data)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        jw.load_weights(path)


ZIP64_CORRUPTIONS: dict[str, Callable[[bytearray], None]] = {
    "locator-to-nowhere": _set("<Q", lambda d: _end(d) - 12, 12),
    "locator-past-end": _set("<Q", lambda d: _end(d) - 12, 1 << 40),
    "several-disks": _set("<I", lambda d: _end(d) - 4, 2),
    "zip64-field-missing": _set(
        "<H", lambda d: _entry_of(b"archive/data/0")(d) + 46 + len(b"archive/data/0"), 0x9999
    ),
    "zip64-field-short": _set(
        "<H", lambda d: _entry_of(b"archive/data/0")(d) + 46 + len(b"archive/data/0") + 2, 4
    ),
}


@pytest.mark.parametrize("corrupt", list(ZIP64_CORRUPTIONS))
def test_corrupt_zip64_records_name_the_file(
    corrupt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _zip64_checkpoint(tmp_path / "m.pt", monkeypatch)
    data = bytearray(path.read_bytes())
    ZIP64_CORRUPTIONS[corrupt](data)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        jw.load_weights(path)


def test_member_named_twice_refused(tmp_path: Path) -> None:
    """Two central entries with one name: readers could disagree on which holds the storage."""
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = zip_checkpoint(
            tmp_path / "m.pt",
            state_dict({NAME: tensor()}),
            {"0": floats(6)},
            raw_members={"archive/data/0": floats(6)[::-1]},
        )
    with pytest.raises(CheckpointError, match="names a member twice"):
        jw.load_weights(path)


def test_every_truncation_of_a_real_pickle_refused(tmp_path: Path) -> None:
    """torch's data.pkl cut at every byte: a CheckpointError each time, never IndexError or struct.error
    (fixed-size opcode arguments are bounded by the end of the copied pickle, not checked one by one)."""
    torch = pytest.importorskip("torch")
    real = _torch_zip_pickle(torch, tmp_path)
    for cut in range(len(real)):
        path = zip_checkpoint(tmp_path / f"cut{cut}.pt", real[:cut], {"0": floats(6)})
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_torch(path)


def test_every_byte_of_a_real_pickle_changed(tmp_path: Path) -> None:
    """Each byte of torch's data.pkl replaced by a few opcode-like values: the file loads or is refused
    with a jaxweights error, never another exception."""
    torch = pytest.importorskip("torch")
    real = _torch_zip_pickle(torch, tmp_path)
    for pos in range(len(real)):
        for value in (0x00, 0x28, 0x4B, 0x58, 0x68, 0x72, 0x74, 0xFF):
            hostile = real[:pos] + bytes([value]) + real[pos + 1 :]
            path = zip_checkpoint(tmp_path / "m.pt", hostile, {"0": floats(6)})
            with contextlib.suppress(WeightsError):
                read_torch(path)
