"""CRIU's memory images streamed straight into the dump file while CRIU dumps (docs/dumpfile.md, "Writing").

Before the dump, named FIFOs pages-1.img .. pages-K.img wait in CRIU's image directory (CRIU numbers its
pages images from 1, one counter for processes and shared memory). CRIU opens them as it would its files
and splices the pages in; a pump thread splices them on into the dump file, one member after the other
from a reserved offset, and a hasher thread reads each range back from the page cache (format.DIGEST) and starts
its writeback. So the dump file is the only write, and the disk works while CRIU still dumps.

Every FIFO is drained continuously, or CRIU would block. Only one member can grow at the end of the file:
a pages image CRIU fills while another one streams is spilled to a scratch file and packed later, like a
pages image numbered beyond K (a regular file in the image directory). A write error does not stop the
draining: the rest goes to /dev/null, CRIU finishes (the CT is left intact) and finish() raises the error.
"""

from __future__ import annotations

import fcntl
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vzpy import proc
from vzpy.dumpfile import keeper, kio
from vzpy.dumpfile.format import ALIGN, DIGEST, round_up
from vzpy.errors import ChkpntError

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # fewer, larger splices than with the 64 KiB default
SPLICE_CHUNK = 1 << 20
VISIT_CHUNKS = 16  # splices per FIFO per turn: another FIFO that CRIU fills meanwhile is not starved
HASH_BATCH = 8 << 20
HASH_BUFFER = 1 << 20  # fits the CPU's cache: read back and hashed while hot
POLL_MS = 100
# how /proc/PID/maps names the shared memory CRIU dumps pages of (file-backed shared mappings it does not)
SHMEM_NAMES = ("/dev/zero", "/SYSV", "/memfd:")
STOP_GRACE = 10.0  # how long a stopped pump or hasher may take to notice


def pages_images(pids: Iterable[int]) -> int:
    """How many pages images CRIU will write for these (frozen) processes: one a process, and one for each
    shared memory segment (shared anonymous, SysV, memfd), which CRIU numbers as it meets them.

    The maps are the CT's (untrusted): they are only counted, and the count only sizes the FIFOs."""
    pids = list(pids)
    segments = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1][3:4] == "s" and fields[5].startswith(SHMEM_NAMES):
                segments.add((fields[3], fields[4]))
    return len(pids) + len(segments)


@dataclass(frozen=True)
class Streamed:
    """A member the pump placed in the dump file."""

    name: str
    offset: int
    size: int
    digest: str  # hex, of format.DIGEST


class _Fifo:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.fd = -1
        self.out = -1  # the dump file, a spill file, or /dev/null
        self.offset = 0
        self.written = 0
        self.hashed = 0  # bytes handed to the hasher so far
        self.spill: Path | None = None
        self.made = False  # the FIFO is ours to remove
        self.started = False


