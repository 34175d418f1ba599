"""The catalogue every format produces: `TensorInfo` per tensor, and `Checkpoint` to read their bytes.

A `Checkpoint` knows where each tensor's bytes are (file, byte range) and reads them two ways: as a
read-only zero-copy numpy view over a memory map (`view`), or by copying a byte range into a buffer the
caller owns with `preadv` (`copy_into`), which maps no file page into the process. Strided blocks are
gathered from the map (`copy_block`), which can release the pages behind it. Both count the bytes copied.
It never imports jax, and never names a particular format: those live in their own modules.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import mmap
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._buffers import ALIGNMENT, aligned_empty
from .._dtypes import DType, unpack_nibbles
from .._quantization import QuantizationEncoding
from .._shapes import MAX_DIMS, c_strides, element_count, shape_problem
from ..errors import (
    ArgumentError,
    CheckpointChangedError,
    CheckpointError,
    CheckpointReadError,
    ShapeMismatchError,
)
from ._files import FileIdentity, open_regular

__all__ = ["NATIVE_ORDER", "Checkpoint", "TensorInfo", "WeightsFormat", "first_overlap"]

NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
"""This machine's byte order, as `TensorInfo.byteorder` spells it."""


class WeightsFormat(enum.StrEnum):
    """The on-disk formats jaxweights recognises (MAX's names); each member is also its name as a string.

    Example:
        >>> from jaxweights import WeightsFormat
        >>> WeightsFormat("gguf"), WeightsFormat.safetensors == "safetensors", f"{WeightsFormat.pytorch}"
        (<WeightsFormat.gguf: 'gguf'>, True, 'pytorch')
    """

    __module__ = "jaxweights"

    safetensors = "safetensors"
    gguf = "gguf"
    pytorch = "pytorch"


class TensorInfo(NamedTuple):
    """Where one tensor lives and what it is.

    Attributes:
        name: full dotted name.
        dtype: element type (for quantized tensors: the type of the raw blocks, uint8).
        shape: logical shape.
        file: the file holding the bytes.
        start: absolute byte offset of the first byte in ``file``.
        end: absolute byte offset one past the last byte.
        encoding: the quantization encoding, or None for plain tensors.
        byteorder: ``"<"`` (little-endian: every safetensors file) or ``">"`` (the plain tensors of a
            big-endian GGUF file); readers hand out native-order values either way.
        strides: element strides of a view into a larger storage (a transposed or sliced PyTorch
            tensor), or None for C-contiguous bytes. ``start`` is then the first element's byte and
            ``end`` one past the last byte the view touches.

    Example:
        >>> from pathlib import Path
        >>> from jaxweights import DType, TensorInfo
        >>> info = TensorInfo("w", DType.float32, (2, 3), Path("m.safetensors"), start=64, end=88)
        >>> info.nbytes, info.size, info.contiguous
        (24, 6, True)
    """

    if not TYPE_CHECKING:  # type: ignore[misc]  # mypy reads every NamedTuple statement as a field
        __module__ = "jaxweights"

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int
    encoding: QuantizationEncoding | None = None
    byteorder: str = "<"
    strides: tuple[int, ...] | None = None

    @property
    def contiguous(self) -> bool:
        """True when the elements lie in C order, back to back (no strides, or strides that say so).

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, TensorInfo
            >>> info = TensorInfo("w", DType.float32, (2, 3), Path("m.safetensors"), 0, 24)
            >>> info.contiguous, info._replace(strides=(1, 2)).contiguous
            (True, False)
        """
        if self.strides is None:
            return True
        expected = c_strides(self.shape, 1)
        return all(dim <= 1 or a == b for dim, a, b in zip(self.shape, self.strides, expected, strict=True))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the stored bytes: the logical shape, except that a quantized tensor's last
        dimension counts bytes (its blocks times the block size), MAX's "byte shape".

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, QuantizationEncoding, TensorInfo
            >>> info = TensorInfo("w", DType.uint8, (4, 64), Path("m.gguf"), 0, 272, QuantizationEncoding.Q8_0)
            >>> info.stored_shape
            (4, 68)
        """
        if self.encoding is None or not self.shape:
            return self.shape
        *lead, last = self.shape
        return (*lead, last // self.encoding.elements_per_block * self.encoding.block_size)

    @property
    def swapped(self) -> bool:
        """True when the stored elements are in the other byte order than this machine's.

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, TensorInfo
            >>> info = TensorInfo("w", DType.float32, (2,), Path("m.gguf"), 0, 8)
            >>> info._replace(byteorder="<").swapped != info._replace(byteorder=">").swapped
            True
        """
        return self.byteorder != NATIVE_ORDER and self.dtype.size_in_bytes > 1 and self.encoding is None

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in its file.

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, TensorInfo
            >>> TensorInfo("w", DType.bfloat16, (3, 4), Path("m.safetensors"), 8, 32).nbytes
            24
        """
        return self.end - self.start

    @property
    def size(self) -> int:
        """Number of logical elements.

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, TensorInfo
            >>> TensorInfo("w", DType.bfloat16, (3, 4), Path("m.safetensors"), 8, 32).size
            12
        """
        return element_count(self.shape)

    def is_aligned(self, alignment: int = ALIGNMENT) -> bool:
        """True when the bytes start on an ``alignment`` boundary and map one-to-one to native elements.

        Example:
            >>> from pathlib import Path
            >>> from jaxweights import DType, TensorInfo
            >>> info = TensorInfo("w", DType.float32, (4,), Path("m.safetensors"), 64, 80)
            >>> info.is_aligned(64), info._replace(start=72, end=88).is_aligned(64)
            (True, False)
        """
        return (
            self.start % alignment == 0
            and self.encoding is None
            and not self.dtype.is_packed
            and not self.swapped
        )


