"""The read planner: which bytes of a tensor each addressable device needs, as strided byte runs.

Pure: it takes a tensor's `TensorInfo` and a device -> index map (what
``sharding.addressable_devices_indices_map(shape)`` returns) and performs no I/O and imports no jax.
Devices that need the same block share one `BlockRead`, so each distinct block is read once; a block's
bytes are described as one strided pattern of contiguous runs, with adjacent runs merged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass

from ._shapes import c_strides
from .errors import ShardingError
from .formats import TensorInfo

__all__ = ["BlockRead", "ReadPlan", "block_key", "plan_reads"]

BlockKey = tuple[tuple[int, int], ...]


def block_key(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> BlockKey:
    """Normalises a device index (a tuple of slices, possibly shorter than the shape) to
    ``((start, stop), ...)`` per dimension.

    Example:
        >>> block_key((slice(None), slice(2, 4)), (3, 8, 5))
        ((0, 3), (2, 4), (0, 5))
    """
    index = index or ()
    key = []
    for axis, size in enumerate(shape):
        part = index[axis] if axis < len(index) else slice(None)
        start, stop, step = part.indices(size)
        if step != 1:
            raise ShardingError(
                f"A device index steps through axis {axis} ({part}); jaxweights reads contiguous blocks "
                f"only. Use a sharding whose blocks are contiguous slices (any NamedSharding is)."
            )
        key.append((start, max(start, stop)))
    return tuple(key)


@dataclass(frozen=True)
class BlockRead:
    """One distinct block of a tensor and the devices that hold it.

    The bytes form ``prod(counts)`` contiguous runs of ``run`` bytes: the run at multi-index ``i`` starts
    ``offset + sum(i[k] * strides[k])`` bytes into the tensor and lands ``run * flat(i)`` bytes into the
    block's C-contiguous buffer.

    Attributes:
        key: ``((start, stop), ...)`` per dimension.
        devices: the devices that hold this block.
        offset: bytes from the tensor's start to the first run.
        run: bytes per contiguous run.
        counts: runs along each outer dimension (empty when the block is one run).
        strides: bytes between consecutive runs along each outer dimension.
    """

    key: BlockKey
    devices: tuple[Hashable, ...]
    offset: int
    run: int
    counts: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The block's shape."""
        return tuple(stop - start for start, stop in self.key)

    @property
    def nbytes(self) -> int:
        """Bytes the block holds (and a read of it copies)."""
        return self.run * math.prod(self.counts)

    @property
    def num_runs(self) -> int:
        """Number of contiguous byte runs."""
        return math.prod(self.counts) if self.run else 0

    def runs(self) -> Iterator[tuple[int, int]]:
        """Every run as ``(offset into the tensor, length)``, in destination order."""
        if not self.run:
            return
        for position in itertools.product(*(range(c) for c in self.counts)):
            yield self.offset + sum(p * s for p, s in zip(position, self.strides, strict=True)), self.run


@dataclass(frozen=True)
class ReadPlan:
    """What one process reads of one tensor: its distinct blocks."""

    tensor: TensorInfo
    blocks: tuple[BlockRead, ...]

    @property
    def nbytes(self) -> int:
        """Bytes this process copies for the tensor (each distinct block once)."""
        return sum(block.nbytes for block in self.blocks)

    @property
    def num_runs(self) -> int:
        """Contiguous runs over all blocks."""
        return sum(block.num_runs for block in self.blocks)


def _pattern(
    key: BlockKey, shape: tuple[int, ...], itemsize: int
) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """(offset, run, counts, strides) in bytes for a block, with adjacent runs merged."""
    strides = c_strides(shape, itemsize)
    extents = [stop - start for start, stop in key]
    offset = sum(start * stride for (start, _), stride in zip(key, strides, strict=True))
    if 0 in extents:
        return offset, 0, (), ()
    # Fold trailing dimensions into one run while the block spans them whole.
    run, axis = itemsize, len(shape) - 1
    while axis >= 0:
        run *= extents[axis]
        if extents[axis] != shape[axis]:
            break
        axis -= 1
    outer = [(extents[a], strides[a]) for a in range(axis) if extents[a] != 1]
    # Merge an outer dimension into the run when its stride equals the run (contiguous neighbours).
    while outer and outer[-1][1] == run:
        count, _ = outer.pop()
        run *= count
    return offset, run, tuple(c for c, _ in outer), tuple(s for _, s in outer)


def plan_reads(info: TensorInfo, indices: Mapping[Hashable, tuple[slice, ...] | None]) -> ReadPlan:
    """Plans the reads one process makes for one tensor.

    Args:
        info: the tensor (its shape, dtype and byte range).
        indices: device -> index of the block it holds, as
            ``sharding.addressable_devices_indices_map(info.shape)`` returns.

    Example:
        >>> from pathlib import Path
        >>> from jaxweights import DType, TensorInfo
        >>> info = TensorInfo("w", DType.float32, (4, 6), Path("m.safetensors"), 100, 196)
        >>> rows = {"d0": (slice(0, 2), slice(None)), "d1": (slice(2, 4), slice(None))}
        >>> [(b.offset, b.run, b.num_runs) for b in plan_reads(info, rows).blocks]
        [(0, 48, 1), (48, 48, 1)]
        >>> cols = {"d0": (slice(None), slice(0, 3)), "d1": (slice(None), slice(3, 6))}
        >>> [list(b.runs())[:2] for b in plan_reads(info, cols).blocks]
        [[(0, 12), (24, 12)], [(12, 12), (36, 12)]]
    """
    if info.encoding is not None or info.dtype.is_packed:
        kind = "quantized" if info.encoding is not None else "packed (float4)"
        raise ShardingError(
            f"Tensor {info.name!r} is {kind}: its bytes do not map one-to-one to elements, so it is read "
            f"whole and cannot be planned per device. Place it replicated, or convert it first.",
            tensor=info.name,
        )
    itemsize = info.dtype.size_in_bytes
    grouped: dict[BlockKey, list[Hashable]] = {}
    for device, index in indices.items():
        grouped.setdefault(block_key(index, info.shape), []).append(device)
    blocks = []
    for key, devices in grouped.items():
        offset, run, counts, strides = _pattern(key, info.shape, itemsize)
        blocks.append(BlockRead(key, tuple(devices), offset, run, counts, strides))
    return ReadPlan(info, tuple(blocks))
