"""Per-CT locks: one operation at a time; a second one fails fast naming the holder.

flock(2) is released by the kernel when its holder dies, so a lock can never go stale.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vzpy.errors import Locked


@contextmanager
def ct_lock(lockdir: Path, ctid: str, operation: str) -> Iterator[None]:
    lockdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = lockdir / f"{ctid}.lck"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            pid, _, op = holder.partition(" ")
            raise Locked(
                f"CT {ctid} is locked by vzpy pid {pid} ({op or 'unknown operation'}); wait for it to finish and retry"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {operation}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