class _Hasher:
    """The digests (format.DIGEST) of the ranges the pump wrote, read back from the page cache; their writeback.

    Writeback runs on a thread of its own: sync_file_range blocks while the disk's queue is full, and neither
    the pump nor the hash may wait for the disk.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd  # readable; writeback is started through it too
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._running: dict[str, kio.Hasher] = {}
        self._buffer = bytearray(HASH_BUFFER)
        self._queue: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._written: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._hash, name="vzpy-stream-hash", daemon=True),
            threading.Thread(target=self._writeback, name="vzpy-stream-writeback", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def add(self, name: str, offset: int, length: int) -> None:
        self._queue.put((name, offset, length))
        self._written.put((offset, length))  # not after the hash: writeback need not wait for a lagging hasher

    def end(self, name: str) -> None:
        self._queue.put((name, -1, 0))

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Whether both threads are done (stop() first)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self.threads)

    def _hash(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if self.error is None:
                    self._hash_one(*item)
        finally:
            self._written.put(None)

    def _hash_one(self, name: str, offset: int, length: int) -> None:
        try:
            if name not in self._running:
                self._running[name] = kio.hasher(DIGEST)
            digest = self._running[name]
            if offset < 0:
                self.digests[name] = digest.hexdigest()
            else:
                kio.hash_read_into(digest, self.fd, offset, length, self._buffer)
        except BaseException as e:
            self.error = e

    def _writeback(self) -> None:
        while (item := self._written.get()) is not None:
            try:
                kio.start_writeback(self.fd, *item)
            except OSError:
                pass  # only a head start: the final fsync writes what this did not


class PagesPump:
    """FIFOs pages-1..COUNT in images_dir, pumped into fd from offset `start` on (see the module docstring).

    start() before CRIU runs; finish() once it returned; close() always (it also removes the FIFOs).
    """

    def __init__(self, fd: int, images_dir: Path, spill_dir: Path, count: int, start: int) -> None:
        self.fd, self.spill_dir, self.data_start, self.end = fd, spill_dir, start, start
        self.error: OSError | None = None
        self._fifos = [_Fifo(images_dir / f"pages-{n}.img") for n in range(1, count + 1)]
        self._owner: _Fifo | None = None
        self._criu_done = threading.Event()
        self._stop = threading.Event()
        self._devnull = -1
        self._keeper: proc.Child | None = None
        self._lifeline = -1
        self._wake_r = self._wake_w = self._reader = -1
        self._hasher = _Hasher(-1)
        self._thread = threading.Thread(target=self._run, name="vzpy-stream-pump", daemon=True)
        self._streamed: list[_Fifo] = []
        self._spilled: list[_Fifo] = []
        try:
            self._make_fifos()
        except BaseException:
            self.close()
            raise

    def _make_fifos(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # ends the pump's poll at once
        # the dump file's fd is write-only: the hasher reads the same file through an fd of its own
        self._reader = self._hasher.fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        for fifo in self._fifos:
            os.mkfifo(fifo.path, 0o600)
            fifo.made = True
            fifo.fd = os.open(fifo.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(fifo.fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: the default size works too

    def start(self) -> None:
        self._start_keeper()
        self._hasher.start()
        self._thread.start()

    def _start_keeper(self) -> None:
        """The FIFOs' keeper (vzpy.dumpfile.keeper): CRIU must not block on them forever if vzpy is killed."""
        theirs, self._lifeline = os.pipe()
        try:
            fds = [f.fd for f in self._fifos]
            argv = [sys.executable, "-S", keeper.__file__, str(theirs), str(self._fifos[0].path.parent), *map(str, fds)]
            # its own session: a ^C meant for vzpy must not take it away while vzpy still unwinds
            self._keeper = proc.spawn(
                argv,
                timeout=None,
                what="dump FIFO keeper",
                error=ChkpntError,
                pass_fds=[theirs, *fds],
                new_session=True,
            )
        finally:
            os.close(theirs)

    def finish(self, timeout: float) -> tuple[list[Streamed], dict[str, Path]]:
        """After CRIU returned: drain what is left; (members in the dump file, spilled name -> file).

        Raises the first write error the pump met (OSError), or ChkpntError if it did not finish in time.
        """
        deadline = time.monotonic() + timeout
        self._criu_done.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ChkpntError(f"the dump file's writer did not finish within {timeout:.0f}s; check the disk")
        self._hasher.stop()
        hashed = self._hasher.join(max(deadline - time.monotonic(), 0.1))
        if self.error is not None:
            raise self.error
        if not hashed:
            raise ChkpntError(f"hashing the dump file did not finish within {timeout:.0f}s; check the disk")
        if self._hasher.error is not None:
            raise self._hasher.error
        streamed = [
            Streamed(f.name, f.offset, f.written, self._hasher.digests[f.name])
            for f in sorted(self._streamed, key=lambda f: f.offset)
        ]
        return streamed, {f.name: f.spill for f in self._spilled if f.spill is not None}

    def close(self) -> None:
        """Stop both threads (each within STOP_GRACE), close every fd, remove the FIFOs."""
        self._stop.set()
        self._wake()
        if self._keeper is not None:
            self._keeper.close()  # vzpy is alive: it need not drain anything
            self._keeper = None
        if self._thread.is_alive():
            self._thread.join(STOP_GRACE)
        self._hasher.stop()
        hashed = self._hasher.join(STOP_GRACE)
        if self._thread.is_alive() or not hashed:
            return  # stuck in a write: its fds stay open rather than be reused under it (the thread is a daemon)
        for fifo in self._fifos:
            for fd in {fifo.fd, fifo.out} - {-1, self.fd, self._devnull}:
                os.close(fd)
            fifo.fd = fifo.out = -1
            if fifo.made:
                fifo.path.unlink(missing_ok=True)
                fifo.made = False
        for fd in (self._devnull, self._reader, self._lifeline, self._wake_r, self._wake_w):
            if fd != -1:
                os.close(fd)
        self._devnull = self._reader = self._lifeline = self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        if self._wake_w != -1:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # full: the pump has wake-ups enough

    # --- the pump thread

    def _run(self) -> None:
        try:
            self._pump()
        except BaseException as e:  # nothing may kill the pump silently: CRIU would block on a full FIFO
            if self.error is None:
                self.error = e if isinstance(e, OSError) else OSError(f"dump file writer failed: {e!r}")

    def _pump(self) -> None:
        poller = select.poll()
        live = {f.fd: f for f in self._fifos}
        for fd in live:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while live and not self._stop.is_set():
            # Read before polling: once CRIU is done, every FIFO it opened reports data or POLLHUP, so a
            # FIFO with nothing to report then was never opened (it is no member).
            criu_done = self._criu_done.is_set()
            events = [
                (fd, e) for fd, e in poller.poll(0 if criu_done else POLL_MS) if fd != self._wake_r or self._woken()
            ]
            if not events and criu_done:
                if not any(f.started for f in live.values()):
                    return
                time.sleep(POLL_MS / 1000)  # CRIU still holds one open: finish()'s deadline bounds this
            for fd, _ in events:
                if self._drain(live[fd]):
                    poller.unregister(fd)
                    self._ended(live.pop(fd))

    def _woken(self) -> bool:
        """Empty the wake-up pipe; it is no FIFO's event."""
        while True:
            try:
                os.read(self._wake_r, 64)
            except BlockingIOError:
                return False

    def _drain(self, fifo: _Fifo) -> bool:
        """Move what the FIFO holds; True at its end (CRIU closed it)."""
        for _ in range(VISIT_CHUNKS):
            try:
                n = self._move(fifo)
            except BlockingIOError:
                return False
            if n == 0:
                return True
        return False

    def _move(self, fifo: _Fifo) -> int:
        if not fifo.started:
            self._place(fifo)
        if fifo.out != self._devnull:
            try:
                n = os.splice(fifo.fd, fifo.out, SPLICE_CHUNK, offset_dst=fifo.offset + fifo.written)
            except BlockingIOError:
                raise
            except OSError as e:
                self._failed(e)
                return 1  # not the end: the next call drains into /dev/null
            fifo.written += n
            if fifo.out == self.fd and fifo.written - fifo.hashed >= HASH_BATCH:
                self._hash(fifo)
            return n
        return os.splice(fifo.fd, self._devnull, SPLICE_CHUNK)

    def _place(self, fifo: _Fifo) -> None:
        """At its first data: at the end of the dump file if no other member grows there, else a spill file."""
        fifo.started = True
        if self.error is not None:
            fifo.out = self._devnull
        elif self._owner is None:
            self._owner, fifo.out, fifo.offset = fifo, self.fd, round_up(self.end, ALIGN)
            self._streamed.append(fifo)
        else:
            fifo.spill = self.spill_dir / fifo.name
            try:
                self.spill_dir.mkdir(mode=0o700, exist_ok=True)
                fifo.out = os.open(fifo.spill, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:
                self._failed(e)
                return
            self._spilled.append(fifo)

    def _failed(self, error: OSError) -> None:
        """Keep the first error; from now on everything is drained into /dev/null."""
        if self.error is None:
            self.error = error
        for fifo in self._fifos:
            if fifo.started and fifo.out not in (self._devnull, self.fd, -1):
                os.close(fifo.out)
            if fifo.started:
                fifo.out = self._devnull

    def _hash(self, fifo: _Fifo) -> None:
        if self.error is not None:
            return  # the range may not be in the file: mapping it would fault (SIGBUS)
        self._hasher.add(fifo.name, fifo.offset + fifo.hashed, fifo.written - fifo.hashed)
        fifo.hashed = fifo.written

    def _ended(self, fifo: _Fifo) -> None:
        if fifo is self._owner:
            if fifo.written > fifo.hashed:
                self._hash(fifo)
            if self.error is None:
                self._hasher.end(fifo.name)
            self.end = fifo.offset + fifo.written
            self._owner = None
        elif fifo.out not in (self._devnull, self.fd, -1):
            os.close(fifo.out)
            fifo.out = -1


def move_forward(fd: int, start: int, end: int, distance: int) -> None:
    """Move the bytes [start, end) of fd's file `distance` bytes on; the last chunk first, as the ranges overlap."""
    reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # fd may be write-only
    try:
        pos = end
        while pos > start:
            n = min(kio.STREAM_CHUNK, pos - start)
            pos -= n
            data = kio.read_exactly(reader, n, pos)
            if len(data) != n:
                raise OSError(f"the dump file ends at {pos + len(data)}, before {end}")
            kio.pwrite_all(fd, data, pos + distance)
    finally:
        os.close(reader)
