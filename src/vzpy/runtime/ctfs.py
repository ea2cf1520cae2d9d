"""Files inside a CT's root, reached from the host without ever leaving that root.

Everything under a CT's root is the CT's to change, at any moment: any component of a path may be a
symlink (absolute, or climbing with ..), swapped between two looks at it. So paths are never joined
onto the host path of the root and handed to open(): the kernel resolves them with openat2(2) and
RESOLVE_IN_ROOT relative to an fd of the root, exactly as the CT itself would (an absolute link
restarts at the CT's root, .. stops there), with no race that can lead out. Files are replaced by
writing a temp file in the resolved directory and renaming it over the name, so a symlink planted at
the name is replaced, never written through.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vzpy import fileio
from vzpy.errors import CtFileError

SYS_OPENAT2 = 437  # x86_64 and the generic syscall table
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
# openat2 answers EAGAIN when a rename elsewhere raced a ".." step; the kernel asks for a retry
EAGAIN_RETRIES = 32
READ_LIMIT = 1 << 20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)  # the libc Python runs on; find_library would run ldconfig
_libc.syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = IN_ROOT) -> int:
    """openat2(2); raises OSError with the kernel's errno."""
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    encoded = os.fsencode(path)
    for _attempt in range(EAGAIN_RETRIES):
        fd: int = _libc.syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            if err == errno.ENOSYS:
                raise OSError(err, "openat2 is not available (Linux >= 5.6 needed)", path)
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, "path kept changing while it was resolved", path)


def _split(path: str) -> tuple[str, str]:
    """'/etc/hostname' -> ('etc', 'hostname'): the directory (relative to the root) and a plain name."""
    parts = path.split("/")
    if parts[-1] in ("", ".", "..") or ".." in parts:
        raise ValueError(f"not a file path inside a CT: {path!r}")
    return "/".join(parts[:-1]).lstrip("/") or ".", parts[-1]


class CtRoot:
    """An open CT root. Paths given to its methods are paths as the CT sees them ('/etc/hostname')."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CtFileError(f"cannot open the CT root {self.root}: {e.strerror}", errno=e.errno) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CtRoot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _reporting(self, what: str, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            reason = e.strerror or str(e)
            raise CtFileError(f"cannot {what} {path} inside the CT root {self.root}: {reason}", errno=e.errno) from e

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """An fd of `path` resolved inside the root; raises OSError."""
        return openat2(self.fd, path.lstrip("/") or ".", flags, mode)

    @contextmanager
    def directory(self, path: str) -> Iterator[int]:
        """An O_PATH fd of the directory `path` inside the root, usable as dir_fd."""
        fd = self.open(path, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def stat(self, path: str) -> os.stat_result | None:
        """stat of what `path` leads to inside the root (links followed there); None if it leads nowhere."""
        with self._reporting("look up", path):
            try:
                fd = self.open(path, os.O_PATH)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)

    def resolve(self, path: str) -> Path | None:
        """The host path `path` leads to inside the root, or None. For reporting and tests: use fds to act."""
        try:
            fd = self.open(path, os.O_PATH)
        except OSError:
            return None
        try:
            return Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)

    def read_bytes(self, path: str, limit: int = READ_LIMIT) -> bytes:
        """The content of the regular file `path` (a fifo or device is refused, not opened for reading)."""
        with self._reporting("read", path):
            fd = self.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                data = os.read(fd, limit + 1)
            finally:
                os.close(fd)
        if len(data) > limit:
            raise CtFileError(f"{path} inside the CT root {self.root} is larger than {limit} bytes")
        return data

    def write_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Replace `path` with a regular file holding `data`: whatever was at the name (a symlink too) is
        replaced, never written through; the directory is resolved inside the root."""
        parent, name = _split(path)
        with self._reporting("write", path), self.directory(parent) as dir_fd:
            fileio.write_atomic(name, data, mode=mode, dir_fd=dir_fd)

    def mkdir(self, path: str, mode: int = 0o755) -> bool:
        """Create directory `path` (its parent resolved inside the root); False if something is there."""
        parent, name = _split(path)
        with self._reporting("create directory", path), self.directory(parent) as dir_fd:
            try:
                os.mkdir(name, mode, dir_fd=dir_fd)
            except FileExistsError:
                return False
            made = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                os.fchmod(made, mode)  # mkdir's mode went through the umask
            finally:
                os.close(made)
            return True

    def symlink(self, target: str, path: str) -> bool:
        """Create symlink `path` -> `target`; False if the name is taken (by anything, a dangling link too)."""
        parent, name = _split(path)
        with self._reporting("create symlink", path), self.directory(parent) as dir_fd:
            try:
                os.symlink(target, name, dir_fd=dir_fd)
            except FileExistsError:
                return False
            return True