def first_overlap(tensors: Iterable[TensorInfo]) -> tuple[TensorInfo, TensorInfo] | None:
    """The first two tensors (in file order) whose byte ranges overlap, or None; empty tensors never do.

    Example:
        >>> a = TensorInfo("a", DType.uint8, (4,), Path("f"), 0, 4)
        >>> b = TensorInfo("b", DType.uint8, (4,), Path("f"), 2, 6)
        >>> [t.name for t in first_overlap([b, a])], first_overlap([a])
        (['a', 'b'], None)
    """
    ordered = sorted((t for t in tensors if t.nbytes), key=lambda t: t.start)
    for before, after in itertools.pairwise(ordered):
        if after.start < before.end:
            return before, after
    return None


class _OpenFile:
    """One checkpoint file: an open descriptor, and a read-only map made on first use.

    Opening checks the file is still the one validated (`FileIdentity`); so does every `check` (each read
    calls it). Closing while reads are in flight waits for the last one to finish (`acquire`/`release`):
    a descriptor is never closed under a running ``preadv``, where it could be reused for another file.
    """

    def __init__(self, path: Path, identity: FileIdentity | None) -> None:
        self.path = path
        self.fd = open_regular(path)
        try:
            status = os.fstat(self.fd)
            if identity is not None:
                identity.check(status, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.identity = identity or FileIdentity.of(status)
        self.size = self.identity.size
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False

    def check(self) -> None:
        """Raises `CheckpointChangedError` if the file was truncated, rewritten or touched since opening
        (its descriptor keeps the inode: a file replaced by rename is still read whole and unchanged)."""
        try:
            status = os.fstat(self.fd)
        except OSError as error:
            raise CheckpointReadError(f"{self.path} cannot be read ({error}).", file=self.path) from None
        self.identity.check(status, self.path)

    def map(self) -> mmap.mmap:
        """The file's read-only map. Touching a page past a truncated file's end would kill the
        process (SIGBUS), so every call first checks the file is unchanged."""
        with self._lock:
            self.check()
            if self._map is None:
                try:
                    self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as error:
                    raise CheckpointReadError(
                        f"{self.path} cannot be memory-mapped ({error}); open it with "
                        f"jw.load_weights(path, mmap=False) to read it with plain reads.",
                        file=self.path,
                    ) from None
            return self._map

    def acquire(self) -> None:
        with self._lock:
            if self._closing:
                raise CheckpointError(
                    f"The checkpoint over {self.path} is closed; open it again.", file=self.path
                )
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._close_now()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            busy = self._users > 0
        if not busy:
            self._close_now()

    def _close_now(self) -> None:
        with self._lock:
            if self._map is not None:
                with contextlib.suppress(BufferError):  # arrays still alias the map: unmapped with the last
                    self._map.close()
                self._map = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _check_shapes(tensors: Iterable[TensorInfo]) -> None:
    """Refuses shapes no array can have, whatever the format said (`shape_problem`: too many dimensions,
    or non-zero dimensions multiplying past 2**60). A tensor with elements is already bounded by its bytes
    in the file; an empty one (``[0, 2**63]``) is not, so every format's catalogue is checked here."""
    for info in tensors:
        shape = info.shape
        if len(shape) <= 1 or (len(shape) <= MAX_DIMS and 0 not in shape and info.end > info.start):
            continue  # a 1-d shape or one with stored elements cannot overflow: the bytes bound it
        problem = shape_problem(shape)
        if problem is not None:
            shown = f"{list(shape)[:8]}{'...' if len(shape) > 8 else ''}"
            raise CheckpointError(
                f"Tensor {info.name!r} in {info.file} has shape {shown}: {problem}, which no array can "
                f"have. The file is corrupt or hostile; get it again from its source.",
                file=info.file,
                tensor=info.name,
            )


def _identities(files: Sequence[Path], validated: Mapping[Path, int]) -> dict[Path, FileIdentity]:
    """Each file's `FileIdentity` now, just after its header was validated; a size other than the one
    the parser saw means the file changed while it was being opened."""
    found: dict[Path, FileIdentity] = {}
    for path in files:
        try:
            identity = FileIdentity.of(os.stat(path))
        except OSError:
            continue  # reported, as ours, when the file is first read
        size = validated.get(path)
        if size is not None and size != identity.size:
            raise CheckpointChangedError(
                f"{path} changed size while it was being opened ({size} -> {identity.size} bytes). Wait "
                f"for the writer to finish, then open it again.",
                file=path,
            )
        found[path] = identity
    return found


class Checkpoint(Mapping[str, TensorInfo]):
    """An ordered, read-only catalogue ``name -> TensorInfo`` over one or more open files.

    Produced by `jaxweights.formats.open_checkpoint`; use it as a context manager or call `close`.

    Example:
        >>> import tempfile, numpy as np, jaxweights as jw
        >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
        >>> with jw.open_checkpoint(path) as checkpoint:
        ...     list(checkpoint), checkpoint["w"].shape, checkpoint.format
        (['w'], (2, 3), <WeightsFormat.safetensors: 'safetensors'>)
    """

    __module__ = "jaxweights"

    def __init__(
        self,
        format: WeightsFormat,
        tensors: dict[str, TensorInfo],
        files: list[Path],
        *,
        metadata: Mapping[str, Any] | None = None,
        file_metadata: Mapping[Path, Mapping[str, Any]] | None = None,
        file_sizes: Mapping[Path, int] | None = None,
        sources: tuple[Path, ...] = (),
    ) -> None:
        _check_shapes(tensors.values())
        self.format = format
        self._tensors = tensors
        self.files = tuple(files)
        self.metadata: Mapping[str, Any] = {} if metadata is None else metadata  # may be lazy (GGUF)
        self.file_metadata: Mapping[Path, Mapping[str, Any]] = dict(file_metadata or {})
        self.sources = sources or self.files
        self._identity = _identities(self.files, file_sizes or {})  # a file that changes since is refused
        self._open: dict[Path, _OpenFile] = {}
        self.mapped = True
        """False: every read is a `preadv` into memory jaxweights owns; no file page is ever mapped, so
        no array or view can change or fault when its file is rewritten (`open_checkpoint(mmap=False)`)."""
        self._lock = threading.Lock()
        self._bytes_copied = 0
        self._copy_calls = 0
        self.closed = False

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.format.value}: {len(self)} tensors in {len(self.files)} file(s)>"

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     checkpoint.nbytes
            24
        """
        return sum(info.nbytes for info in self._tensors.values())

    # -- files -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _file(self, path: Path) -> Iterator[_OpenFile]:
        """The open file, held open (against a concurrent `close`) while the block runs."""
        with self._lock:
            if self.closed:
                raise CheckpointError(f"The checkpoint over {path} is closed; open it again.", file=path)
            handle = self._open.get(path)
            if handle is None:
                handle = self._open[path] = _OpenFile(path, self._identity.get(path))
            handle.acquire()
        try:
            yield handle
        finally:
            handle.release()

    def _mapped(self, path: Path) -> np.ndarray:
        """The whole file as a read-only uint8 array over its map. Made while the file is held, so a
        concurrent `close` either comes first (an error here) or finds the map in use and leaves it to
        the arrays that view it."""
        with self._file(path) as handle:
            return np.frombuffer(handle.map(), dtype=np.uint8)

    def close(self) -> None:
        """Closes every file; reads in flight on other threads finish first, later ones raise
        `CheckpointError`. Arrays that alias mapped file pages stay valid.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> checkpoint = jw.open_checkpoint(path)
            >>> checkpoint.close()
            >>> checkpoint.read(checkpoint["w"])
            Traceback (most recent call last):
            jaxweights.errors.CheckpointError: ...
        """
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            self.closed = True
        for handle in handles:
            handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 - at interpreter shutdown contextlib may already be gone
            self.close()
        except Exception:
            pass

    # -- reading -----------------------------------------------------------------------------
    def raw_view(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view over the file map (zero-copy), or, when the
        checkpoint is not `mapped`, as a read-only copy.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     raw = checkpoint.raw_view(checkpoint["w"])
            >>> raw.dtype, raw.size, raw.flags.writeable
            (dtype('uint8'), 24, False)
        """
        if not self.mapped:
            out = aligned_empty((info.nbytes,), np.dtype(np.uint8))
            self._read_bytes(info, out.data.cast("B"), info.start)
            self._count(info.nbytes)
            out.flags.writeable = False
            return out
        out = self._mapped(info.file)[info.start : info.end]
        if out.size != info.nbytes:  # the identity check makes this unreachable; a slice would truncate
            raise CheckpointChangedError(
                f"{info.file} is shorter than tensor {info.name!r} needs.", file=info.file
            )
        return out

    def release(self, info: TensorInfo, offset: int = 0, length: int | None = None) -> None:
        """Drops this process's mapping of a tensor's file pages (they stay in the page cache).

        Call after copying out of `view` so resident memory does not grow by the file's size. Harmless
        for arrays that alias the map: their pages fault back in from the cache on next access.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     copy = checkpoint.view(checkpoint["w"]).copy()
            ...     checkpoint.release(checkpoint["w"])
            >>> copy.sum()
            np.float32(15.0)
        """
        handle = self._open.get(info.file)
        mapped = None if handle is None else handle._map  # read once: a concurrent close may drop it
        if handle is None or mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        length = info.nbytes - offset if length is None else length
        first = (info.start + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(info.start + offset + length, handle.size)
        if last > first:
            with contextlib.suppress(OSError, ValueError):  # best effort
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

    def view(self, info: TensorInfo) -> np.ndarray:
        """The tensor as a read-only numpy array of its logical shape.

        Zero-copy over the file map, except for packed types (float4), which are unpacked into a copy,
        and elements stored in the other byte order (big-endian GGUF files), which are swapped into a
        copy. Quantized tensors come back as their raw uint8 blocks in their byte shape
        (`TensorInfo.stored_shape`).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     view = checkpoint.view(checkpoint["w"])
            >>> view[1].tolist(), view.flags.writeable
            ([3.0, 4.0, 5.0], False)
        """
        raw = self.raw_view(info)
        if not info.contiguous:
            assert info.strides is not None
            itemsize = info.dtype.size_in_bytes
            base = raw[: raw.size - raw.size % itemsize].view(info.dtype.to_numpy())
            out = np.lib.stride_tricks.as_strided(
                base, info.shape, tuple(s * itemsize for s in info.strides), writeable=False
            )
            return out.byteswap() if info.swapped else out
        if info.encoding is not None:
            out = raw.reshape(info.stored_shape)
        elif info.dtype.is_packed:
            out = unpack_nibbles(raw, info.dtype, info.shape)
        elif info.swapped:
            out = raw.view(info.dtype.to_numpy()).reshape(info.shape).byteswap()
        else:
            out = raw.view(info.dtype.to_numpy()).reshape(info.shape)
        out.flags.writeable = False
        return out

    def views(self, infos: Sequence[TensorInfo]) -> list[np.ndarray]:
        """`view` of many tensors, with one size check and one map per file for the plain ones
        (contiguous, in native order, neither packed nor quantized): a few microseconds each.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> tensors = {"a": np.ones(2, np.float32), "b": np.zeros(3, np.int8)}
            >>> path = jw.save_file(tensors, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     [view.tolist() for view in checkpoint.views([checkpoint["a"], checkpoint["b"]])]
            [[1.0, 1.0], [0, 0, 0]]
        """
        bases: dict[Path, np.ndarray] = {}
        out: list[np.ndarray] = []
        for info in infos:
            plain = not (info.strides is not None or info.encoding is not None or info.dtype.is_packed)
            if not plain or info.swapped or not self.mapped:
                out.append(self.view(info))
                continue
            base = bases.get(info.file)
            if base is None:
                base = bases[info.file] = self._mapped(info.file)
            out.append(base[info.start : info.end].view(info.dtype.to_numpy()).reshape(info.shape))
        return out

    def copy_into(self, info: TensorInfo, out: np.ndarray, offset: int = 0) -> None:
        """Copies ``out.nbytes`` bytes, starting ``offset`` bytes into the tensor, into ``out``.

        Reads with `os.preadv`, so no file page is mapped into the process (resident memory grows by
        ``out`` alone) and a file that shrank since it was opened raises `CheckpointError` instead of
        faulting. ``out`` must be C-contiguous and writeable; threads may fill disjoint ranges at once.
        The bytes are added to `bytes_copied`.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> out = np.empty(3, np.float32)
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     checkpoint.copy_into(checkpoint["w"], out, offset=12)
            >>> out.tolist()
            [3.0, 4.0, 5.0]
        """
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ArgumentError(
                f"copy_into needs a C-contiguous, writeable output buffer for tensor {info.name!r}; pass "
                f"np.empty(...) or `aligned_empty`, not a view or a read-only array.",
                tensor=info.name,
            )
        flat = out.reshape(-1).view(np.uint8)
        if offset < 0 or offset + flat.nbytes > info.nbytes:
            raise ShapeMismatchError(
                f"bytes [{offset}, {offset + flat.nbytes}) are outside tensor {info.name!r}, which holds "
                f"{info.nbytes} bytes; the buffer or the offset is too large.",
                file=info.file,
                tensor=info.name,
            )
        self._read_bytes(info, flat.data.cast("B"), info.start + offset)
        self._count(flat.nbytes)

    def _read_bytes(self, info: TensorInfo, buffer: memoryview, position: int) -> None:
        """Fills ``buffer`` from ``position`` in the tensor's file with `preadv`, the file checked first."""
        done, total = 0, len(buffer)
        with self._file(info.file) as handle:
            handle.check()
            while done < total:
                try:
                    count = os.preadv(handle.fd, [buffer[done:]], position + done)
                except OSError as error:
                    raise CheckpointReadError(
                        f"Reading tensor {info.name!r} from {info.file} failed ({error.strerror or error}); "
                        f"check the disk or the network filesystem, then retry.",
                        file=info.file,
                        tensor=info.name,
                    ) from None
                if count <= 0:
                    raise CheckpointChangedError(
                        f"{info.file} ended after {position + done} bytes while reading tensor "
                        f"{info.name!r} (expected {position + total}). The file was truncated after "
                        f"opening; re-open the checkpoint.",
                        file=info.file,
                        tensor=info.name,
                    )
                done += count

    def copy_block(
        self, info: TensorInfo, out: np.ndarray, key: tuple[tuple[int, int], ...], *, release: bool = True
    ) -> None:
        """``out[...] = tensor[key]``, converting to ``out.dtype``; ``key`` holds ``(start, stop)`` per
        dimension. Counts the bytes read and, with ``release``, releases the file pages the block spans
        (pass False when other blocks still need those pages).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> out = np.empty((2, 2), np.float64)
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     checkpoint.copy_block(checkpoint["w"], out, ((0, 2), (1, 3)))
            >>> out.tolist()
            [[1.0, 2.0], [4.0, 5.0]]
        """
        if not self.mapped and info.contiguous and key:  # read the rows the block spans, no more
            (first_row, last_row), rest = key[0], key[1:]
            row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
            rows = aligned_empty((max(0, last_row - first_row) * row_bytes,), np.dtype(np.uint8))
            self._read_bytes(info, rows.data.cast("B"), info.start + first_row * row_bytes)
            band = rows.view(info.dtype.to_numpy()).reshape(last_row - first_row, *info.shape[1:])
            if info.swapped:
                band = band.byteswap()
            source = band[(slice(None), *(slice(start, stop) for start, stop in rest))]
        else:
            source = self.view(info)[tuple(slice(start, stop) for start, stop in key)]
        np.copyto(out, source, casting="unsafe")
        itemsize = info.dtype.size_in_bytes
        if source.size and release:
            strides = c_strides(info.shape, itemsize)
            first = sum(start * stride for (start, _), stride in zip(key, strides, strict=True))
            last = sum((stop - 1) * stride for (_, stop), stride in zip(key, strides, strict=True)) + itemsize
            self.release(info, first, last - first)
        self._count(source.size * itemsize)

    def note_copied(self, nbytes: int) -> None:
        """Counts ``nbytes`` copied out of a `view` by another reader (XLA copying an unaligned view).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     checkpoint.note_copied(24)
            ...     checkpoint.copy_calls, checkpoint.bytes_copied
            (1, 24)
        """
        self._count(nbytes)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._bytes_copied += nbytes
            self._copy_calls += 1

    @property
    def copy_calls(self) -> int:
        """Copies made out of the files so far (one per contiguous chunk or strided block chunk).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     _ = checkpoint.read(checkpoint["w"])
            ...     checkpoint.copy_calls
            1
        """
        return self._copy_calls

    @property
    def bytes_copied(self) -> int:
        """Bytes copied out of the files so far (zero-copy views do not count).

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     _ = checkpoint.view(checkpoint["w"])  # zero-copy
            ...     before = checkpoint.bytes_copied
            ...     _ = checkpoint.read(checkpoint["w"])
            ...     before, checkpoint.bytes_copied
            (0, 24)
        """
        return self._bytes_copied

    def read(self, info: TensorInfo) -> np.ndarray:
        """A fresh, 64-byte aligned, writeable copy of the tensor in its logical shape.

        Example:
            >>> import tempfile, numpy as np, jaxweights as jw
            >>> path = jw.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, f"{tempfile.mkdtemp()}/m.safetensors")
            >>> with jw.open_checkpoint(path) as checkpoint:
            ...     array = checkpoint.read(checkpoint["w"])
            >>> array.flags.writeable, array.ctypes.data % 64, array[0].tolist()
            (True, 0, [0.0, 1.0, 2.0])
        """
        if info.encoding is not None:
            out = aligned_empty(info.stored_shape, np.dtype(np.uint8))
            self.copy_into(info, out)
            return out
        if info.dtype.is_packed:
            packed = np.empty(info.nbytes, dtype=np.uint8)
            self.copy_into(info, packed)
            return unpack_nibbles(packed, info.dtype, info.shape)
        if not info.contiguous:  # a strided view: gathered from the map, then its pages released
            out = aligned_empty(info.shape, info.dtype.to_numpy())
            np.copyto(out, self.view(info))
            self.release(info)
            self._count(out.nbytes)
            return out
        out = aligned_empty(info.shape, info.dtype.to_numpy())
        self.copy_into(info, out)
        if info.swapped:
            out.byteswap(inplace=True)
        return out
