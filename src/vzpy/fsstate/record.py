"""The fingerprint of a CT's private area: every entry's metadata, in path order, in a compact JSON form."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import translate
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from vzpy.errors import PrivateNotFound, RestoreError, SystemFailure, VzError
from vzpy.host import mounts

FORMAT = 1
_KINDS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
}
MOUNT = "m"  # a directory another filesystem is mounted on: recorded, never descended into
KIND_NAMES = {
    "f": "file",
    "d": "directory",
    "l": "symlink",
    "c": "char device",
    "b": "block device",
    "p": "fifo",
    MOUNT: "mount point",
}


class Entry(NamedTuple):
    """One filesystem object. Fields a kind does not compare are stored as 0/"" (see docs)."""

    path: str  # relative to the root, "/"-separated; "" is the root itself
    kind: str  # one of KIND_NAMES
    mode: int  # permission bits with setuid/setgid/sticky; 0 for symlinks
    uid: int
    gid: int
    size: int = 0  # regular files only: a directory's size depends on the filesystem, not its entries
    mtime_ns: int = 0  # regular files only (see docs: directory mtimes move with transient files)
    target: str = ""  # symlinks
    rdev: int = 0  # device nodes
    link: str = ""  # path of the first entry sharing this inode (hard link); "" for the first one


def path_key(path: str) -> str:
    # "\0" sorts before every character a name can hold, so this orders paths component by component:
    # a directory's subtree comes right after it, as in the walk.
    return path.replace("/", "\0")


# --- exclusion


class Excluder:
    """Globs on the CT-absolute path ("/run/vzpy-init.ready", "/tmp/*"); a matching directory drops its subtree."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple("/" + p.lstrip("/") for p in patterns)
        self._match = re.compile("|".join(translate(p) for p in self.patterns)).match if self.patterns else None

    def __bool__(self) -> bool:
        return self._match is not None

    def excludes(self, path: str) -> bool:
        return self._match is not None and self._match("/" + path) is not None


def without_excluded(entries: Sequence[Entry], excluder: Excluder) -> list[Entry]:
    """Entries without the excluded ones (and their subtrees); hard links re-led by the first member left."""
    kept: list[Entry] = []
    dropped = "\0"  # "dir/" of the last excluded directory: its children follow it
    for entry in entries:
        if entry.path.startswith(dropped):
            continue
        if entry.path and excluder.excludes(entry.path):
            dropped = entry.path + "/"
            continue
        kept.append(entry)
    alive = {e.path for e in kept}
    leaders: dict[str, str] = {}
    for i, entry in enumerate(kept):
        if entry.link and entry.link not in alive:
            leader = leaders.setdefault(entry.link, entry.path)
            kept[i] = entry._replace(link="" if leader == entry.path else leader)
    return kept


# --- walking


def _mount_points(root: str) -> frozenset[str]:
    """Mount points strictly below root, from mountinfo (st_dev alone misses bind mounts of the same fs)."""
    try:
        return frozenset(mounts.mounts_below(root))
    except OSError:
        return frozenset()


class _Walker:
    """A depth-first walk in path order that stays on the root's filesystem and never follows symlinks."""

    def __init__(self, root: Path, excluder: Excluder) -> None:
        self.root = os.path.realpath(root)
        self.base = self.root.rstrip("/")  # joins below are plain concatenation: the walk's hottest path
        self.excluder = excluder
        self.mounts = _mount_points(self.root)
        self.leaders: dict[tuple[int, int], str] = {}
        self.entries: list[Entry] = []
        self.dev = 0

    def run(self) -> list[Entry]:
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise PrivateNotFound(f"{self.root} is not a directory")
        self.dev = st.st_dev
        self._add("", self.root, st)
        stack = [self._children("")]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            rel, path = child
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # gone since the directory was read
                continue
            if self._add(rel, path, st):
                stack.append(self._children(rel))
        return self.entries

    def _children(self, rel: str) -> Iterator[tuple[str, str]]:
        prefix = rel + "/" if rel else ""
        try:
            with os.scandir(self.base + "/" + rel) as it:
                names = sorted(d.name for d in it)
        except FileNotFoundError:
            names = []
        for name in names:
            if not (self.excluder and self.excluder.excludes(prefix + name)):
                yield prefix + name, self.base + "/" + prefix + name

    def _add(self, rel: str, path: str, st: os.stat_result) -> bool:
        """Record one object; True when it is a directory to descend into."""
        if stat.S_ISSOCK(st.st_mode):
            # a bound unix socket's file holds no data, and CRIU unlinks and re-binds it at every restore
            # (also a failed one): recording it would refuse restores over nothing
            return False
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "?")
        if kind == "d" and rel and (st.st_dev != self.dev or path in self.mounts):
            kind = MOUNT
        is_file = kind == "f"
        self.entries.append(
            Entry(
                rel,
                kind,
                0 if kind == "l" else stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if is_file else 0,
                st.st_mtime_ns if is_file else 0,
                os.readlink(path) if kind == "l" else "",
                st.st_rdev if kind in ("c", "b") else 0,
                self._link(rel, st) if kind not in ("d", MOUNT) and st.st_nlink > 1 else "",
            )
        )
        return kind == "d"

    def _link(self, rel: str, st: os.stat_result) -> str:
        leader = self.leaders.setdefault((st.st_dev, st.st_ino), rel)
        return "" if leader == rel else leader


