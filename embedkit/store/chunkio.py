"""Fast local I/O for the chunk files of the store's Zarr v3 arrays (same format as zarr-python).

zarr-python stays in charge of metadata (``zarr.json``), of non-local (fsspec) roots and of
fancy-index reads. For arrays on a local directory whose codec chain is exactly
``bytes(little endian)`` optionally followed by ``zstd`` (no filters, no sharding) and whose
chunks span every axis but the first, this module reads and writes the chunk files directly:

* chunk ``i`` holds rows ``[i * chunk_rows, (i + 1) * chunk_rows)``; its file is
  ``<array dir>/<key>`` with ``key`` from the array's own chunk key encoding (``c/<i>/0/...``);
* the file is the raw C-order little-endian bytes of the full chunk (the edge chunk is padded
  with the fill value, as zarr-python does), or one zstd frame of those bytes made by the same
  ``numcodecs.zstd.Zstd`` (level, checksum flag) zarr-python uses, so files are byte-identical.

Writes go straight from the caller's array to the file (zero padding of an uncompressed edge
chunk is a sparse ``ftruncate``); full reads go straight from the file into the caller's
preallocated output (``preadv`` for raw chunks, zstd decompression into place), chunks in
parallel on a 2-thread pool (file I/O and zstd release the GIL; measured: two threads
decode zstd at 2x the rate of one).

Durable writes go out in :data:`WRITEBACK_PIECE` pieces, each followed by a non-blocking
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` (Linux; a no-op elsewhere) so the disk flushes piece
``k`` while piece ``k + 1`` is copied into the page cache; the final ``fdatasync`` then waits for
little. Measured for 13 x 32 MB chunk files: 1.6 GB/s with write + fdatasync, 2.4-2.5 GB/s with
4 MiB pieces, vs 1.8-2.0 GB/s for ``np.save`` + ``fsync`` of the same 410 MB in one file.

Crash guarantee (used by ``FeatureEntry.write_unit``): with ``durable=True`` a chunk file is
``fdatasync``-ed before :meth:`ChunkLayout.write_chunk` returns (or, with ``sync=False``, by
:meth:`ChunkLayout.sync_chunk`, which the caller runs before relying on it), and the directories
whose entries it created or changed are returned so the caller can ``fsync`` them once per unit
(:func:`fsync_dirs`). The caller writes the unit's completion record (itself written to a
temporary file, fsync-ed, then renamed) only after that, so after a crash or power loss a
unit record can only exist if every chunk of the unit is on stable storage; a unit without a
record is simply rewritten on resume (files are overwritten with ``O_TRUNC``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import BytesCodec, ZstdCodec

from embedkit.store.checks import FAST_CRC32C, Scan, scan, scan_more

__all__ = [
    "POOL",
    "WRITEBACK_PIECE",
    "ChunkDecodeError",
    "ChunkLayout",
    "fsync_dirs",
    "zstd_content_size",
]

#: Shared by every entry of the process: the machine has 2 cores; more threads only contend.
POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embedkit-chunkio")
#: Bytes written between two writeback kicks of a durable chunk write (see the docstring).
WRITEBACK_PIECE = 4 << 20
_SYNC_FILE_RANGE_WRITE = 2
_T = TypeVar("_T")
#: Bytes read, then checked, at a time by checked reads. Measured (bench_store.py, quiet
#: machine, checked full read of 200,000 x 1024 float16 vs np.load): 128 KiB 0.53-0.57x,
#: 512 KiB 0.67-0.69x, 2 MiB 0.79x, 4 MiB 0.84-0.94x: the per-piece cost (a syscall, the Python
#: loop, two reductions and a crc32c call) outweighs re-reading a piece from memory.
READ_PIECE = 4 << 20


def _load_sync_file_range() -> Callable[[int, int, int], object] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` from libc, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # ctypes releases the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _load_fallocate() -> Callable[[int, int], int] | None:
    """``fallocate(fd, 0, 0, nbytes)`` from libc (0 or an errno), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int

    def fallocate(fd: int, nbytes: int) -> int:
        return 0 if fn(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()

    return fallocate


#: Reserves a new chunk file's blocks before it is written (Linux ``fallocate``; not glibc's
#: ``posix_fallocate``, which emulates it by writing where unsupported). ext4 then maps the
#: file as one extent instead of allocating block by block as the page cache fills: measured
#: on 410 MB written as 8 MB files, 63-89 ms with it vs 106-124 ms without for the same
#: ``os.write`` calls. It is what makes ``np.save`` that fast (numpy's ``tofile`` fallocates
#: files over 16 MB; a plain ``write`` of the same 410 MB buffer took 1.5x as long). Running
#: out of space also fails here, before anything is written.
_fallocate = _load_fallocate()


def _preallocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` for ``fd``; ENOSPC/EDQUOT raise, unsupported filesystems are skipped."""
    if _fallocate is None or nbytes <= 0:
        return
    err = _fallocate(fd, nbytes)
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(err, os.strerror(err))


#: Starts writeback of a file range without waiting (a hint: its result is ignored, the
#: ``fdatasync`` that follows is what makes the data durable). None where unavailable.
_start_writeback = _load_sync_file_range()


class ChunkDecodeError(RuntimeError):
    """A chunk file is truncated or cannot be decoded (the entry is damaged)."""


def _write_all(fd: int, data: memoryview, *, kick: bool = False) -> None:
    """Write all of ``data``; with ``kick``, start writeback after every piece."""
    kick = kick and _start_writeback is not None and data.nbytes > WRITEBACK_PIECE
    piece = WRITEBACK_PIECE if kick else max(data.nbytes, 1)
    for start in range(0, data.nbytes, piece):
        end = min(start + piece, data.nbytes)
        done = start
        while done < end:
            done += os.write(fd, data[done:end])
        if kick:
            _start_writeback(fd, start, end - start)  # type: ignore[misc]


def _readinto_all(fd: int, buf: memoryview, offset: int) -> int:
    got = 0
    while got < buf.nbytes:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def zstd_content_size(frame: bytes | bytearray | memoryview) -> int | None:
    """Decompressed size declared in a zstd frame header, or None if absent or not zstd."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = frame[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(frame) < pos + size:
        return None
    value = int.from_bytes(frame[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def fsync_dirs(dirs: Iterable[Path]) -> None:
    """fsync each directory (makes new or replaced entries in it durable)."""
    for d in sorted(set(dirs)):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _makedirs(d: Path) -> list[Path]:
    """Create ``d`` and missing parents; return the directories whose entries changed."""
    missing: list[Path] = []
    p = d
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    changed = [p] if missing else []
    for m in reversed(missing):
        m.mkdir(exist_ok=True)  # another writer of another unit may race us: fine
        changed.append(m)
    return changed[:-1] if changed else []  # ``d`` itself is added by the caller


class ChunkLayout:
    """Where and how the chunks of one array live on a local disk. Build with :meth:`of`."""

    def __init__(
        self,
        directory: Path,
        shape: tuple[int, ...],
        chunk_rows: int,
        dtype: np.dtype[Any],
        fill_value: Any,
        zstd: Zstd | None,
        key: Callable[[tuple[int, ...]], str],
    ) -> None:
        self.directory = directory
        self.shape = shape
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.chunk_shape = (chunk_rows, *shape[1:])
        self.row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.chunk_nbytes = chunk_rows * self.row_nbytes
        self.fill = np.full((), fill_value, dtype=dtype)
        self.zero_fill = not any(self.fill.tobytes())
        self.zstd = zstd
        self._key = key
        self._tail = (0,) * (len(shape) - 1)

    @classmethod
    def of(cls, arr: zarr.Array[Any], directory: Path) -> ChunkLayout | None:
        """The layout of ``arr`` stored under ``directory``, or None if this engine can't."""
        meta = arr.metadata
        if getattr(meta, "zarr_format", None) != 3:
            return None
        codecs = tuple(getattr(meta, "codecs", ()))
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        zstd: Zstd | None = None
        if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
            zstd = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        elif len(codecs) != 1:
            return None
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in "biuf" or dtype.byteorder == ">":
            return None
        endian = codecs[0].endian
        if dtype.itemsize > 1 and (endian is None or endian.value != "little"):
            return None
        chunks = tuple(arr.chunks)
        shape = tuple(arr.shape)
        if not shape or chunks[1:] != shape[1:] or chunks[0] <= 0:
            return None
        return cls(directory, shape, chunks[0], dtype, meta.fill_value, zstd, meta.encode_chunk_key)

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def chunk_path(self, i: int) -> Path:
        return self.directory / self._key((i, *self._tail))

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_rows
        return start, min(start + self.chunk_rows, self.shape[0])

    def chunks_in(self, start: int, stop: int) -> range:
        """The chunks that rows ``[start, stop)`` cover exactly (chunk-aligned bounds only)."""
        if start % self.chunk_rows or (stop % self.chunk_rows and stop != self.shape[0]):
            raise ValueError(
                f"rows [{start}, {stop}) are not aligned to chunks of {self.chunk_rows} rows"
            )
        return range(start // self.chunk_rows, -(-stop // self.chunk_rows))

    # ---- writing ------------------------------------------------------------------------

    def write_chunk(
        self, i: int, rows: np.ndarray, *, durable: bool, sync: bool = True
    ) -> list[Path]:
        """Write chunk ``i`` from ``rows`` (its rows, C-contiguous, this dtype).

        The file's blocks are reserved first (:func:`_preallocate`). With ``durable`` the
        file's writeback starts piece by piece and, if ``sync``, the file is fdatasync-ed
        before returning (``sync=False``: the caller calls :meth:`sync_chunk` later, so that
        this thread can go on to the next chunk while the disk writes). Returns the
        directories to fsync for the file's directory entry to be durable too (see the module
        docstring).
        """
        start, stop = self.chunk_bounds(i)
        if rows.shape != (stop - start, *self.shape[1:]) or rows.dtype != self.dtype:
            raise ValueError(
                f"chunk {i}: expected {self.dtype} {(stop - start, *self.shape[1:])}, "
                f"got {rows.dtype} {rows.shape}"
            )
        rows = np.ascontiguousarray(rows)
        pad = self.chunk_rows - rows.shape[0]
        sparse_pad = 0
        if self.zstd is not None or (pad and not self.zero_fill):
            if pad:
                full = np.empty(self.chunk_shape, dtype=self.dtype)
                full[: rows.shape[0]] = rows
                full[rows.shape[0] :] = self.fill
                rows = full
            flat = rows.reshape(-1).view(np.uint8)
            payload = memoryview(self.zstd.encode(flat)) if self.zstd is not None else flat.data
        else:
            payload = rows.reshape(-1).view(np.uint8).data
            sparse_pad = pad * self.row_nbytes
        path = self.chunk_path(i)
        dirs = _makedirs(path.parent)
        dirs.append(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _preallocate(fd, payload.nbytes)
            _write_all(fd, payload.cast("B"), kick=durable)
            if sparse_pad:
                os.ftruncate(fd, payload.nbytes + sparse_pad)  # a hole reads back as zeros
            if durable and sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return dirs

    def sync_chunk(self, i: int) -> None:
        """fdatasync the file of chunk ``i`` (written by ``write_chunk(..., sync=False)``)."""
        fd = os.open(self.chunk_path(i), os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------

    def _read_chunk(self, i: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows ``[lo, hi)`` of chunk ``i`` into ``out`` (shape ``(hi - lo, ...)``).

        A missing chunk file is an error (:class:`ChunkDecodeError`), never the fill value:
        the store writes every chunk of a unit before its record.
        """
        path = self.chunk_path(i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ChunkDecodeError(f"chunk file {path} is missing") from exc
        try:
            size = os.fstat(fd).st_size
            direct = out.dtype == self.dtype and out.flags.c_contiguous
            if self.zstd is None:
                if size != self.chunk_nbytes:
                    raise ChunkDecodeError(
                        f"chunk file {path} holds {size} bytes, expected {self.chunk_nbytes}"
                    )
                dest = out if direct else np.empty((hi - lo, *self.shape[1:]), self.dtype)
                view = dest.reshape(-1).view(np.uint8).data
                if _readinto_all(fd, view, lo * self.row_nbytes) != view.nbytes:
                    raise ChunkDecodeError(f"chunk file {path} is shorter than expected")
                if not direct:
                    out[...] = dest
                return
            data = np.empty(size, dtype=np.uint8).data  # not zero-filled, unlike bytearray
            if _readinto_all(fd, data, 0) != size:
                raise ChunkDecodeError(f"chunk file {path} changed while being read")
        finally:
            os.close(fd)
        declared = zstd_content_size(data)
        if declared is None:  # a frame without content size (another writer): stream it
            try:
                flat = np.frombuffer(self.zstd.decode(data), dtype=np.uint8)
            except (RuntimeError, ValueError) as exc:
                raise ChunkDecodeError(f"chunk file {path} cannot be decoded: {exc}") from exc
            if flat.nbytes != self.chunk_nbytes:
                raise ChunkDecodeError(
                    f"chunk file {path} decodes to {flat.nbytes} bytes, "
                    f"expected {self.chunk_nbytes}"
                )
            out[...] = flat.view(self.dtype).reshape(self.chunk_shape)[lo:hi]
            return
        if declared != self.chunk_nbytes:
            raise ChunkDecodeError(
                f"chunk file {path} is not a zstd frame of {self.chunk_nbytes} bytes "
                f"(header declares {declared})"
            )
        whole = direct and lo == 0 and hi == self.chunk_rows
        dest = out if whole else np.empty(self.chunk_shape, self.dtype)
        try:
            self.zstd.decode(data, out=dest.reshape(-1).view(np.uint8))
        except (RuntimeError, ValueError) as exc:
            raise ChunkDecodeError(f"chunk file {path} cannot be decoded: {exc}") from exc
        if not whole:
            out[...] = dest[lo:hi]

    def _read_and_scan(self, i: int, out: np.ndarray, check: bool) -> Scan:
        """All rows of chunk ``i`` into ``out`` (this dtype, C-contiguous), scanned as read.

        Raw chunks are read :data:`READ_PIECE` bytes at a time, each piece summed and checked
        right after it lands (few, large pieces: see :data:`READ_PIECE`); zstd chunks are
        decoded whole, then scanned.
        """
        if self.zstd is not None:
            self._read_chunk(i, 0, out.shape[0], out)
            return scan(out, check=check)
        path = self.chunk_path(i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ChunkDecodeError(f"chunk file {path} is missing") from exc
        flat = out.reshape(-1)
        crc: int | None = 0 if FAST_CRC32C else None
        finite = True
        try:
            size = os.fstat(fd).st_size
            if size != self.chunk_nbytes:
                raise ChunkDecodeError(
                    f"chunk file {path} holds {size} bytes, expected {self.chunk_nbytes}"
                )
            step = max(READ_PIECE // self.dtype.itemsize, 1)
            for start in range(0, flat.size, step):
                piece = flat[start : start + step]
                view = piece.view(np.uint8).data
                if _readinto_all(fd, view, start * self.dtype.itemsize) != view.nbytes:
                    raise ChunkDecodeError(f"chunk file {path} is shorter than expected")
                if finite:
                    finite, crc = scan_more(crc, piece, check=check)
        finally:
            os.close(fd)
        return Scan(finite=finite, crc32c=crc if finite else None, nbytes=flat.nbytes)

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``[start, stop)`` into ``out`` (any dtype/strides numpy can assign to)."""
        if out.shape != (stop - start, *self.shape[1:]):
            raise ValueError(f"expected out of shape {(stop - start, *self.shape[1:])}")
        jobs: list[Future[None]] = []
        for i in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            c0, c1 = self.chunk_bounds(i)
            lo, hi = max(start, c0), min(stop, c1)
            if lo >= hi:
                continue
            part = out[lo - start : hi - start]
            jobs.append(POOL.submit(self._read_chunk, i, lo - c0, hi - c0, part))
        _wait_all(jobs)

    def read_rows_scanned(
        self, start: int, stop: int, out: np.ndarray, *, check: bool
    ) -> list[tuple[int, Scan]]:
        """Chunk-aligned rows ``[start, stop)`` into ``out`` (this dtype, C-contiguous), each
        chunk read and then scanned (crc32c, and NaN/Inf with ``check``) by the same pool job,
        so the check reads memory that is still in the CPU cache. Returns ``(chunk, scan)`` in
        row order; the caller compares the joined checksums with the unit records."""
        if out.shape != (stop - start, *self.shape[1:]) or out.dtype != self.dtype:
            raise ValueError(f"expected out of {self.dtype} {(stop - start, *self.shape[1:])}")
        if not out.flags.c_contiguous:
            raise ValueError("expected a C-contiguous out")
        chunks = self.chunks_in(start, stop)
        jobs: list[Future[Scan]] = []
        for i in chunks:
            c0, c1 = self.chunk_bounds(i)
            jobs.append(POOL.submit(self._read_and_scan, i, out[c0 - start : c1 - start], check))
        return list(zip(chunks, _wait_all(jobs), strict=True))


def _wait_all(jobs: list[Future[_T]]) -> list[_T]:
    """The results of ``jobs`` in order; the first failure is raised, the rest cancelled."""
    try:
        return [job.result() for job in jobs]
    finally:
        for job in jobs:
            job.cancel()
