"""The `chkpnt --with-fs` archive of a CT's private area, and putting it back on restore.

The archive's contents come from the CT, whose root is hostile: it may have crafted symlinks, hard links and
device nodes in its private area. Before tar extracts anything, every member is checked (`_check_members`),
so that extraction stays inside its own new tree: no absolute or `..` names, no member below a symlink or a
file, no hard link to anything but a regular file already in the archive, only the devices a CT is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from vzpy import proc
from vzpy.errors import ChkpntError, RestoreError
from vzpy.fsstate.diff import compare, describe_differences
from vzpy.fsstate.record import FORMAT, Entry, Excluder, Fingerprint, walk

META = "vzpy-fsstate.json"  # first member: format, creation time, fingerprint; the tree follows under TREE/
TREE = "tree"
COMPRESS = "zstd -T0 -1"  # tar splits this itself; no shell is involved
TAR_OPTIONS = ("--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")
MAX_META = 64 << 20
# The character devices a CT may keep in its private area: those its /dev gets (runtime.launcher.DEVICES)
# and the console and ptmx that templates create. Anything else (a disk, /dev/mem, /dev/kmsg) would give
# whoever opens it on the host, or the CT after a restore, more than the CT was given.
CT_DEVICES = frozenset({(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)})


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    fingerprint: Fingerprint  # of the tree as archived
    stored: int  # entries written into the archive
    size: int  # bytes
    seconds: float


def archive_tree(root: Path, out: Path) -> ArchiveInfo:
    """Archive the tree at root into out (tar + zstd): everything a restore needs to put it back exactly."""
    clock = time.monotonic()
    entries = walk(root, Excluder(()), ChkpntError)
    for entry in entries:
        if problem := _device_problem(entry.kind, entry.rdev):
            raise ChkpntError(f"{root}/{entry.path}: {problem}; remove it from the CT")
    fp = Fingerprint(tuple(entries))
    meta = {"format": FORMAT, "created_ns": time.time_ns(), "fingerprint": fp.to_json()}
    _write_tar(root, out, meta, entries)
    return ArchiveInfo(out, fp, len(entries), out.stat().st_size, time.monotonic() - clock)


def _device_problem(kind: str, rdev: int) -> str | None:
    if kind == "b" or (kind == "c" and (os.major(rdev), os.minor(rdev)) not in CT_DEVICES):
        return f"{'block' if kind == 'b' else 'char'} device {os.major(rdev)}:{os.minor(rdev)} is not one a CT may have"
    return None


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


# --- restoring


def restore_tree(archive: Path, root: Path) -> None:
    """Replace the tree at root by the archived one (the CT is stopped).

    The archive's members are checked first; everything is then extracted into a sibling temporary directory
    and checked against the archived fingerprint before the swap, so a bad, hostile or incomplete archive
    leaves root untouched.
    """
    root = Path(os.path.abspath(root))
    meta = _check_members(archive)
    recorded = Fingerprint.from_json(meta["fingerprint"])
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.vzpy-restore-", dir=root.parent))
    except OSError as e:
        raise RestoreError(f"cannot restore {root}: {e}") from e
    try:
        tree = work / TREE
        _extract(archive, work)
        found = compare(recorded, tree)
        if found:
            _, detail = describe_differences("?", found)
            raise RestoreError(f"{archive} did not restore the tree it recorded", detail=detail)
        _swap(tree, root, work / "old")
    except OSError as e:
        raise RestoreError(f"cannot restore {root} from {archive}: {e}") from e
    finally:
        try:
            _rmtree(work)
        except OSError:
            pass  # the restore itself is done (or failed for its own reason): a leftover is only litter


def _check_members(archive: Path) -> dict[str, Any]:
    """The archive's metadata, after checking that extracting its members cannot write outside its tree."""
    if not archive.is_file():
        raise RestoreError(f"filesystem archive {archive} is missing")
    try:
        with (
            open(archive, "rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            meta = _read_meta(archive, tar)
            seen: dict[str, str] = {}
            while (member := tar.next()) is not None:
                seen[member.name] = _member_kind(archive, member, seen)
                tar.members.clear()  # type: ignore[attr-defined]  # a stream needs no index of 100k TarInfos
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
        raise RestoreError(f"filesystem archive {archive} is damaged: {e}") from e
    if TREE not in seen:
        raise RestoreError(f"filesystem archive {archive} holds no tree")
    return meta


def _read_meta(archive: Path, tar: tarfile.TarFile) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != META or not first.isreg() or first.size > MAX_META:
        raise RestoreError(f"{archive} is not a vzpy filesystem archive: it does not start with {META}")
    data = tar.extractfile(first)
    assert data is not None  # a regular file
    try:
        meta = json.loads(data.read())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if meta["format"] != FORMAT:
            raise ValueError(f"format {meta['format']}")
    except (ValueError, KeyError, TypeError) as e:
        raise RestoreError(f"{archive} is not a vzpy filesystem archive: {e}") from e
    if meta.get("base") is not None or meta.get("delete"):
        raise RestoreError(f"{archive} is a delta archive, which this vzpy does not restore; restore a full one")
    return meta


def _member_kind(archive: Path, member: tarfile.TarInfo, seen: dict[str, str]) -> str:
    """The member's kind ("d", "f", "l", "c", "p"), or RestoreError when extracting it could escape the tree."""
    name = member.name
    parts = name.split("/")
    parent = name.rpartition("/")[0]

    def refuse(why: str) -> RestoreError:
        return RestoreError(f"filesystem archive {archive} is unsafe: member {name!r} {why}")

    if parts[0] != TREE or any(part in ("", ".", "..") for part in parts):
        raise refuse("is not a plain path under tree/")
    if name in seen:
        raise refuse("appears twice")
    if name == TREE and not member.isdir():
        raise refuse("is the tree's root but not a directory")
    if name != TREE and seen.get(parent) != "d":
        # tar would resolve the parent: through a symlink it could lead anywhere on the host
        raise refuse(f"is not inside a directory of the archive ({parent!r} is {_kind_name(seen.get(parent))})")
    if member.islnk():
        if seen.get(member.linkname) != "f":
            raise refuse(f"is a hard link to {member.linkname!r}, which is not a file of the archive")
        return "f"
    return _plain_kind(member, refuse)


def _plain_kind(member: tarfile.TarInfo, refuse: Callable[[str], RestoreError]) -> str:
    if member.isdir():
        return "d"
    if member.isreg():
        return "f"
    if member.issym():
        return "l"  # created as a symlink and never followed: nothing may be inside it (see above)
    if member.isfifo():
        return "p"
    if member.ischr() or member.isblk():
        kind = "c" if member.ischr() else "b"
        if problem := _device_problem(kind, os.makedev(member.devmajor, member.devminor)):
            raise refuse(f"is a {problem}")
        return kind
    raise refuse(f"has tar type {member.type!r}, which a CT's files never have")


def _kind_name(kind: str | None) -> str:
    return {None: "not in the archive before it", "d": "a directory"}.get(kind, f"of kind {kind}")


def _extract(archive: Path, dest: Path) -> None:
    proc.run(
        ["tar", "--extract", "--file", archive, "--zstd", *TAR_OPTIONS, "--same-permissions", "-C", dest, TREE],
        error=RestoreError,
        what=f"extracting {archive}",
    )


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
