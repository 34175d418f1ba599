from __future__ import annotations

import json
import pickle
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxweights as jw  # noqa: E402
from jaxweights.errors import (  # noqa: E402
    CheckpointError,
    DTypeError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from jaxweights.formats import WeightsFormat  # noqa: E402

SAVES: dict[str, dict[str, Any]] = {
    "zip": {},
    "legacy": {"_use_new_zipfile_serialization": False},
    "zip-protocol-4": {"pickle_protocol": 4},
    "legacy-protocol-4": {"_use_new_zipfile_serialization": False, "pickle_protocol": 4},
}


def _numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        if tensor.dtype == getattr(torch, name):
            return tensor.view(torch.uint8).numpy().view(getattr(ml_dtypes, name))
    return tensor.numpy()


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _save(obj: Any, path: Path, how: str) -> Path:
    torch.save(obj, path, **SAVES[how])
    return path


def _check_all(path: Path, saved: dict[str, Any] | None = None) -> jw.Weights:
    """Compares every tensor with torch.load's (with ``saved`` when torch cannot read its own file)."""
    with warnings.catch_warnings():  # torch warns that it reads protocols other than 2 with caution
        warnings.filterwarnings("ignore", "Detected pickle protocol")
        try:
            loaded = saved if saved is not None else torch.load(path, weights_only=True)
        except pickle.UnpicklingError:  # torch's restricted unpickler refuses FRAME (protocol 4)
            loaded = torch.load(path, weights_only=False)  # a file this test just wrote
    expected = {k: v for k, v in _flatten(loaded).items() if torch.is_tensor(v)}
    weights = jw.load_weights(path)
    with jw.open_checkpoint(path) as checkpoint:
        assert list(checkpoint) == list(expected)
    for name, tensor in expected.items():
        want = _numpy(tensor)
        got = weights[name].data().data
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(_bytes(got), _bytes(want))
        placed = np.asarray(weights[name].allocate().array)
        assert placed.shape == want.shape
        np.testing.assert_array_equal(_bytes(placed), _bytes(want.astype(placed.dtype)))  # x64 off
    return weights


@pytest.mark.parametrize("how", list(SAVES))
def test_a_module_state_dict_reads_as_torch_loads_it(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2)
    )
    path = _save(model.state_dict(), tmp_path / "pytorch_model.bin", how)
    assert jw.weights_format(path) is WeightsFormat.pytorch
    weights = _check_all(path)
    assert weights["1.weight"].data().shape == (3, 4)


@pytest.mark.parametrize("how", list(SAVES))
def test_views_offsets_strides_and_shared_storages(tmp_path: Path, how: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "base": base,
        "transposed": base.t(),
        "row_slice": base[1:3],
        "column_slice": base[:, 2:5],
        "stride2": base.reshape(-1)[1::2],
        "expanded": torch.arange(3.0).expand(2, 3),
    }
    path = _save(tensors, tmp_path / "views.pt", how)
    with jw.open_checkpoint(path) as checkpoint:
        assert checkpoint["base"].strides is None
        assert checkpoint["row_slice"].strides is None  # offset but contiguous: zero-copy
        assert checkpoint["transposed"].strides == (1, 6)
        assert checkpoint["stride2"].strides == (2,)
        assert checkpoint["row_slice"].start == checkpoint["base"].start + 6 * 4
    _check_all(path)


