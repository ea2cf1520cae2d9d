"""The host's mount table, from /proc/PID/mountinfo: the one reader of it in vzpy.

The kernel writes a path in mountinfo with space, tab, newline and backslash as octal escapes (\\040, \\011,
\\012, \\134): a VE_ROOT such as "/vz/my root/101" only matches once they are undone. Paths are returned as
str (undecodable bytes as surrogate escapes, like every os function), so they compare with os.fspath(path).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (proc(5)): the fields vzpy uses."""

    mount_id: int
    parent_id: int
    root: str  # the directory of the filesystem mounted here (a bind mount's source)
    point: str  # where it is mounted
    options: frozenset[str]  # per-mount options (rw, nosuid, ...)
    fstype: str
    source: str
    super_options: frozenset[str]  # per-superblock options (for cgroup v1: its controllers)


def unescape(field: bytes) -> str:
    """A mountinfo field with its octal escapes undone."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Every well-formed line of a mountinfo file, in order (parents before the mounts on them)."""
    table = []
    for line in data.splitlines():
        mount = _parse_line(line)
        if mount is not None:
            table.append(mount)
    return table


def _parse_line(line: bytes) -> Mount | None:
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", 6)
        fstype, source, super_options = fields[separator + 1 : separator + 4]
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            root=unescape(fields[3]),
            point=unescape(fields[4]),
            options=frozenset(unescape(fields[5]).split(",")),
            fstype=unescape(fstype),
            source=unescape(source),
            super_options=frozenset(unescape(super_options).split(",")),
        )
    except ValueError:  # no separator, too few fields after it, or a non-numeric id
        return None


def mounts(pid: int | str = "self", *, proc: Path = PROC) -> list[Mount]:
    """The mount table of PID's mount namespace, as PID sees it (`proc`: where procfs is mounted)."""
    return parse_mountinfo((proc / str(pid) / "mountinfo").read_bytes())


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on `path` as host configuration names it (VE_ROOT)."""
    # mountinfo holds the path the kernel resolved: VE_ROOT may go through a symlink (host config, trusted)
    return is_mountpoint(os.path.realpath(path))


def is_mountpoint(path: str | os.PathLike[str], *, pid: int | str = "self") -> bool:
    """Whether something is mounted exactly at `path` (no symlink resolution: give the path as mounted)."""
    target = os.fspath(path)
    return any(m.point == target for m in mounts(pid))


def mounts_below(path: str | os.PathLike[str], *, pid: int | str = "self", including: bool = False) -> list[str]:
    """Mount points strictly below `path` (and `path` itself with `including`), in mount order: unmount them
    in reverse."""
    top = os.fspath(path).rstrip("/") or "/"
    prefix = top if top == "/" else top + "/"
    points = [m.point for m in mounts(pid)]
    return [p for p in points if (p != top and p.startswith(prefix)) or (including and p == top)]


def fstype_at(path: Path, table: Sequence[Mount] | None = None) -> str:
    """The filesystem type of the mount `path` is on ("" if unknown)."""
    if table is None:
        try:
            table = mounts()
        except OSError:
            return ""
    covering = [m for m in table if path.is_relative_to(m.point)]
    # the deepest mount point wins; among mounts on the same point, the last one mounted
    return max(reversed(covering), key=lambda m: len(Path(m.point).parts)).fstype if covering else ""
