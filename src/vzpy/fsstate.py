"""Filesystem consistency for checkpoint/restore: fingerprint a CT's private area, compare it, archive it.

OpenVZ's rule: the filesystem at restore must equal the filesystem at checkpoint. `fingerprint` records the
tree's metadata (optionally its contents) while the CT is frozen; `compare`/`verify` refuse a restore onto a
different tree; `archive_tree`/`restore_tree` carry the tree itself for `chkpnt --with-fs`.
See docs/filesystem-consistency.md for the choices and their measured cost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import translate
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from vzpy import proc
from vzpy.errors import ChkpntError, PrivateNotFound, RestoreError, SystemError_, VzError

FORMAT = 1
HASH_BYTES = 16  # sha256 truncated: sha256 runs at ~1 GB/s with SHA-NI, blake2b at ~0.3 GB/s here
SUMMARY_ITEMS = 3

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
    hash: str = ""  # deep only: digest of the contents (regular files)
    xattrs: str = ""  # deep only: digest of the extended attributes (ACLs included), "" without any


def _key(path: str) -> str:
    # "\0" sorts before every character a name can hold, so this orders paths component by component:
    # a directory's subtree comes right after it, as in the walk.
    return path.replace("/", "\0")


# --- exclusion


class _Excluder:
    """Globs on the CT-absolute path ("/run/vzpy-init.ready", "/tmp/*"); a matching directory drops its subtree."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple("/" + p.lstrip("/") for p in patterns)
        self._match = re.compile("|".join(translate(p) for p in self.patterns)).match if self.patterns else None

    def __bool__(self) -> bool:
        return self._match is not None

    def excludes(self, path: str) -> bool:
        return self._match is not None and self._match("/" + path) is not None


def _filter(entries: Sequence[Entry], excluder: _Excluder) -> list[Entry]:
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
        data = Path("/proc/self/mountinfo").read_bytes()
    except OSError:
        return frozenset()
    prefix = root.rstrip("/") + "/"
    points = set()
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]))
            if point.startswith(prefix):
                points.add(point)
    return frozenset(points)


def _open_noatime(path: str) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # Hashing must not touch the tree it describes; O_NOATIME needs ownership or CAP_FOWNER.
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def _hash_file(path: str) -> str:
    with os.fdopen(_open_noatime(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[: 2 * HASH_BYTES]


def _hash_xattrs(path: str) -> str:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        if not names:
            return ""
        digest = hashlib.sha256()
        for name in names:
            value = os.getxattr(path, name, follow_symlinks=False)
            digest.update(b"%d:%s%d:%s" % (len(name), os.fsencode(name), len(value), value))
        return digest.hexdigest()[: 2 * HASH_BYTES]
    except OSError:  # a filesystem without xattr support has none
        return ""


class _Walker:
    """A depth-first walk in path order that stays on the root's filesystem and never follows symlinks."""

    def __init__(self, root: Path, *, deep: bool, excluder: _Excluder, ctimes: bool) -> None:
        self.root = os.path.realpath(root)
        self.base = self.root.rstrip("/")  # joins below are plain concatenation: the walk's hottest path
        self.deep = deep
        self.excluder = excluder
        self.mounts = _mount_points(self.root)
        self.leaders: dict[tuple[int, int], str] = {}
        self.entries: list[Entry] = []
        self.dev = 0
        self.ctimes: list[int] | None = [] if ctimes else None

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
                _hash_file(path) if self.deep and is_file else "",
                _hash_xattrs(path) if self.deep else "",
            )
        )
        if self.ctimes is not None:
            self.ctimes.append(st.st_ctime_ns)
        return kind == "d"

    def _link(self, rel: str, st: os.stat_result) -> str:
        leader = self.leaders.setdefault((st.st_dev, st.st_ino), rel)
        return "" if leader == rel else leader


# --- the fingerprint and its compact form


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
        "hash": _pack_hashes(entries),
        "xattrs": [[i, e.xattrs] for i, e in enumerate(entries) if e.xattrs],
    }
    return json.dumps(columns, separators=(",", ":"), sort_keys=True).encode()