# --- the compact form


def _shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix: a binary search of C-level slice compares beats a loop over characters."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) >> 1
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _encode(entries: Sequence[Entry]) -> bytes:
    """Canonical columnar JSON: columns of similar values compress far better than one record per entry."""
    prefix, suffix, previous = [], [], ""
    for e in entries:
        common = _shared_prefix(previous, e.path)
        prefix.append(common)
        suffix.append(e.path[common:])
        previous = e.path
    index = {e.path: i for i, e in enumerate(entries)}
    columns = {
        "prefix": prefix,
        "suffix": suffix,
        "kind": "".join(e.kind for e in entries),
        "mode": [e.mode for e in entries],
        "uid": [e.uid for e in entries],
        "gid": [e.gid for e in entries],
        "size": [e.size for e in entries],
        "mtime": [e.mtime_ns for e in entries],
        "target": [[i, e.target] for i, e in enumerate(entries) if e.target],
        "rdev": [[i, e.rdev] for i, e in enumerate(entries) if e.rdev],
        "link": [[i, index[e.link]] for i, e in enumerate(entries) if e.link],
        # content digests were an opt-in of format 1 that no command used: empty, so older readers still read it
        "hash": "",
        "xattrs": [],
    }
    return json.dumps(columns, separators=(",", ":"), sort_keys=True).encode()


def _decode(data: bytes) -> tuple[Entry, ...]:
    c = json.loads(data)
    paths, previous = [], ""
    for common, rest in zip(c["prefix"], c["suffix"], strict=True):
        previous = previous[:common] + rest
        paths.append(previous)
    sparse: dict[str, dict[int, Any]] = {name: dict(c[name]) for name in ("target", "rdev", "link")}
    columns = zip(paths, c["kind"], c["mode"], c["uid"], c["gid"], c["size"], c["mtime"], strict=True)
    return tuple(
        Entry(
            path,
            kind,
            mode,
            uid,
            gid,
            size,
            mtime,
            sparse["target"].get(i, ""),
            sparse["rdev"].get(i, 0),
            paths[sparse["link"][i]] if i in sparse["link"] else "",
        )
        for i, (path, kind, mode, uid, gid, size, mtime) in enumerate(columns)
    )


@dataclass(frozen=True)
class Fingerprint:
    """A tree's entries in path order, the globs it was taken without, and one digest over all of them."""

    entries: tuple[Entry, ...]
    exclude: tuple[str, ...] = ()

    @cached_property
    def _encoded(self) -> bytes:
        return _encode(self.entries)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self._encoded).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for the dump manifest: the entries as zlib-compressed columnar JSON in base64."""
        return {
            "format": FORMAT,
            "deep": False,  # kept for older readers, which require it
            "exclude": list(self.exclude),
            "count": len(self.entries),
            "digest": self.digest,
            "entries": base64.b64encode(zlib.compress(self._encoded, 6)).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        try:
            if data["format"] != FORMAT:
                raise ValueError(f"format {data['format']}, expected {FORMAT}")
            encoded = zlib.decompress(base64.b64decode(data["entries"], validate=True))
            if hashlib.sha256(encoded).hexdigest() != data["digest"]:
                raise ValueError("digest mismatch")
            return cls(_decode(encoded), tuple(data["exclude"]))
        except (KeyError, IndexError, TypeError, ValueError, zlib.error) as e:
            raise RestoreError(f"the recorded filesystem fingerprint is unreadable: {e}") from e


def fingerprint(root: Path, *, exclude: Iterable[str] = ()) -> Fingerprint:
    """Fingerprint the tree at root: rsync's quick check (size + mtime) and every other piece of metadata."""
    exclude = tuple(exclude)
    return Fingerprint(tuple(walk(root, Excluder(exclude), SystemFailure)), exclude)


def walk(root: Path, excluder: Excluder, error: type[VzError]) -> list[Entry]:
    walker = _Walker(root, excluder)
    try:
        return walker.run()
    except OSError as e:
        raise error(f"cannot read {walker.root}: {e}") from e
