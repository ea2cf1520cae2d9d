"""Comparing a recorded fingerprint with the tree as it is now: the differences, in path order."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vzpy.errors import RestoreError
from vzpy.fsstate.record import (
    KIND_NAMES,
    MOUNT,
    Entry,
    Excluder,
    Fingerprint,
    fingerprint,
    path_key,
    without_excluded,
)

SUMMARY_ITEMS = 3
_FIELDS = (
    ("size", ("size",)),
    ("mtime", ("mtime_ns",)),
    ("mode", ("mode",)),
    ("owner", ("uid", "gid")),
    ("target", ("target",)),
    ("device", ("rdev",)),
    ("hard link", ("link",)),
)


def _format_ns(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


_SHOW: dict[str, Callable[[Entry], str]] = {
    "type": lambda e: KIND_NAMES.get(e.kind, e.kind),
    "size": lambda e: str(e.size),
    "mtime": lambda e: _format_ns(e.mtime_ns),
    "mode": lambda e: f"{e.mode:04o}",
    "owner": lambda e: f"{e.uid}:{e.gid}",
    "target": lambda e: repr(e.target),
    "device": lambda e: f"{os.major(e.rdev)}:{os.minor(e.rdev)}",
    "hard link": lambda e: "/" + e.link if e.link else "none",
}


@dataclass(frozen=True)
class Difference:
    path: str  # as seen inside the CT: "/etc/passwd"
    kind: Literal["changed", "added", "removed"]
    what: tuple[str, ...] = ()  # for "changed": type, size, mtime, mode, owner, target, device, hard link
    old: Entry | None = None
    new: Entry | None = None

    def __str__(self) -> str:
        return f"{self.path} {self.kind} ({', '.join(self.what)})" if self.what else f"{self.path} {self.kind}"

    def detail(self) -> str:
        """One line with the recorded and the current values."""
        if self.old is None or self.new is None:
            entry = self.new or self.old
            return f"{self.path} {self.kind} ({KIND_NAMES.get(entry.kind, entry.kind) if entry else '?'})"
        old, new = self.old, self.new
        parts = [f"{w} {_SHOW[w](old)} -> {_SHOW[w](new)}" for w in self.what]
        return f"{self.path} changed: {', '.join(parts)}"


class Differences(list[Difference]):
    """The first `limit` differences in path order; `total` counts all of them."""

    total: int = 0


def _changes(old: Entry, new: Entry) -> tuple[str, ...]:
    if MOUNT in (old.kind, new.kind):
        # A mount point stands for another filesystem: only that a directory is there belongs to this tree.
        return () if {old.kind, new.kind} <= {"d", MOUNT} else ("type",)
    if old.kind != new.kind:
        return ("type",)
    return tuple(name for name, attrs in _FIELDS if any(getattr(old, a) != getattr(new, a) for a in attrs))


def _pairs(old: Sequence[Entry], new: Sequence[Entry]) -> Iterator[tuple[Entry | None, Entry | None]]:
    """Merge two path-ordered entry lists into (recorded, current) pairs for the same path."""
    i = j = 0
    while i < len(old) and j < len(new):
        a, b = path_key(old[i].path), path_key(new[j].path)
        if a == b:
            yield old[i], new[j]
            i, j = i + 1, j + 1
        elif a < b:
            yield old[i], None
            i += 1
        else:
            yield None, new[j]
            j += 1
    yield from ((e, None) for e in old[i:])
    yield from ((None, e) for e in new[j:])


def differences(old: Sequence[Entry], new: Sequence[Entry]) -> Iterator[Difference]:
    """Differences in path order; an added, removed or retyped directory stands for its whole subtree."""
    covered = "\0"
    for a, b in _pairs(old, new):
        entry = a or b
        assert entry is not None
        if a == b or entry.path.startswith(covered):
            continue
        path = "/" + entry.path
        if a is None or b is None:
            yield Difference(path, "added" if a is None else "removed", old=a, new=b)
            covered = entry.path + "/"
        elif what := _changes(a, b):
            yield Difference(path, "changed", what, a, b)
            if what == ("type",):
                covered = entry.path + "/"


def _collect(found_in_order: Iterable[Difference], limit: int) -> Differences:
    found = Differences()
    for difference in found_in_order:
        if len(found) < limit:
            found.append(difference)
        found.total += 1
    return found


def compare(recorded: Fingerprint, root: Path, limit: int = 10, *, exclude: Iterable[str] = ()) -> Differences:
    """The first `limit` differences between the recorded fingerprint and the tree at root now, in path order.

    The tree is fingerprinted with the recorded exclusions; `exclude` adds globs ignored on both sides.
    Empty when the trees are equal.
    """
    extra = tuple(p for p in exclude if p not in recorded.exclude)
    current = fingerprint(root, exclude=recorded.exclude + extra)
    # Equal entries are what equal digests mean; comparing the tuples skips encoding 100k entries.
    if not extra and current.entries == recorded.entries:
        return Differences()
    old = without_excluded(recorded.entries, Excluder(extra)) if extra else recorded.entries
    return _collect(differences(old, current.entries), limit)


def describe_differences(ctid: str, found: Sequence[Difference]) -> tuple[str, str]:
    """(one-line message, detail lines) for the error that refuses the restore."""
    total = getattr(found, "total", len(found))
    shown = ", ".join(str(d) for d in found[:SUMMARY_ITEMS])
    more = ", ..." if total > SUMMARY_ITEMS else ""
    noun = "difference" if total == 1 else "differences"
    message = (
        f"filesystem of CT {ctid} differs from the checkpoint: {shown}{more} ({total} {noun}); "
        "copy the CT's files as they were at checkpoint (e.g. rsync) or use --skip-fs-check"
    )
    lines = [d.detail() for d in found]
    if total > len(found):
        lines.append(f"... and {total - len(found)} more")
    return message, "\n".join(lines)


def verify(recorded: Fingerprint, root: Path, ctid: str, *, exclude: Iterable[str] = (), limit: int = 10) -> None:
    """Raise RestoreError naming the first differences unless the tree at root matches the recorded one."""
    found = compare(recorded, root, limit, exclude=exclude)
    if found:
        message, detail = describe_differences(ctid, found)
        raise RestoreError(message, detail=detail)