DTYPES = [
    "float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
    "uint32", "uint64", "bool", "complex64", "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip


@pytest.mark.parametrize("how", ["zip", "legacy"])
def test_every_dtype_scalars_and_empty_tensors(tmp_path: Path, how: str) -> None:
    tensors: dict[str, Any] = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        source = torch.arange(-3, 9, dtype=torch.float64).reshape(3, 4)
        if name in ("uint8", "uint16", "uint32", "uint64"):
            source = source.abs()
        tensors[name] = source.to(dtype) if name != "complex64" else torch.complex(source, -source).to(dtype)
    tensors["scalar"] = torch.tensor(7.5)
    tensors["int_scalar"] = torch.tensor(3)
    tensors["empty"] = torch.zeros(0, 3)
    tensors["empty_view"] = torch.arange(6.0)[6:]
    path = _save(tensors, tmp_path / "dtypes.pt", how)
    weights = _check_all(path, tensors)  # torch 2.13 cannot load legacy files holding uint16 or float8
    assert weights.scalar.data().shape == () and weights.empty.data().shape == (0, 3)


def test_complex128_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = _save({"ok": torch.ones(2), "z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.pt", "zip")
    with pytest.raises(DTypeError, match=r"Tensor 'z' in .*c.pt has element type ComplexDoubleStorage"):
        jw.load_weights(path)


@pytest.mark.parametrize("how", ["zip", "legacy"])
def test_a_training_checkpoint_gets_dotted_names_and_metadata(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "note": "best",
    }
    path = _save(checkpoint, tmp_path / "train.pt", how)
    weights = _check_all(path)
    assert weights["model.0.weight"].data().shape == (2, 3)
    assert weights["optimizer.state.0.exp_avg"].data().shape == (2, 3)
    with jw.open_checkpoint(path) as opened:
        assert opened.metadata["epoch"] == 3 and opened.metadata["note"] == "best"
        assert opened.metadata["optimizer.param_groups.0.lr"] == 1e-3
        assert opened.metadata["optimizer.param_groups.0.params.1"] == 1


def test_an_index_and_a_folder(tmp_path: Path) -> None:
    first = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2)}
    second = {"b.weight": torch.arange(4.0)}
    torch.save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {name: "pytorch_model-00001-of-00002.bin" for name in first}
    weight_map.update({name: "pytorch_model-00002-of-00002.bin" for name in second})
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 40}, "weight_map": weight_map}))
    for source in (index, tmp_path):
        assert jw.weights_format(source) is WeightsFormat.pytorch
        weights = jw.load_weights(source)
        np.testing.assert_array_equal(weights["b.weight"].data().data, np.arange(4.0, dtype=np.float32))
        assert sorted(name for name, _ in weights.items()) == ["a.bias", "a.weight", "b.weight"]


def test_a_folder_of_plain_files(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text("{}")
    np.testing.assert_array_equal(jw.load_weights(tmp_path).w.data().data, np.ones(3, np.float32))


def test_torchscript_archives_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnsupportedFormatError, match=r"scripted.pt is a TorchScript archive"):
        jw.load_weights(path)


def test_the_old_tar_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    payload = tmp_path / "sys_info"
    payload.write_bytes(b"\x80\x02}q\x00.")
    with tarfile.open(path, "w") as archive:
        archive.add(payload, arcname="sys_info")
    assert jw.weights_format(path) is WeightsFormat.pytorch
    with pytest.raises(UnsupportedFormatError, match=r"old.pt is in PyTorch's old tar format"):
        jw.load_weights(path)


def test_compressed_members_are_refused(tmp_path: Path) -> None:
    source = _save({"w": torch.ones(4)}, tmp_path / "m.pt", "zip")
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in original.infolist():
            out.writestr(info.filename, original.read(info))
    with pytest.raises(
        UnsafeCheckpointError, match=r"deflated.pt: archive member .* is compressed or encrypted"
    ):
        jw.load_weights(path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00echoq\x00\x85R.")
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil.pt asks to run code: .*'posix.system'.*nothing was"
    ):
        jw.load_weights(path)


def test_a_truncated_archive_names_the_file(tmp_path: Path) -> None:
    source = _save({"w": torch.ones(1000)}, tmp_path / "m.pt", "zip")
    path = tmp_path / "cut.pt"
    path.write_bytes(source.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut.pt"):
        jw.load_weights(path)


def test_a_storage_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    source = _save({"w": torch.ones(4)}, tmp_path / "m.pt", "zip")
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as out:
        for info in original.infolist():
            data = original.read(info)
            out.writestr(info.filename, data[:8] if info.filename.endswith("/data/0") else data)
    with pytest.raises(
        CheckpointError, match=r"storage '0' \(of tensor 'w'\) holds 8 bytes, but the pickle declares 4"
    ):
        jw.load_weights(path)


def test_a_legacy_file_cut_inside_a_storage_is_refused(tmp_path: Path) -> None:
    source = _save({"w": torch.ones(100)}, tmp_path / "m.pt", "legacy")
    path = tmp_path / "cut.pt"
    path.write_bytes(source.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"cut.pt ends inside storage"):
        jw.load_weights(path)


def test_restore_into_flax_and_convert_to_safetensors(tmp_path: Path) -> None:
    from flax import nnx

    from jaxweights.cli import main

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"dense." + k: v for k, v in linear.state_dict().items()}, path)

    class Model(nnx.Module):
        def __init__(self) -> None:
            self.dense = nnx.Linear(6, 4, rngs=nnx.Rngs(1))

    restored = jw.restore(path, Model(), keymap=jw.TORCH_TO_FLAX)
    np.testing.assert_array_equal(np.asarray(restored.dense.kernel[...]), _numpy(linear.weight).T)
    np.testing.assert_array_equal(np.asarray(restored.dense.bias[...]), _numpy(linear.bias))
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(path), str(out)]) == 0
    converted = jw.load_weights(out)
    assert jw.weights_format(out) is WeightsFormat.safetensors
    np.testing.assert_array_equal(converted.dense.weight.data().data, _numpy(linear.weight))
