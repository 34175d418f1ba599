"""Hugging Face repository ids: ``jw.load_weights("sentence-transformers/all-MiniLM-L6-v2")``.

A string that is not an existing path but looks like a repository id (``owner/name``, not ending in a
weight file's suffix) is resolved through `huggingface_hub` (the optional ``hub`` extra, imported only
here, only then): from the local cache when offline (``HF_HUB_OFFLINE=1``), otherwise by downloading
the repository's weight files only. safetensors is preferred, then PyTorch files, then a single GGUF
file; config files, tokenizers and other formats are never fetched. A path that exists always wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, CheckpointReadError, UnsupportedFormatError

__all__ = ["is_repo_id", "resolve_repo"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".gguf")


def is_repo_id(text: object) -> bool:
    """True for a string shaped like a Hub repository id that names no existing path.

    Example:
        >>> is_repo_id("sentence-transformers/all-MiniLM-L6-v2"), is_repo_id("ckpt/model.safetensors")
        (True, False)
        >>> is_repo_id("/abs/path"), is_repo_id("a/b/c"), is_repo_id("org/..name")
        (False, False, False)
    """
    if not isinstance(text, str) or not _REPO_ID.fullmatch(text) or ".." in text:
        return False
    if text.endswith(_WEIGHT_SUFFIXES) or text.endswith((".git", "-", ".")):
        return False
    return not os.path.lexists(text)


def _choose(files: Iterable[str], repo_id: str) -> list[str]:
    """The weight files to read, by preference: safetensors (and their index), PyTorch, one GGUF file.
    Only the repository's top level counts, as Hugging Face loaders read it."""
    top = sorted(name for name in files if "/" not in name)
    safetensors = [n for n in top if n.endswith((".safetensors", ".safetensors.index.json"))]
    if safetensors:
        return safetensors
    torch = [
        n for n in top if n.endswith((".bin", ".pt", ".pth", ".bin.index.json")) and n != "training_args.bin"
    ]
    if torch:
        return torch
    gguf = [n for n in top if n.endswith(".gguf")]
    if len(gguf) == 1:
        return gguf
    if gguf:
        shown = ", ".join(gguf[:8]) + (", ..." if len(gguf) > 8 else "")
        raise UnsupportedFormatError(
            f"{repo_id} holds {len(gguf)} GGUF files ({shown}); download the one you want "
            f"(huggingface_hub.hf_hub_download({repo_id!r}, filename)) and pass its path."
        )
    shown = ", ".join(top[:10]) or "no files"
    raise UnsupportedFormatError(
        f"{repo_id} holds no weight files jaxweights reads (safetensors, PyTorch .bin/.pt, GGUF) at its top "
        f"level; it holds: {shown}."
    )


def resolve_repo(repo_id: str, revision: str | None = None) -> list[Path]:
    """The local weight files of a Hub repository: from the cache when offline, else downloaded (weight
    files only).

    Raises:
        CheckpointNotFoundError: no such repository or revision (or a private one), nothing in the cache
            when offline, or `huggingface_hub` is not installed.
        CheckpointReadError: the Hub could not be reached.
        UnsupportedFormatError: the repository holds no weight files jaxweights reads.
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a path, and looks like a Hugging Face repository id: install huggingface_hub "
            f"(pip install 'jaxweights[hub]') to load it, or pass a local path."
        ) from None
    offline = bool(constants.HF_HUB_OFFLINE)
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        if offline:
            folder = Path(
                huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
            )
            names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
            chosen = _choose(names, repo_id)
        else:
            chosen = _choose(huggingface_hub.list_repo_files(repo_id, revision=revision), repo_id)
            folder = Path(
                huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=chosen)
            )
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as error:
        raise CheckpointNotFoundError(
            f"{where} is not a repository on the Hugging Face Hub you can read ({_first_line(error)}); check "
            f"the id, or log in (huggingface-cli login) for a private or gated one.",
            file=repo_id,
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{where}: no such revision on the Hub.", file=repo_id) from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{where} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. "
            f"Download it once online, or pass a local path.",
            file=repo_id,
        ) from None
    except (errors.HfHubHTTPError, OSError) as error:
        raise CheckpointReadError(
            f"{where} could not be fetched from the Hugging Face Hub ({_first_line(error)}); check the "
            f"network, or set HF_HUB_OFFLINE=1 to use the local cache.",
            file=repo_id,
        ) from None
    return [folder / name for name in _to_open(chosen)]


def _to_open(chosen: list[str]) -> list[str]:
    """Of one format's files, the checkpoint a Hugging Face loader opens: the index, else the standard
    single file (``model.safetensors``, ``pytorch_model.bin``), else all of them.

    Example:
        >>> _to_open(["adapter_model.safetensors", "model.safetensors"]), _to_open(["a.pt", "b.pt"])
        (['model.safetensors'], ['a.pt', 'b.pt'])
    """
    for preferred in (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ):
        if preferred in chosen:
            return [preferred]
    indexes = [name for name in chosen if name.endswith(".index.json")]
    return indexes[:1] if len(indexes) == 1 else chosen


def _first_line(error: Any) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
