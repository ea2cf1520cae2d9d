"""What changed in a CT's private area since the live sync began: the frozen final sync sends only that.

Found without trusting the CT: a walk of the tree with os.scandir and lstat only (symlinks are never
followed, other filesystems never entered), comparing what the kernel says, never what a file says:
- every entry whose inode changed (its ctime) since just before the live sync began: content, size, mode,
  owner, xattrs/ACLs, links, set-back mtimes all move the ctime, and user space cannot set it;
- every directory whose contents changed (created, deleted, renamed entries move its ctime): rsync lists it
  one level deep and deletes there what the source no longer has;
- every directory not at its path with its inode at the start (made, renamed in, replaced): its whole
  subtree, since the entries of a directory renamed whole keep their ctimes.
A clock stepped back by more than the margin since the start, a walk error or another filesystem inside
the tree makes the final sync a full rsync again (TreeChanges.why_full says why).

The margin covers the coarse clock the kernel stamps ctimes with and filesystems storing whole seconds.
Like the full rsync's quick check, a file written through a shared mapping whose pages were already dirty
shows no new times; neither way sees it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CTIME_MARGIN_NS = 2_000_000_000  # > a jiffy of the coarse clock, > a whole-second filesystem's rounding
ROOT = ""


@dataclass(frozen=True)
class TreeSnapshot:
    """Taken just before the live sync: when, and each directory's inode by path."""

    root: Path
    started_ns: int  # CLOCK_REALTIME (what ctimes are stamped with) just before the walk
    clock_offset_ns: int  # CLOCK_REALTIME - CLOCK_MONOTONIC then: a step back of the clock shows in it
    device: int
    dirs: dict[str, int] = field(default_factory=dict)


@dataclass
class TreeChanges:
    """The final sync's work: directories to list one level deep (and delete in), other entries to send."""

    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # changed with an mtime from before the live sync (set back, or only metadata changed): rsync's quick
    # check (size and mtime) could take a stale copy there for current, so these are sent whatever it says
    forced: list[str] = field(default_factory=list)
    why_full: str | None = None  # set: the changes cannot be trusted, sync everything

    @property
    def empty(self) -> bool:
        return self.why_full is None and not self.dirs and not self.files

    def files_from(self) -> bytes:
        """rsync --files-from --from0 list: a directory as "DIR/" (with -d: its entries, deletions there)."""
        return _nul_list([f"{d}/" if d else "./" for d in self.dirs] + self.files)

    def forced_from(self) -> bytes:
        return _nul_list(self.forced)


def _nul_list(names: list[str]) -> bytes:
    return b"".join(os.fsencode(name) + b"\0" for name in names)


class _OtherFilesystem(Exception):
    pass


def _clock_offset() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()


def snapshot(root: Path) -> TreeSnapshot:
    """Before the live sync: the time, and every directory's inode (entries that vanish meanwhile are skipped:
    their directory's ctime tells the final sync)."""
    offset = _clock_offset()
    started = time.clock_gettime_ns(time.CLOCK_REALTIME)
    device = os.lstat(root).st_dev
    dirs: dict[str, int] = {ROOT: os.lstat(root).st_ino}
    for path, st in _walk(root, device, tolerate=True):
        if stat.S_ISDIR(st.st_mode):
            dirs[path] = st.st_ino
    return TreeSnapshot(root, started, offset, device, dirs)


def changes_since(snap: TreeSnapshot) -> TreeChanges:
    """With the CT frozen: what changed since `snap` (see the module doc)."""
    if _clock_offset() < snap.clock_offset_ns - CTIME_MARGIN_NS // 2:
        return TreeChanges(why_full="the clock was set back since the live sync")
    since = snap.started_ns - CTIME_MARGIN_NS
    changes = TreeChanges()
    try:
        root = os.lstat(snap.root)
        if root.st_dev != snap.device or root.st_ino != snap.dirs[ROOT]:
            return TreeChanges(why_full=f"{snap.root} was replaced since the live sync")
        listed: set[str] = set()
        if root.st_ctime_ns >= since:
            changes.dirs.append(ROOT)
            listed.add(ROOT)
        for path, st in _walk(snap.root, snap.device, tolerate=False):
            if stat.S_ISDIR(st.st_mode):
                if st.st_ctime_ns >= since or snap.dirs.get(path) != st.st_ino:
                    changes.dirs.append(path)
                    listed.add(path)
            elif st.st_ctime_ns >= since:
                if _parent(path) not in listed:  # a listed directory's entries go anyway
                    changes.files.append(path)
                if st.st_mtime_ns < since and stat.S_ISREG(st.st_mode):
                    changes.forced.append(path)
    except _OtherFilesystem as e:
        return TreeChanges(why_full=f"another filesystem is mounted at {e} inside the private area")
    except OSError as e:
        return TreeChanges(why_full=f"cannot walk {snap.root}: {e}")
    return changes


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _walk(root: Path, device: int, *, tolerate: bool) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry under root, parents before children; never follows a
    symlink. tolerate: skip entries and directories that vanish (the CT runs)."""
    pending = [(ROOT, os.fspath(root))]
    while pending:
        relative, absolute = pending.pop()
        try:
            with os.scandir(absolute) as entries:
                listed = list(entries)
        except (FileNotFoundError, NotADirectoryError):
            if tolerate:
                continue
            raise
        for entry in listed:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                if tolerate:
                    continue
                raise
            path = f"{relative}/{entry.name}" if relative else entry.name
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != device:
                    if tolerate:
                        continue
                    raise _OtherFilesystem(path)
                pending.append((path, entry.path))
            yield path, st