def _pack_hashes(entries: Sequence[Entry]) -> str:
    """A deep fingerprint's file digests, raw and back to back: near the size of the digests themselves."""
    digests = [e.hash for e in entries if e.kind == "f"]
    if not any(digests):
        return ""
    if any(len(d) != 2 * HASH_BYTES for d in digests):
        raise ValueError("a deep fingerprint needs the digest of every regular file")
    return base64.b64encode(bytes.fromhex("".join(digests))).decode("ascii")


def _unpack_hashes(packed: str, kinds: str) -> dict[int, str]:
    raw = base64.b64decode(packed, validate=True).hex()
    files = [i for i, kind in enumerate(kinds) if kind == "f"] if raw else []
    if len(raw) != 2 * HASH_BYTES * len(files):
        raise ValueError("file digests do not match the entries")
    width = 2 * HASH_BYTES
    return {i: raw[n * width : (n + 1) * width] for n, i in enumerate(files)}


def _decode(data: bytes) -> tuple[Entry, ...]:
    c = json.loads(data)
    paths, previous = [], ""
    for common, rest in zip(c["prefix"], c["suffix"], strict=True):
        previous = previous[:common] + rest
        paths.append(previous)
    sparse: dict[str, dict[int, Any]] = {name: dict(c[name]) for name in ("target", "rdev", "link", "xattrs")}
    hashes = _unpack_hashes(c["hash"], c["kind"])
    columns = zip(paths, c["kind"], c["mode"], c["uid"], c["gid"], c["size"], c["mtime"], strict=True)
    return tuple(
        Entry(
            *fields,
            sparse["target"].get(i, ""),
            sparse["rdev"].get(i, 0),
            paths[sparse["link"][i]] if i in sparse["link"] else "",
            hashes.get(i, ""),
            sparse["xattrs"].get(i, ""),
        )
        for i, fields in enumerate(columns)
    )


@dataclass(frozen=True)
class Fingerprint:
    """A tree's entries in path order, how they were taken (deep, exclude) and one digest over all of them."""

    entries: tuple[Entry, ...]
    deep: bool = False
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
            "deep": self.deep,
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
            entries = _decode(encoded)
            return cls(entries, bool(data["deep"]), tuple(data["exclude"]))
        except (KeyError, IndexError, TypeError, ValueError, zlib.error) as e:
            raise RestoreError(f"the recorded filesystem fingerprint is unreadable: {e}") from e


def fingerprint(root: Path, *, deep: bool = False, exclude: Iterable[str] = ()) -> Fingerprint:
    """Fingerprint the tree at root: metadata (rsync's size + mtime quick check) or, deep, contents and xattrs too."""
    exclude = tuple(exclude)
    walker = _Walker(root, deep=deep, excluder=_Excluder(exclude), ctimes=False)
    return Fingerprint(tuple(_walk(walker, SystemError_)), deep, exclude)


def _walk(walker: _Walker, error: type[VzError]) -> list[Entry]:
    try:
        return walker.run()
    except OSError as e:
        raise error(f"cannot read {walker.root}: {e}") from e


# --- comparing


