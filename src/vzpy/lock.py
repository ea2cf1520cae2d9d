"""Per-CT locks: one operation at a time; a second one fails fast naming the holder.

The lock is flock(2) on LOCKDIR/CTID.lck, which holds "PID OPERATION" while held. The kernel releases a
flock when its holder dies, so a lock can never go stale (a dead holder's record may stay in the file, but
nobody holds the flock any more). flock conflicts between two open files even in one process, so nested
operations on one CT are refused too.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vzpy.errors import Locked

RECORD_MAX = 256
BUSY_RETRIES = 2
BUSY_RETRY_DELAY = 0.01


@dataclass(frozen=True)
class Holder:
    """Who holds a CT's lock, from the record it wrote: "PID OPERATION" (either may be unknown)."""

    pid: str
    operation: str

    @classmethod
    def parse(cls, record: bytes) -> Holder:
        pid, _, operation = record.decode(errors="replace").strip().partition(" ")
        return cls(pid or "unknown", operation or "unknown operation")

    def __str__(self) -> str:
        return f"vzpy pid {self.pid} ({self.operation})"


class CtLocked(Locked):
    """CT CTID's lock is held by someone else (exit code 9, VZ_LOCKED); `holder` says who."""

    def __init__(self, ctid: str, holder: Holder) -> None:
        super().__init__(f"CT {ctid} is locked by {holder}; wait for it to finish and retry")
        self.ctid = ctid
        self.holder = holder


class CtLock:
    """A held CT lock. It stays held across calls until release() (idempotent) or the end of a `with`."""

    def __init__(self, path: Path, fd: int, ctid: str, operation: str) -> None:
        self.path = path
        self.ctid = ctid
        self.operation = operation
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> CtLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_path(lockdir: Path, ctid: str) -> Path:
    return lockdir / f"{ctid}.lck"


def acquire(lockdir: Path, ctid: str, operation: str) -> CtLock:
    """Take CT ctid's lock for `operation` without waiting; CtLocked naming the holder if it is taken."""
    lockdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = lock_path(lockdir, ctid)
    # O_CLOEXEC: a program run while the lock is held (criu, the CT's init) must not keep it alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        taken = _flock_exclusive(fd)
    except BaseException:
        os.close(fd)
        raise
    if not taken:
        holder = Holder.parse(os.pread(fd, RECORD_MAX, 0))
        os.close(fd)
        raise CtLocked(ctid, holder)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {operation}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return CtLock(path, fd, ctid, operation)


def _flock_exclusive(fd: int) -> bool:
    """Take the flock without blocking. A few quick retries: holder() takes a shared flock for an instant,
    which must not make an operation fail."""
    for attempt in range(BUSY_RETRIES + 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < BUSY_RETRIES:
                time.sleep(BUSY_RETRY_DELAY)
    return False


def holder(lockdir: Path, ctid: str) -> Holder | None:
    """Who holds CT ctid's lock now (None if nobody), without taking it. A lock held through a CtLock of
    this very process counts as held too."""
    try:
        fd = os.open(lock_path(lockdir, ctid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # A shared flock conflicts only with an exclusive one: taken (and dropped at once) means free.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return Holder.parse(os.pread(fd, RECORD_MAX, 0))
    finally:
        os.close(fd)


@contextmanager
def ct_lock(lockdir: Path, ctid: str, operation: str) -> Iterator[CtLock]:
    """Hold CT ctid's lock for the `with` block (CtLocked at once if it is taken)."""
    with acquire(lockdir, ctid, operation) as held:
        yield held
