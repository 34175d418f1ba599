from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import jaxweights as jw
from jaxweights import _hub
from jaxweights.errors import ArgumentError, CheckpointNotFoundError, UnsupportedFormatError

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A repository in the Hub cache's layout: refs/main -> snapshots/<commit>/<name> -> ../../blobs/<sha>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    return snapshot


def safetensors_bytes(tmp_path: Path, tensors: dict[str, np.ndarray], name: str = "x.safetensors") -> bytes:
    return jw.save_file(tensors, tmp_path / "made" / name).read_bytes()


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    return cache


def test_a_repository_id_loads_from_the_cache_offline(offline_cache: Path, tmp_path: Path) -> None:
    model = safetensors_bytes(tmp_path, {"encoder.w": np.arange(4, dtype=np.float32)})
    adapter = safetensors_bytes(tmp_path, {"lora.a": np.ones(2, np.float32)}, "a.safetensors")
    cached_repo(
        offline_cache,
        "org/tiny",
        {
            "model.safetensors": model,
            "adapter_model.safetensors": adapter,
            "pytorch_model.bin": b"PK",
            "config.json": b"{}",
            "onnx/model.safetensors": adapter,
        },
    )
    weights = jw.load_weights("org/tiny")
    assert [name for name, _ in weights.items()] == ["encoder.w"]  # model.safetensors, nothing else
    assert weights.encoder.w.data().data.tolist() == [0, 1, 2, 3]
    restored = jw.restore("org/tiny", {"encoder": {"w": np.zeros(4, np.float32)}})
    assert restored["encoder"]["w"].tolist() == [0, 1, 2, 3]


def test_a_path_that_exists_wins_over_an_id(offline_cache: Path, tmp_path: Path) -> None:
    cached_repo(
        offline_cache, "org/tiny", {"model.safetensors": safetensors_bytes(tmp_path, {"hub": np.ones(1)})}
    )
    jw.save({"local": np.ones(1, np.float32)}, tmp_path / "org" / "tiny")
    assert [name for name, _ in jw.load_weights("org/tiny").items()] == ["local"]


def test_sharded_and_pytorch_repositories(offline_cache: Path, tmp_path: Path) -> None:
    folder = jw.save(
        {f"w{i}": np.full(256, i, np.float32) for i in range(3)}, tmp_path / "s", max_shard_size="2kB"
    )
    cached_repo(offline_cache, "org/sharded", {p.name: p.read_bytes() for p in folder.iterdir()})
    assert sorted(name for name, _ in jw.load_weights("org/sharded").items()) == ["w0", "w1", "w2"]
    torch = pytest.importorskip("torch")
    saved = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(3, dtype=torch.float32)}, saved)
    cached_repo(
        offline_cache, "org/torchonly", {"pytorch_model.bin": saved.read_bytes(), "training_args.bin": b"x"}
    )
    assert jw.load_weights("org/torchonly").w.data().data.tolist() == [0, 1, 2]


def test_what_cannot_be_loaded_says_why(offline_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointNotFoundError, match=r"org/absent is not in the local Hugging Face cache.*HF_HUB_OFFLINE"
    ):
        jw.load_weights("org/absent")
    cached_repo(offline_cache, "org/text", {"README.md": b"# hi", "config.json": b"{}"})
    with pytest.raises(UnsupportedFormatError, match=r"org/text holds no weight files .* README.md"):
        jw.load_weights("org/text")
    cached_repo(offline_cache, "org/ggufs", {"m-Q4_K.gguf": b"GGUF", "m-Q8_0.gguf": b"GGUF"})
    with pytest.raises(UnsupportedFormatError, match=r"holds 2 GGUF files \(m-Q4_K.gguf, m-Q8_0.gguf\)"):
        jw.load_weights("org/ggufs")
    with pytest.raises(ArgumentError, match="revision='v1' applies to Hugging Face repository ids"):
        jw.load_weights(tmp_path, revision="v1")


def test_ids_and_paths_are_told_apart() -> None:
    assert _hub.is_repo_id("sentence-transformers/all-MiniLM-L6-v2")
    for text in (
        "model.safetensors",
        "ckpt/model.safetensors",
        "a/b/c",
        "./a/b",
        "/a/b",
        "a/b.json",
        "a/..",
        3,
    ):
        assert not _hub.is_repo_id(text)


def test_files_that_are_not_checkpoints_are_named(tmp_path: Path) -> None:
    lfs = tmp_path / "model.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(UnsupportedFormatError, match=r"is a Git LFS pointer.*git lfs pull"):
        jw.load_weights(lfs)
    page = tmp_path / "pytorch_model.bin"
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(UnsupportedFormatError, match=r"is an HTML page"):
        jw.load_weights(page)
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(
        jw.errors.CheckpointError, match=r"e.safetensors is not a valid safetensors file: it has 0 bytes"
    ):
        jw.load_weights(empty)
    orbax = tmp_path / "orbax" / "1"
    orbax.mkdir(parents=True)
    (orbax / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=r"It is an Orbax checkpoint: restore it with orbax"):
        jw.load_weights(orbax)


def test_online_downloads_the_weight_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    snapshot = cached_repo(
        tmp_path / "hub", "org/tiny", {"model.safetensors": safetensors_bytes(tmp_path, {"w": np.ones(2)})}
    )
    asked: list[object] = []

    def list_repo_files(repo_id: str, revision: str | None = None) -> list[str]:
        asked.append(("list", repo_id, revision))
        return ["README.md", "config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx"]

    def snapshot_download(repo_id: str, *, revision: str | None = None, allow_patterns: list[str]) -> str:
        asked.append(("download", repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert jw.load_weights("org/tiny", revision="v2").w.data().data.tolist() == [1, 1]
    assert asked == [("list", "org/tiny", "v2"), ("download", "org/tiny", "v2", ["model.safetensors"])]

    def unreachable(repo_id: str, revision: str | None = None) -> list[str]:
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub, "list_repo_files", unreachable)
    with pytest.raises(jw.errors.CheckpointReadError, match=r"could not be fetched .* HF_HUB_OFFLINE=1"):
        jw.load_weights("org/tiny")


def test_the_command_line_takes_repository_ids(
    offline_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jaxweights.cli import main

    model = safetensors_bytes(tmp_path, {"encoder.w": np.arange(4, dtype=np.float32)})
    cached_repo(offline_cache, "org/tiny", {"model.safetensors": model})
    assert main(["inspect", "org/tiny"]) == 0
    assert "encoder" in capsys.readouterr().out
    assert main(["convert", "org/tiny", str(tmp_path / "out.safetensors"), "--dtype", "bfloat16"]) == 0
    converted = jw.load_weights(tmp_path / "out.safetensors")
    assert converted.encoder.w.dtype is jw.DType.bfloat16
    assert converted.encoder.w.data().astype("float32").data.tolist() == [0, 1, 2, 3]
    assert main(["diff", "org/tiny", str(tmp_path / "out.safetensors")]) == 1  # the dtype differs
