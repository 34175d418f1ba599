"""Multi-process agreement: every process of a `jax.distributed` job must load the same checkpoint.

Each bulk load publishes a digest of the catalogue it is about to read (names, dtypes, shapes, byte
sizes; not paths, which may differ between hosts) through the distributed key-value store and reads
everyone else's with a timeout, so a process holding a different checkpoint gets a clear error instead of
a hang in a later collective.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable

import jax
import numpy as np

from ._compat import kv_client
from .errors import CheckpointError
from .formats import TensorInfo

__all__ = ["catalogue_digest", "check_same_checkpoint"]

_round = itertools.count()


def catalogue_digest(infos: Iterable[TensorInfo]) -> str:
    """A short hash of what a load will read: every name, dtype, shape and byte size, sorted."""
    digest = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.name):
        digest.update(f"{info.name}\0{info.dtype.name}\0{info.shape}\0{info.nbytes}\n".encode())
    return digest.hexdigest()[:16]


def check_same_checkpoint(digest: str, *, timeout_s: float = 120.0) -> None:
    """Raises `CheckpointError` unless every process reports the same ``digest``.

    A no-op in a single-process job. Every process must call it the same number of times (each bulk
    load calls it once).
    """
    count = jax.process_count()
    if count == 1:
        return
    me = jax.process_index()
    round_id = next(_round)
    client = kv_client()
    if client is not None:
        client.key_value_set(f"jaxweights/digest/{round_id}/{me}", digest)
        digests = []
        for process in range(count):
            try:
                digests.append(
                    client.blocking_key_value_get(
                        f"jaxweights/digest/{round_id}/{process}", int(timeout_s * 1000)
                    )
                )
            except Exception as error:  # the store raises XlaRuntimeError on timeout
                raise CheckpointError(
                    f"Process {process} did not report which checkpoint it loads within {timeout_s:.0f} s "
                    f"(this is process {me}). Every process must call the same bulk loads, in the same "
                    f"order.",
                ) from error
    else:  # a JAX whose key-value store moved: agree through a collective
        from jax.experimental import multihost_utils

        raw = np.frombuffer(digest.encode(), dtype=np.uint8)
        gathered = multihost_utils.process_allgather(raw)
        digests = [bytes(np.asarray(row)).decode() for row in gathered]
    if len(set(digests)) > 1:
        listing = ", ".join(f"process {p}: {d}" for p, d in enumerate(digests))
        raise CheckpointError(
            f"The processes of this job are loading different checkpoints (catalogue digests {listing}; "
            f"this is process {me}). Point every process at the same files."
        )
