"""The dump file's I/O engine: copies in the kernel, early writeback, hashing through mmap, worker threads.

Shared by the writer and the reader; nothing here knows the file format.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import blake3

COPY_CHUNK = 64 << 20
STREAM_CHUNK = 4 << 20
SYNC_FILE_RANGE_WRITE = 2
_FALLBACK_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int, *, writeback: bool = False) -> int:
    """Copy in the kernel where it can (copy_file_range, else sendfile); returns the bytes copied, short only at EOF."""
    done = 0
    while done < length:
        n = _copy_chunk(src, dst, src_off + done, dst_off + done, min(COPY_CHUNK, length - done))
        if n == 0:
            break
        if writeback:
            start_writeback(dst, dst_off + done, n)
        done += n
    return done


def _copy_chunk(src: int, dst: int, src_off: int, dst_off: int, count: int) -> int:
    try:
        return os.copy_file_range(src, dst, count, src_off, dst_off)
    except OSError as e:
        if e.errno not in _FALLBACK_COPY:
            raise
    # Across filesystems (EXDEV since Linux 5.19, e.g. images in tmpfs) sendfile still copies in the kernel.
    os.lseek(dst, dst_off, os.SEEK_SET)
    try:
        return os.sendfile(dst, src, src_off, count)
    except OSError as e:
        if e.errno not in _FALLBACK_COPY:
            raise
    data = os.pread(src, min(count, STREAM_CHUNK), src_off)
    pwrite_all(dst, data, dst_off)
    return len(data)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the disk start on what was just written, so that the final fsync has little left to wait for."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range() -> Any:
    # Not in the os module. Unlike posix_fadvise(DONTNEED), it starts writeback without evicting pages that
    # are already clean, so a restore on this host finds the dump file in the page cache.
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _load_sync_file_range()


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_exactly(fd: int, length: int, offset: int) -> bytes:
    """pread until `length` bytes or end of file (a pread may return less than asked for big lengths)."""
    parts, done = [], 0
    while done < length:
        part = os.pread(fd, length - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


class FdWriter:
    """A write()-only file object over fd from `offset` on, for zstandard's copy_stream."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd, self.start, self.written, self._synced = fd, offset, 0, 0

    def write(self, data: bytes) -> int:
        pwrite_all(self.fd, data, self.start + self.written)
        self.written += len(data)
        if self.written - self._synced >= COPY_CHUNK:
            start_writeback(self.fd, self.start + self._synced, self.written - self._synced)
            self._synced = self.written
        return len(data)


class Hasher(Protocol):
    """A running hash: hashlib's and blake3's hashers alike."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


# Member digest algorithms by the name the manifest gives them. Both drop the GIL while they hash a large
# buffer, so hashing overlaps with copying. blake3 stays single-threaded: its extra threads would compete with
# CRIU and the copies for this host's cores.
DIGESTS = ("sha256", "blake3")


def hasher(algorithm: str) -> Hasher:
    """A new running hash; ValueError for an algorithm not in DIGESTS."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        return blake3.blake3(max_threads=1)
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def hash_file(path: Path, algorithm: str) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size, hash_region(fd, 0, size, algorithm)
    finally:
        os.close(fd)


def hash_region(fd: int, offset: int, length: int, algorithm: str) -> str:
    """The hex digest of a file range, hashed in place through mmap (no copy; the hasher drops the GIL meanwhile)."""
    digest = hasher(algorithm)
    hash_region_into(digest, fd, offset, length)
    return digest.hexdigest()


def hash_region_into(digest: Hasher, fd: int, offset: int, length: int) -> None:
    """Feed a file range to a running hash, in place through mmap. The range must lie inside the file."""
    if length:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, offset - start + length, access=mmap.ACCESS_READ, offset=start) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mapped) as view, view[offset - start :] as region:
                digest.update(region)


def hash_read_into(digest: Hasher, fd: int, offset: int, length: int, buffer: bytearray) -> None:
    """Feed a file range to a running hash, read through `buffer`. For data just written (hot in the page
    cache) this beats mmap: a copy into a cache-hot buffer costs less than faulting every page in."""
    view = memoryview(buffer)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
        if n == 0:
            raise OSError(errno.EIO, f"the file ends at {offset}, before {end}")
        digest.update(view[:n])
        offset += n


class Worker:
    """Runs `fn` on queued items on a thread of its own, so that it overlaps with producing the next item.

    An error in `fn` is kept (later items are dropped) and raised by the producer's next put() or check().
    """

    def __init__(self, fn: Callable[[Any], object]) -> None:
        self._fn = fn
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="vzpy-dumpfile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:
                    self._error = e

    def put(self, item: Any) -> None:
        self.check()
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def check(self) -> None:
        if self._error is not None:
            raise self._error


_STOP = object()


class Oversize(Exception):
    """More bytes came out than the sink was told to expect."""


class Sink:
    """Where a member is decompressed to: counted, then hashed and (unless verifying) written on worker threads."""

    def __init__(self, out: int | None, limit: int, algorithm: str) -> None:
        self.limit, self.count, self.digest = limit, 0, hasher(algorithm)
        self.workers = [Worker(self.digest.update)]
        if out is not None:
            self.workers.append(Worker(lambda item: pwrite_all(out, item[1], item[0])))

    def write(self, data: bytes) -> int:
        if self.count + len(data) > self.limit:
            raise Oversize
        self.workers[0].put(data)
        if len(self.workers) > 1:
            self.workers[1].put((self.count, data))
        self.count += len(data)
        return len(data)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def finish(self) -> tuple[int, str]:
        """Wait for the workers; (bytes, hex digest) or the error one of them met."""
        self.stop()
        for worker in self.workers:
            worker.check()
        return self.count, self.digest.hexdigest()


class RegionReader:
    """A read()-only file object over fd[offset:offset+length], for zstandard's copy_stream."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + length

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


def os_text(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


def zstd_module(error: type[Exception]) -> Any:
    try:
        import zstandard
    except ImportError:
        raise error("zstd compression needs the zstandard Python package (run `make setup`)") from None
    return zstandard