_FIELDS = (
    ("size", ("size",)),
    ("mtime", ("mtime_ns",)),
    ("mode", ("mode",)),
    ("owner", ("uid", "gid")),
    ("target", ("target",)),
    ("device", ("rdev",)),
    ("hard link", ("link",)),
    ("content", ("hash",)),
    ("xattrs", ("xattrs",)),
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
    what: tuple[str, ...] = ()  # for "changed": type, size, mtime, mode, owner, target, device, hard link, ...
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
        parts = [f"{w} {_SHOW[w](old)} -> {_SHOW[w](new)}" if w in _SHOW else f"{w} differs" for w in self.what]
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
        a, b = _key(old[i].path), _key(new[j].path)
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


def _diff(old: Sequence[Entry], new: Sequence[Entry]) -> Iterator[Difference]:
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


def _collect(differences: Iterable[Difference], limit: int) -> Differences:
    found = Differences()
    for difference in differences:
        if len(found) < limit:
            found.append(difference)
        found.total += 1
    return found


def compare(recorded: Fingerprint, root: Path, limit: int = 10, *, exclude: Iterable[str] = ()) -> Differences:
    """The first `limit` differences between the recorded fingerprint and the tree at root now, in path order.

    The tree is fingerprinted the way `recorded` was (deep or not, same exclusions); `exclude` adds globs
    ignored on both sides. Empty when the trees are equal.
    """
    extra = tuple(p for p in exclude if p not in recorded.exclude)
    current = fingerprint(root, deep=recorded.deep, exclude=recorded.exclude + extra)
    # Equal entries are what equal digests mean; comparing the tuples skips encoding 100k entries.
    if not extra and current.entries == recorded.entries:
        return Differences()
    old = _filter(recorded.entries, _Excluder(extra)) if extra else recorded.entries
    return _collect(_diff(old, current.entries), limit)


def describe_differences(ctid: str, differences: Sequence[Difference]) -> tuple[str, str]:
    """(one-line message, detail lines) for the error that refuses the restore."""
    total = getattr(differences, "total", len(differences))
    shown = ", ".join(str(d) for d in differences[:SUMMARY_ITEMS])
    more = ", ..." if total > SUMMARY_ITEMS else ""
    noun = "difference" if total == 1 else "differences"
    message = (
        f"filesystem of CT {ctid} differs from the checkpoint: {shown}{more} ({total} {noun}); "
        "copy the CT's files as they were at checkpoint (e.g. rsync) or use --skip-fs-check"
    )
    lines = [d.detail() for d in differences]
    if total > len(differences):
        lines.append(f"... and {total - len(differences)} more")
    return message, "\n".join(lines)


def verify(recorded: Fingerprint, root: Path, ctid: str, *, exclude: Iterable[str] = (), limit: int = 10) -> None:
    """Raise RestoreError naming the first differences unless the tree at root matches the recorded one."""
    differences = compare(recorded, root, limit, exclude=exclude)
    if differences:
        message, detail = describe_differences(ctid, differences)
        raise RestoreError(message, detail=detail)


# --- the --with-fs archive

META = "vzpy-fsstate.json"  # first member: format, fingerprint, base; the tree follows under TREE/
TREE = "tree"
COMPRESS = "zstd -T0 -1"  # tar splits this itself; no shell is involved
TAR_OPTIONS = ("--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")
# ctime comes from the coarse clock (up to a jiffy behind time_ns): an inode changed this close to the base's
# start may or may not be in the base, so it goes into the delta.
CTIME_SLACK_NS = 100 * 10**6
REBASE_FRACTION = 0.5  # a delta carrying more than this share of the tree's bytes is written as a full archive


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    fingerprint: Fingerprint  # of the tree as archived (metadata)
    base: Path | None  # the full archive this delta applies on top of; None for a full archive
    stored: int  # entries written into this archive
    size: int  # bytes
    seconds: float

    @property
    def full(self) -> bool:
        return self.base is None


def _read_meta(archive: Path, error: type[VzError] = RestoreError) -> dict[str, Any]:
    if not archive.is_file():
        raise error(f"filesystem archive {archive} is missing")
    result = proc.run(
        ["tar", "--extract", "--file", archive, "--zstd", "--to-stdout", "--occurrence=1", META],
        error=error,
        what=f"reading {archive}",
    )
    try:
        meta = json.loads(result.stdout)
        if meta["format"] != FORMAT:
            raise ValueError(f"format {meta['format']}")
        return meta
    except (ValueError, KeyError, TypeError) as e:
        raise error(f"{archive} is not a vzpy filesystem archive: {e}") from e


def _delta_base(previous: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The full archive a new delta should apply to (a delta is always against a full one), if usable."""
    if previous is None:
        return None
    try:
        meta = _read_meta(previous, ChkpntError)
        return (previous, meta) if meta["base"] is None else _resolve_base(previous, meta, ChkpntError)
    except ChkpntError:
        return None  # without a readable base, the snapshot is still taken: as a full archive


def _changed_since(entries: Sequence[Entry], ctimes: Sequence[int], base: Fingerprint, since_ns: int) -> set[str]:
    """Paths whose entry differs from the base's or whose inode changed (ctime) since the base was taken."""
    old = {e.path: e for e in base.entries}
    chosen = {
        e.path
        for e, ctime in zip(entries, ctimes, strict=True)
        # Every directory goes in: cheap, and it restores directory metadata after the delta's deletions.
        if e.kind in ("d", MOUNT) or old.get(e.path) != e or ctime >= since_ns - CTIME_SLACK_NS
    }
    groups: dict[str, list[str]] = {}
    for e in entries:
        if e.link:
            groups.setdefault(e.link, [e.link]).append(e.path)
    for members in groups.values():
        if chosen.intersection(members):  # else tar would store the chosen member as a separate file
            chosen.update(members)
    return chosen


def _deletions(base: Fingerprint, current: Sequence[Entry]) -> list[str]:
    """Paths of the base to delete before a delta is extracted: gone, or of another type now."""
    return [d.path.lstrip("/") for d in _diff(base.entries, current) if d.kind == "removed" or d.what == ("type",)]


def _plan(
    entries: list[Entry], ctimes: list[int], base: tuple[Path, dict[str, Any]] | None
) -> tuple[list[Entry], list[str]]:
    """(entries to store, paths to delete first); everything and nothing for a full archive."""
    if base is None:
        return entries, []
    base_fp = Fingerprint.from_json(base[1]["fingerprint"])
    chosen = _changed_since(entries, ctimes, base_fp, base[1]["created_ns"])
    selection = [e for e in entries if e.path in chosen]
    if sum(e.size for e in selection) > REBASE_FRACTION * sum(e.size for e in entries):
        raise _Rebase
    return selection, _deletions(base_fp, entries)


class _Rebase(Exception):
    """The delta would be too big: write a full archive instead."""


def _write_tar(root: Path, out: Path, meta: dict[str, Any], selection: Sequence[Entry]) -> None:
    with tempfile.TemporaryDirectory(prefix="vzpy-fsstate-") as tmp:
        (Path(tmp) / META).write_text(json.dumps(meta, separators=(",", ":")))
        listing = Path(tmp) / "members"
        names = (b"./" + os.fsencode(e.path) if e.path else b"." for e in selection)
        listing.write_bytes(b"\0".join(names) + b"\0")
        partial = out.with_name(out.name + ".partial")
        try:
            proc.run(
                [
                    *("tar", "--create", "--file", partial, f"--use-compress-program={COMPRESS}"),
                    *TAR_OPTIONS,
                    *("--sparse", "--no-recursion", "--null", "--verbatim-files-from"),
                    # Members go under TREE/ (hard link targets too) so META cannot clash with a CT file;
                    # the S flag leaves symlink targets alone.
                    f"--transform=s,^\\.,{TREE},S",
                    *("-C", tmp, META, "-C", os.path.realpath(root), f"--files-from={listing}"),
                ],
                error=ChkpntError,
                what=f"archiving {root}",
            )
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)


def archive_tree(root: Path, out: Path, *, previous: Path | None = None) -> ArchiveInfo:
    """Archive the tree at root into out (tar + zstd), everything a restore needs to put it back exactly.

    With `previous` (an earlier archive of this tree), write a delta against its full base: the files changed
    since, every directory, and what to delete. Falls back to a full archive when there is no usable base or
    the delta would carry more than REBASE_FRACTION of the tree's bytes.
    """
    started, clock = time.time_ns(), time.monotonic()
    walker = _Walker(root, deep=False, excluder=_Excluder(()), ctimes=True)
    entries = _walk(walker, ChkpntError)
    assert walker.ctimes is not None
    base = _delta_base(previous)
    try:
        selection, deletions = _plan(entries, walker.ctimes, base)
    except (_Rebase, RestoreError):  # too big a delta, or a base whose fingerprint is unreadable
        base, (selection, deletions) = None, (entries, [])
    fp = Fingerprint(tuple(entries))
    meta = {
        "format": FORMAT,
        "created_ns": started,
        "fingerprint": fp.to_json(),
        "base": None if base is None else _base_ref(base[0], base[1], out),
        "delete": deletions,
    }
    _write_tar(root, out, meta, selection)
    base_path = None if base is None else base[0]
    return ArchiveInfo(out, fp, base_path, len(selection), out.stat().st_size, time.monotonic() - clock)


def _base_id(meta: dict[str, Any]) -> str:
    return f"{meta['created_ns']}:{meta['fingerprint']['digest']}"


def _base_ref(base: Path, meta: dict[str, Any], out: Path) -> dict[str, str]:
    # Relative first (the pair moved together), absolute as well (the delta alone extracted elsewhere).
    where = {"path": os.path.relpath(base, out.parent), "absolute": os.path.abspath(base)}
    return {**where, "id": _base_id(meta)}


def _resolve_base(archive: Path, meta: dict[str, Any], error: type[VzError]) -> tuple[Path, dict[str, Any]]:
    """The full archive the delta `archive` applies to, checked to be the very one it was taken against."""
    ref = meta["base"]
    candidates = [archive.parent / ref["path"], Path(ref["absolute"])]
    base = next((c for c in candidates if c.is_file()), candidates[0])
    base_meta = _read_meta(base, error)
    if base_meta["base"] is not None or _base_id(base_meta) != ref["id"]:
        raise error(f"{base} is not the base archive {archive} was taken against")
    return base.resolve(), base_meta


# --- restoring


def _chain(archive: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The archives to extract in order: the full base first when archive is a delta."""
    meta = _read_meta(archive)
    if meta["base"] is None:
        return [(archive, meta)]
    return [_resolve_base(archive, meta, RestoreError), (archive, meta)]


def _extract(archive: Path, dest: Path) -> None:
    proc.run(
        ["tar", "--extract", "--file", archive, "--zstd", *TAR_OPTIONS, "--same-permissions", "-C", dest, TREE],
        error=RestoreError,
        what=f"extracting {archive}",
    )


def _inside(tree: Path, rel: str) -> Path:
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise RestoreError(f"filesystem archive lists an unsafe path {rel!r}")
    return tree / rel


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _rmtree(path: Path) -> None:
    def writable(func: Callable[..., Any], failed: str, _exc: object) -> None:
        # Without root, a read-only directory (e.g. mode 0555 from the CT) must be opened up to be emptied.
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    shutil.rmtree(path, onerror=writable)


def _swap(new: Path, root: Path, trash: Path) -> None:
    """Put new in root's place; the old tree goes to trash. A failure leaves root as it was."""
    had_root = os.path.lexists(root)
    if had_root:
        os.rename(root, trash)
    try:
        os.rename(new, root)
    except OSError:
        if had_root:
            os.rename(trash, root)
        raise


def restore_tree(archive: Path, root: Path) -> None:
    """Replace the tree at root by the archived one (the CT is stopped).

    Everything is extracted into a sibling temporary directory and checked against the archived fingerprint
    before the swap, so a bad or incomplete archive leaves root untouched.
    """
    root = Path(os.path.abspath(root))
    chain = _chain(archive)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.vzpy-restore-", dir=root.parent))
    except OSError as e:
        raise RestoreError(f"cannot restore {root}: {e}") from e
    try:
        tree = work / TREE
        for part, meta in chain:
            for rel in meta["delete"]:
                _remove(_inside(tree, rel))
            _extract(part, work)
        fp = Fingerprint.from_json(chain[-1][1]["fingerprint"])
        differences = compare(fp, tree)
        if differences:
            _, detail = describe_differences("?", differences)
            raise RestoreError(f"{archive} did not restore the tree it recorded", detail=detail)
        _swap(tree, root, work / "old")
    except OSError as e:
        raise RestoreError(f"cannot restore {root} from {archive}: {e}") from e
    finally:
        try:
            _rmtree(work)
        except OSError:
            pass  # the restore itself is done (or failed for its own reason): a leftover is only litter
