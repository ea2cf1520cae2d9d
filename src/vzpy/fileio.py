"""Atomic, durable file replacement: the one way vzpy writes a file that must never be seen half-written.

A temp file beside the target (same filesystem, O_EXCL|O_NOFOLLOW, the final mode from the start) is written,
fsync'ed, renamed over the target, and then the directory is fsync'ed so the rename itself survives a crash.
On any failure the temp file is removed and the target is left as it was. `durable=False` skips both fsyncs,
for caches that may be lost.

With `dir_fd`, the target is a bare name in that open directory and nothing is resolved by path: how files
inside a CT's root (hostile) are replaced without following a symlink out of it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def atomic_fd(
    path: str | os.PathLike[str], *, mode: int = 0o600, durable: bool = True, dir_fd: int | None = None
) -> Iterator[int]:
    """An fd to write PATH's new content to; PATH is replaced when the block ends without an error."""
    target = Path(path)
    if dir_fd is not None and target.name != os.fspath(path):
        raise ValueError(f"with dir_fd, {os.fspath(path)!r} must be a bare file name")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not weaken (or widen) what the caller asked for
            yield fd
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        fsync_dir(target.parent if dir_fd is None else ".", dir_fd=dir_fd)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    mode: int = 0o600,
    durable: bool = True,
    dir_fd: int | None = None,
) -> None:
    """Replace PATH with `data` (str is UTF-8), atomically; see the module docstring."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_fd(path, mode=mode, durable=durable, dir_fd=dir_fd) as fd:
        write_all(fd, payload)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_durably(src: Path, dst: Path) -> None:
    """Rename an already written file SRC over DST (same filesystem): SRC's data, then the rename, on disk."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def fsync_dir(directory: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """fsync a directory (`dir_fd` may be an O_PATH fd, which cannot be fsync'ed itself: give ".")."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
