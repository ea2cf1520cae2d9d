"""DISKSPACE / DISKINODES: a CT's disk limits, enforceable only as project quota of the private area's fs.

vzctl's simfs layout kept them with the OpenVZ kernel's per-directory "vzquota"; a stock kernel has the
equivalent in ext4/xfs project quota, which needs quota support in the kernel (ext4: CONFIG_QFMT_V2; xfs:
CONFIG_XFS_QUOTA) and the fs mounted with project quota on. vzpy asks the kernel (quotactl_fd) whether the
private area's fs has it; when it has not, the limits are not enforced and the operator is told why, once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SYS_QUOTACTL_FD = 443  # x86_64 and the generic table (Linux >= 5.14)
Q_GETINFO = 0x800005
PRJQUOTA = 2
SUBCMDSHIFT = 8


@dataclass(frozen=True)
class DiskLimits:
    """DISKSPACE's and DISKINODES' soft (barrier) and hard (limit) values; None: unlimited or unset."""

    configured: bool = False
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_inodes: int | None = None
    hard_inodes: int | None = None


class _DqInfo(ctypes.Structure):
    _fields_ = [
        ("dqi_bgrace", ctypes.c_uint64),
        ("dqi_igrace", ctypes.c_uint64),
        ("dqi_flags", ctypes.c_uint32),
        ("dqi_valid", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)  # the libc Python runs on; find_library would run ldconfig
_libc.syscall.restype = ctypes.c_long
_warned: set[str] = set()

_REASONS = {
    errno.ESRCH: "project quota is not turned on for that filesystem (ext4: mkfs -O quota,project and mount "
    "-o prjquota; xfs: mount -o prjquota)",
    errno.ENOSYS: "this kernel has no quotactl_fd (Linux >= 5.14 with CONFIG_QUOTACTL needed)",
    errno.EOPNOTSUPP: "that filesystem has no quota support",
    errno.ENOTTY: "that filesystem has no quota support",
    errno.EINVAL: "that filesystem has no project quota (ext4 needs a kernel with CONFIG_QFMT_V2, xfs "
    "CONFIG_XFS_QUOTA)",
}


def project_quota_problem(path: Path) -> str | None:
    """Why project quota cannot limit `path`'s filesystem, or None when the kernel keeps it there."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = _DqInfo()
        command = (Q_GETINFO << SUBCMDSHIFT) | PRJQUOTA
        result = _libc.syscall(
            ctypes.c_long(SYS_QUOTACTL_FD), ctypes.c_int(fd), ctypes.c_uint(command), 0, ctypes.byref(info)
        )
        if result == 0:
            return None
        err = ctypes.get_errno()
        return _REASONS.get(err, f"quotactl failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def enforce(ctid: str, private: Path, limits: DiskLimits) -> None:
    """Enforce DISKSPACE/DISKINODES on the private area, or warn (once per CT and command) why not."""
    if not limits.configured:
        return
    problem = project_quota_problem(private)
    if problem is None:
        problem = "vzpy does not set project quota limits yet (the filesystem supports them)"
    message = f"CT {ctid}: DISKSPACE/DISKINODES are not enforced on {private}: {problem}"
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"vzpy: warning: {message}\n")
