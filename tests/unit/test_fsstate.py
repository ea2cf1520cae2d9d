"""fsstate: fingerprints catch every kind of change, compare reports them, the --with-fs archive round-trips."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from vzpy import fsstate
from vzpy.errors import ChkpntError, PrivateNotFound, RestoreError
from vzpy.fsstate import (
    Entry,
    Fingerprint,
    archive_tree,
    compare,
    describe_differences,
    diff,
    fingerprint,
    restore_tree,
)
from vzpy.fsstate import archive as archive_module
from vzpy.fsstate.record import path_key

MTIME = 1_600_000_000_123_456_789


def make_tree(root: Path) -> Path:
    """A small CT-like tree: files, a setuid binary, symlinks, a hard link, an empty dir, a fifo."""
    for d in ("bin", "etc", "var/log", "tmp", "proc", "empty"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/hostname").write_text("ct101\n")
    (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    os.chmod(root / "bin/busybox", 0o4755)
    (root / "bin/sh").symlink_to("busybox")
    os.link(root / "bin/busybox", root / "bin/ls")
    (root / "var/log/messages").write_text("boot\n" * 100)
    os.chmod(root / "tmp", 0o1777)
    os.mkfifo(root / "var/log/fifo")
    for path in (root / "etc/passwd", root / "etc/hostname", root / "var/log/messages"):
        os.utime(path, ns=(MTIME, MTIME))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "private" / "101")


def deep_contents(root: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """What the fingerprint leaves to rsync's quick check: every file's bytes and every entry's xattrs."""
    found = {}
    for entry in fingerprint(root).entries:
        path = root / entry.path
        data = hashlib.sha256(path.read_bytes()).hexdigest() if entry.kind == "f" else ""
        names = os.listxattr(path, follow_symlinks=False)
        found[entry.path] = (data, {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)})
    return found


def changes(recorded: Fingerprint, root: Path, **kw: object) -> list[str]:
    return [str(d) for d in compare(recorded, root, **kw)]  # type: ignore[arg-type]


# --- fingerprint and compare


def test_equal_trees_compare_equal(tree: Path, tmp_path: Path) -> None:
    recorded = fingerprint(tree)
    assert compare(recorded, tree) == []
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", tree, copy], check=True)
    assert changes(recorded, copy) == []  # a faithful copy (rsync -aH, cp -a) is the same filesystem


def test_fingerprint_records_what_it_promises(tree: Path) -> None:
    entries = {e.path: e for e in fingerprint(tree).entries}
    assert entries[""].kind == "d"
    assert entries["bin/busybox"].mode == 0o4755
    assert entries["bin/ls"].link == "bin/busybox"  # the later path names the first one of its inode
    assert entries["bin/busybox"].link == ""
    assert entries["bin/sh"] == Entry("bin/sh", "l", 0, os.getuid(), os.getgid(), target="busybox")
    assert entries["var/log/fifo"].kind == "p"
    assert entries["etc/passwd"].mtime_ns == MTIME
    assert entries["tmp"].mode == 0o1777
    assert [e.path for e in fingerprint(tree).entries][:3] == ["", "bin", "bin/busybox"]


def test_content_change_same_size_new_mtime(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "etc/hostname").write_text("ct102\n")
    assert changes(recorded, tree) == ["/etc/hostname changed (mtime)"]


def test_size_change_same_mtime(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.utime(tree / "etc/passwd", ns=(MTIME, MTIME))
    assert changes(recorded, tree) == ["/etc/passwd changed (size)"]


def test_same_size_same_mtime_is_the_quick_checks_limit(tree: Path) -> None:
    shallow = fingerprint(tree)
    (tree / "etc/hostname").write_text("ct999\n")
    os.utime(tree / "etc/hostname", ns=(MTIME, MTIME))
    assert changes(shallow, tree) == []  # the documented limit of the quick check


def test_chmod_and_setuid(tree: Path) -> None:
    recorded = fingerprint(tree)
    os.chmod(tree / "etc/passwd", 0o600)
    os.chmod(tree / "bin/busybox", 0o755)  # the hard link bin/ls shares the inode
    assert changes(recorded, tree) == [
        "/bin/busybox changed (mode)",
        "/bin/ls changed (mode)",
        "/etc/passwd changed (mode)",
    ]


@pytest.mark.root
def test_chown(tree: Path) -> None:
    recorded = fingerprint(tree)
    os.chown(tree / "etc/passwd", 1000, 0)
    os.lchown(tree / "bin/sh", 0, 1000)
    assert changes(recorded, tree) == ["/bin/sh changed (owner)", "/etc/passwd changed (owner)"]


def test_symlink_retarget(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "bin/sh").unlink()
    (tree / "bin/sh").symlink_to("/bin/dash")
    [difference] = compare(recorded, tree)
    assert str(difference) == "/bin/sh changed (target)"
    assert difference.detail() == "/bin/sh changed: target 'busybox' -> '/bin/dash'"


def test_file_becomes_directory_reported_once(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "etc/hostname").unlink()
    (tree / "etc/hostname").mkdir()
    (tree / "etc/hostname/inside").write_text("x")
    assert changes(recorded, tree) == ["/etc/hostname changed (type)"]


def test_added_and_removed(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "tmp/x").write_text("new")
    shutil.rmtree(tree / "var/log")
    assert changes(recorded, tree) == ["/tmp/x added", "/var/log removed"]  # a gone directory: one line


def test_hard_link_broken(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "bin/ls").unlink()
    shutil.copy2(tree / "bin/busybox", tree / "bin/ls")
    assert changes(recorded, tree) == ["/bin/ls changed (hard link)"]


@pytest.mark.root
def test_device_node(tree: Path) -> None:
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    recorded = fingerprint(tree)
    os.unlink(tree / "null")
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    [difference] = compare(recorded, tree)
    assert difference.detail() == "/null changed: device 1:3 -> 1:5"


@pytest.fixture
def mounted(tree: Path) -> Iterator[Path]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tree / "proc"], check=True)
    try:
        yield tree / "proc"
    finally:
        subprocess.run(["umount", tree / "proc"], check=True)


@pytest.mark.root
def test_mount_points_not_crossed(tree: Path, mounted: Path) -> None:
    unmounted = fingerprint(tree)
    (mounted / "inside").write_text("another filesystem")
    recorded = fingerprint(tree)
    entries = {e.path: e for e in recorded.entries}
    assert entries["proc"].kind == fsstate.MOUNT
    assert "proc/inside" not in entries
    assert compare(unmounted, tree) == []  # mounted or not, the private area has a directory there
    subprocess.run(["umount", mounted], check=True)
    try:
        assert compare(recorded, tree) == []
    finally:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mounted], check=True)


@pytest.mark.root
def test_bind_mount_of_same_filesystem_not_crossed(tree: Path, tmp_path: Path) -> None:
    source = tmp_path / "elsewhere"
    source.mkdir()
    (source / "file").write_text("x")
    subprocess.run(["mount", "--bind", source, tree / "empty"], check=True)
    try:
        entries = {e.path for e in fingerprint(tree).entries}
    finally:
        subprocess.run(["umount", tree / "empty"], check=True)
    assert "empty" in entries and "empty/file" not in entries


def test_exclude(tree: Path) -> None:
    (tree / "run").mkdir()
    recorded = fingerprint(tree, exclude=["/run/vzpy-init.ready", "/tmp/*"])
    (tree / "run/vzpy-init.ready").write_text("")
    (tree / "tmp/junk").write_text("x")
    assert compare(recorded, tree) == []
    (tree / "etc/new").write_text("x")
    (tree / "tmp/dir").mkdir()  # "*" crosses "/": the whole of /tmp below it is ignored
    (tree / "tmp/dir/file").write_text("x")
    assert changes(recorded, tree) == ["/etc/new added"]


def test_exclude_at_compare_applies_to_both_sides(tree: Path) -> None:
    recorded = fingerprint(tree)
    shutil.rmtree(tree / "var")
    (tree / "tmp/junk").write_text("x")
    (tree / "bin/busybox").unlink()  # bin/ls, its hard link, now leads its inode alone
    assert changes(recorded, tree, exclude=["var", "/tmp/junk", "/bin/busybox"]) == []
    assert changes(recorded, tree, exclude=["/var"]) == [
        "/bin/busybox removed",
        "/bin/ls changed (hard link)",
        "/tmp/junk added",
    ]


def test_limit_total_and_path_order(tree: Path) -> None:
    recorded = fingerprint(tree)
    for i in range(15):
        (tree / f"tmp/f{i:02d}").write_text("x")
    found = compare(recorded, tree, limit=10)
    assert [d.path for d in found] == [f"/tmp/f{i:02d}" for i in range(10)]
    assert found.total == 15


def test_path_order_is_by_component(tmp_path: Path) -> None:
    root = tmp_path / "t"
    for d in ("a", "a-b", "a/x"):
        (root / d).mkdir(parents=True)
    assert [e.path for e in fingerprint(root).entries] == ["", "a", "a/x", "a-b"]
    recorded = fingerprint(root)
    (root / "a/y").write_text("")
    (root / "a-b/z").write_text("")
    assert changes(recorded, root) == ["/a/y added", "/a-b/z added"]


def test_describe_differences(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "etc/passwd").write_text("changed and longer\n")
    for name in ("x", "y", "z"):
        (tree / "tmp" / name).write_text("")
    message, detail = describe_differences("101", compare(recorded, tree, limit=2))
    assert message == (
        "filesystem of CT 101 differs from the checkpoint: /etc/passwd changed (size, mtime), /tmp/x added, ... "
        "(4 differences); copy the CT's files as they were at checkpoint (e.g. rsync) or use --skip-fs-check"
    )
    lines = detail.splitlines()
    assert lines[0].startswith("/etc/passwd changed: size 30 -> 19, mtime 2020-09-13 12:26:40.123456789Z -> ")
    assert lines[1:] == ["/tmp/x added (file)", "... and 2 more"]


def test_verify_raises_restore_error(tree: Path) -> None:
    recorded = fingerprint(tree)
    fsstate.verify(recorded, tree, "101")
    (tree / "etc/passwd").unlink()
    with pytest.raises(RestoreError) as e:
        fsstate.verify(recorded, tree, "101")
    assert e.value.exit_code == 17
    assert "/etc/passwd removed (1 difference)" in e.value.message


def test_sockets_are_not_recorded(tree: Path) -> None:
    recorded = fingerprint(tree)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(tree / "var/log/dev-log"))  # CRIU unlinks and re-binds these at every restore
    assert compare(recorded, tree) == []
    assert "var/log/dev-log" not in {e.path for e in fingerprint(tree).entries}


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PrivateNotFound):
        fingerprint(tmp_path / "missing")


# --- the compact form


def test_json_round_trip(tree: Path) -> None:
    os.mkdir(tree / os.fsdecode(b"caf\xe9"))  # not UTF-8: must survive JSON as it does the filesystem
    recorded = fingerprint(tree, exclude=["/tmp/*"])
    loaded = Fingerprint.from_json(json.loads(json.dumps(recorded.to_json())))
    assert loaded == recorded
    assert loaded.digest == recorded.digest
    assert compare(loaded, tree) == []


def test_digest_changes_with_any_field(tree: Path) -> None:
    recorded = fingerprint(tree)
    entries = list(recorded.entries)
    entries[3] = entries[3]._replace(mode=entries[3].mode ^ 1)
    assert Fingerprint(tuple(entries)).digest != recorded.digest


def synthetic(count: int) -> Fingerprint:
    """A Debian-like listing without touching the disk: nested dirs, varied names, sizes and mtimes."""
    entries = [Entry("", "d", 0o755, 0, 0)]
    for d in range(count // 50):
        directory = f"usr/share/doc/package-{d:05d}"
        entries.append(Entry(directory, "d", 0o755, 0, 0))
        for f in range(49):
            mtime = 1_690_000_000_000_000_000 + (d * 7919 + f * 104729) * 1_000_003
            entries.append(Entry(f"{directory}/file-{f:02d}.gz", "f", 0o644, 0, 0, 1000 + f * 37 + d, mtime))
    entries.sort(key=lambda e: path_key(e.path))
    return Fingerprint(tuple(entries))


def test_json_size_bound_for_100k_entries() -> None:
    recorded = synthetic(100_000)
    size = len(json.dumps(recorded.to_json()))
    assert size < 2_000_000, f"{size} bytes for {len(recorded.entries)} entries"
    assert Fingerprint.from_json(recorded.to_json()) == recorded


@pytest.mark.parametrize("damage", ["digest", "entries", "format"])
def test_corrupt_json_is_a_restore_error(tree: Path, damage: str) -> None:
    data = fingerprint(tree).to_json()
    data[damage] = {"digest": "0" * 64, "entries": data["entries"][:-8], "format": 99}[damage]
    with pytest.raises(RestoreError, match="fingerprint is unreadable"):
        Fingerprint.from_json(data)


# --- the --with-fs archive


def add_specials(root: Path) -> None:
    (root / os.fsdecode(b"caf\xe9")).write_text("a name that is not UTF-8")
    os.setxattr(root / "etc/passwd", "user.origin", b"template")
    with open(root / "var/sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(root / "var/log/dev-log"))
    os.chmod(root / "var/log/dev-log", 0o666)
    os.chmod(root / "empty", 0o700)


def test_archive_round_trip(tree: Path, tmp_path: Path) -> None:
    add_specials(tree)
    expected, contents = fingerprint(tree), deep_contents(tree)
    info = archive_tree(tree, tmp_path / "fs.tar.zst")
    assert info.stored == len(expected.entries) and info.size < 1 << 20
    restored = tmp_path / "restored" / "101"
    restored.parent.mkdir()
    restore_tree(info.path, restored)
    assert changes(expected, restored) == []  # modes, setuid, links, fifo
    assert deep_contents(restored) == contents  # every file's bytes and every entry's xattrs
    assert os.stat(restored / "bin/ls").st_ino == os.stat(restored / "bin/busybox").st_ino
    assert os.getxattr(restored / "etc/passwd", "user.origin") == b"template"
    assert os.stat(restored / "var/sparse.img").st_blocks * 512 < 1 << 20  # the 64 MB hole stayed a hole
    assert os.stat(restored / "etc/passwd").st_mtime_ns == MTIME
    assert os.stat(restored / "var/log").st_mtime_ns == os.stat(tree / "var/log").st_mtime_ns
    assert list(restored.parent.iterdir()) == [restored]  # no temporary directory left behind


@pytest.mark.root
def test_archive_round_trip_owners_and_devices(tree: Path, tmp_path: Path) -> None:
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chown(tree / "etc/passwd", 100000, 100000)  # a user-namespace shifted owner, numeric only
    os.lchown(tree / "bin/sh", 4242, 4343)
    os.chown(tree / "var/log", 0, 4)
    expected, contents = fingerprint(tree), deep_contents(tree)
    restore_tree(archive_tree(tree, tmp_path / "fs.tar.zst").path, tmp_path / "restored")
    assert changes(expected, tmp_path / "restored") == []
    assert deep_contents(tmp_path / "restored") == contents
    assert os.lstat(tmp_path / "restored/bin/sh").st_uid == 4242


def test_restore_replaces_existing_tree(tree: Path, tmp_path: Path) -> None:
    expected = fingerprint(tree)
    archive = archive_tree(tree, tmp_path / "fs.tar.zst").path
    (tree / "etc/passwd").write_text("changed after the checkpoint\n")
    (tree / "tmp/new").write_text("x")
    shutil.rmtree(tree / "var")
    restore_tree(archive, tree)
    assert changes(expected, tree) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_failed_restore_leaves_tree_intact(tree: Path, tmp_path: Path, damage: str) -> None:
    archive = archive_tree(tree, tmp_path / "fs.tar.zst").path
    (tree / "etc/passwd").write_text("the CT's current files\n")
    before, contents = fingerprint(tree), deep_contents(tree)
    data = archive.read_bytes()
    if damage == "truncate":
        archive.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        archive.write_bytes(data[:200] + bytes(len(data) - 200))
    else:
        archive.unlink()
    with pytest.raises(RestoreError):
        restore_tree(archive, tree)
    assert changes(before, tree) == [] and deep_contents(tree) == contents
    assert sorted(p.name for p in tree.parent.iterdir()) == ["101"]


def test_restore_checks_what_tar_extracted(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = archive_tree(tree, tmp_path / "fs.tar.zst").path
    extract = archive_module._extract

    def lossy(part: Path, dest: Path) -> None:
        extract(part, dest)
        (dest / fsstate.TREE / "etc/hostname").unlink()  # as if tar had silently skipped a member

    monkeypatch.setattr(archive_module, "_extract", lossy)
    (tree / "etc/passwd").write_text("current\n")
    with pytest.raises(RestoreError, match="did not restore the tree it recorded") as e:
        restore_tree(archive, tree)
    assert e.value.detail == "/etc/hostname removed (file)"
    assert (tree / "etc/passwd").read_text() == "current\n"


def test_failed_swap_puts_the_old_tree_back(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = archive_tree(tree, tmp_path / "fs.tar.zst").path
    (tree / "etc/passwd").write_text("current\n")
    rename = os.rename

    def failing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name == fsstate.TREE:
            raise OSError(18, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(archive_module.os, "rename", failing)
    with pytest.raises(RestoreError, match="cross-device"):
        restore_tree(archive, tree)
    monkeypatch.undo()
    assert (tree / "etc/passwd").read_text() == "current\n"
    assert sorted(p.name for p in tree.parent.iterdir()) == ["101"]


# --- compare: what stands for what


def test_a_changed_directory_does_not_hide_changes_inside_it(tree: Path) -> None:
    recorded = fingerprint(tree)
    os.chmod(tree / "var/log", 0o700)
    (tree / "var/log/messages").write_text("rewritten\n")
    (tree / "var/log/new").write_text("x")
    assert changes(recorded, tree) == [
        "/var/log changed (mode)",
        "/var/log/messages changed (size, mtime)",
        "/var/log/new added",
    ]


def test_an_added_directory_stands_for_its_subtree_only(tree: Path) -> None:
    recorded = fingerprint(tree)
    (tree / "new/deep").mkdir(parents=True)
    (tree / "new/deep/file").write_text("x")
    (tree / "newer").write_text("a sibling whose name shares the prefix")
    assert changes(recorded, tree) == ["/new added", "/newer added"]


def test_a_retyped_entry_hides_only_its_own_subtree(tree: Path) -> None:
    recorded = fingerprint(tree)
    shutil.rmtree(tree / "var/log")
    (tree / "var/log").write_text("a file now")
    (tree / "var/logs").mkdir()
    assert changes(recorded, tree) == ["/var/log changed (type)", "/var/logs added"]


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        (Entry("x", "m", 0o755, 0, 0), Entry("x", "d", 0o700, 1, 1), ()),
        (Entry("x", "d", 0o755, 0, 0), Entry("x", "m", 0o700, 1, 1), ()),
        (Entry("x", "m", 0o755, 0, 0), Entry("x", "f", 0o755, 0, 0), ("type",)),
        (Entry("x", "l", 0, 0, 0, target="a"), Entry("x", "m", 0o755, 0, 0), ("type",)),
        (Entry("x", "f", 0o644, 0, 0, 5, 1), Entry("x", "f", 0o644, 0, 0, 6, 1), ("size",)),
        (Entry("x", "f", 0o644, 0, 0, 5, 1), Entry("x", "f", 0o644, 0, 0, 5, 2), ("mtime",)),
        (Entry("x", "f", 0o644, 0, 0), Entry("x", "f", 0o640, 0, 0), ("mode",)),
        (Entry("x", "f", 0o644, 0, 0), Entry("x", "f", 0o644, 1, 0), ("owner",)),
        (Entry("x", "f", 0o644, 0, 0), Entry("x", "f", 0o644, 0, 1), ("owner",)),
        (Entry("x", "l", 0, 0, 0, target="a"), Entry("x", "l", 0, 0, 0, target="b"), ("target",)),
        (Entry("x", "c", 0o666, 0, 0, rdev=259), Entry("x", "c", 0o666, 0, 0, rdev=261), ("device",)),
        (Entry("x", "f", 0o644, 0, 0, link="y"), Entry("x", "f", 0o644, 0, 0), ("hard link",)),
        (Entry("x", "c", 0o666, 0, 0), Entry("x", "b", 0o666, 0, 0), ("type",)),
    ],
)
def test_each_field_is_compared(old: Entry, new: Entry, what: tuple[str, ...]) -> None:
    found = list(diff.differences([Entry("", "d", 0, 0, 0), old], [Entry("", "d", 0, 0, 0), new]))
    assert [d.what for d in found] == ([what] if what else [])


@pytest.mark.root
def test_a_mount_point_replaced_by_a_file_is_a_difference(tree: Path, mounted: Path) -> None:
    recorded = fingerprint(tree)
    subprocess.run(["umount", mounted], check=True)
    try:
        mounted.rmdir()
        mounted.write_text("a file where the mount point was")
        assert changes(recorded, tree) == ["/proc changed (type)"]
        mounted.unlink()
    finally:
        mounted.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mounted], check=True)


def test_describe_a_change_of_every_field(tree: Path) -> None:
    old = Entry("x", "f", 0o644, 0, 0, 5, MTIME, link="y")
    new = Entry("x", "f", 0o600, 1, 2, 6, MTIME + 1)
    difference = fsstate.Difference("/x", "changed", ("size", "mtime", "mode", "owner", "hard link"), old, new)
    assert difference.detail() == (
        "/x changed: size 5 -> 6, mtime 2020-09-13 12:26:40.123456789Z -> 2020-09-13 12:26:40.123456790Z, "
        "mode 0644 -> 0600, owner 0:0 -> 1:2, hard link /y -> none"
    )
    assert str(difference) == "/x changed (size, mtime, mode, owner, hard link)"


# --- a hostile CT's archive stays inside its tree


def crafted(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], meta: dict[str, object] | None = None) -> Path:
    """A zstd-compressed tar as a CT's root (or whoever made the dump file) could have crafted it."""
    data = json.dumps(meta or {"format": 1, "created_ns": 0, "fingerprint": fingerprint(path.parent).to_json()})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(archive_module.META)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data.encode()))
        for member, content in members:
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


DIR = tarfile.DIRTYPE


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory the crafted archives aim at."""
    target = tmp_path / "host-etc"
    target.mkdir()
    (target / "shadow").write_text("root:secret\n")
    return target


def test_a_symlink_in_the_archive_would_lead_naive_extraction_out(tmp_path: Path, outside: Path) -> None:
    evil = [(member("tree", DIR), b""), (member("tree/etc", tarfile.SYMTYPE, linkname=str(outside)), b"")]
    evil.append((member("tree/etc/pwned"), b"written through the CT's symlink\n"))
    path = crafted(tmp_path / "evil.tar.zst", evil)
    scratch = tmp_path / "naive"
    with (
        zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        tar.extractall(scratch, filter="fully_trusted")  # what a naive extraction does
    assert (outside / "pwned").exists()  # the attack is real
    (outside / "pwned").unlink()
    root = make_tree(tmp_path / "private" / "101")
    before = fingerprint(root)
    with pytest.raises(RestoreError, match=r"unsafe: member 'tree/etc/pwned' is not inside a directory"):
        restore_tree(path, root)
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]
    assert changes(before, root) == []
    assert sorted(p.name for p in root.parent.iterdir()) == ["101"]


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([("tree/../escape", b"")], "is not a plain path under tree/"),
        ([("/etc/escape", b"")], "is not a plain path under tree/"),
        ([("tree/./x", b"")], "is not a plain path under tree/"),
        ([("other/x", b"")], "is not a plain path under tree/"),
        ([("tree/a/b", b"")], "is not inside a directory of the archive ('tree/a' is not in the archive before it)"),
        ([("tree/f", b""), ("tree/f/x", b"")], "('tree/f' is of kind f)"),
        ([("tree/x", b""), ("tree/x", b"")], "appears twice"),
    ],
)
def test_unsafe_member_names_are_refused(tmp_path: Path, members: list[tuple[str, bytes]], why: str) -> None:
    entries = [(member("tree", DIR), b"")] + [(member(name), content) for name, content in members]
    path = crafted(tmp_path / "evil.tar.zst", entries)
    with pytest.raises(RestoreError, match="is unsafe: member") as info:
        restore_tree(path, tmp_path / "private")
    assert why in info.value.message
    assert not (tmp_path / "escape").exists() and not (tmp_path / "private").exists()


@pytest.mark.parametrize(
    ("link", "why"),
    [
        ("/etc/shadow", "is a hard link to '/etc/shadow', which is not a file of the archive"),
        ("tree/../../etc/shadow", "which is not a file of the archive"),
        ("tree/dir", "is a hard link to 'tree/dir'"),
        ("tree/sym", "is a hard link to 'tree/sym'"),
        ("tree/later", "is a hard link to 'tree/later'"),
    ],
)
def test_hard_links_only_to_files_already_in_the_archive(tmp_path: Path, link: str, why: str) -> None:
    entries = [
        (member("tree", DIR), b""),
        (member("tree/dir", DIR), b""),
        (member("tree/sym", tarfile.SYMTYPE, linkname="/etc/shadow"), b""),
        (member("tree/h", tarfile.LNKTYPE, linkname=link), b""),
        (member("tree/later"), b"x"),
    ]
    with pytest.raises(RestoreError, match="is unsafe") as info:
        restore_tree(crafted(tmp_path / "evil.tar.zst", entries), tmp_path / "private")
    assert why in info.value.message


def test_the_tree_itself_must_be_a_directory(tmp_path: Path, outside: Path) -> None:
    entries = [(member("tree", tarfile.SYMTYPE, linkname=str(outside)), b""), (member("tree/pwned"), b"x")]
    with pytest.raises(RestoreError, match="member 'tree' is the tree's root but not a directory"):
        restore_tree(crafted(tmp_path / "evil.tar.zst", entries), tmp_path / "private")
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]


@pytest.mark.parametrize(
    ("kind", "major", "minor", "why"),
    [
        (tarfile.BLKTYPE, 8, 0, "is a block device 8:0 is not one a CT may have"),
        (tarfile.CHRTYPE, 1, 1, "is a char device 1:1 is not one a CT may have"),  # /dev/mem
        (tarfile.CHRTYPE, 1, 11, "is a char device 1:11 is not one a CT may have"),  # /dev/kmsg
        (tarfile.CHRTYPE, 1, 4, "is a char device 1:4 is not one a CT may have"),
    ],
)
def test_only_the_devices_a_ct_is_given_are_restored(
    tmp_path: Path, kind: bytes, major: int, minor: int, why: str
) -> None:
    entries = [(member("tree", DIR), b""), (member("tree/dev", kind, devmajor=major, devminor=minor), b"")]
    with pytest.raises(RestoreError, match="is unsafe") as info:
        restore_tree(crafted(tmp_path / "evil.tar.zst", entries), tmp_path / "private")
    assert why in info.value.message


def test_the_devices_a_ct_is_given_pass_the_check(tmp_path: Path) -> None:
    for major, minor in archive_module.CT_DEVICES:
        assert archive_module._device_problem("c", os.makedev(major, minor)) is None
        assert archive_module._device_problem("b", os.makedev(major, minor)) is not None


@pytest.mark.root
def test_chkpnt_refuses_to_archive_a_device_the_ct_may_not_have(tree: Path, tmp_path: Path) -> None:
    os.mknod(tree / "sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    with pytest.raises(ChkpntError, match="sda: block device 8:0 is not one a CT may have; remove it from the CT"):
        archive_tree(tree, tmp_path / "fs.tar.zst")


def test_other_member_types_are_refused(tmp_path: Path) -> None:
    entries = [(member("tree", DIR), b""), (member("tree/c", b"V"), b"")]
    with pytest.raises(RestoreError, match="has tar type b'V'"):
        restore_tree(crafted(tmp_path / "evil.tar.zst", entries), tmp_path / "private")


def test_an_archive_that_does_not_start_with_its_metadata_is_refused(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.addfile(member("tree", DIR))
    path = tmp_path / "fs.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    with pytest.raises(RestoreError, match=r"does not start with vzpy-fsstate\.json"):
        restore_tree(path, tmp_path / "private")


def test_a_delta_archive_of_an_older_vzpy_is_refused(tmp_path: Path, tree: Path) -> None:
    meta = {"format": 1, "created_ns": 0, "fingerprint": fingerprint(tree).to_json(), "base": {"path": "x"}}
    path = crafted(tmp_path / "fs.tar.zst", [(member("tree", DIR), b"")], meta)
    with pytest.raises(RestoreError, match="is a delta archive"):
        restore_tree(path, tmp_path / "private")


def test_an_archive_without_a_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RestoreError, match="holds no tree"):
        restore_tree(crafted(tmp_path / "fs.tar.zst", []), tmp_path / "private")


def test_a_cts_own_symlinks_round_trip_and_are_never_followed(tree: Path, tmp_path: Path, outside: Path) -> None:
    (tree / "etc/evil").symlink_to(outside)
    (tree / "up").symlink_to("../../../..")
    (tree / "etc/shadow").symlink_to(outside / "shadow")
    expected = fingerprint(tree)
    restored = tmp_path / "restored"
    restore_tree(archive_tree(tree, tmp_path / "fs.tar.zst").path, restored)
    assert changes(expected, restored) == []
    assert os.readlink(restored / "etc/evil") == str(outside)
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]
    assert (outside / "shadow").read_text() == "root:secret\n"


def test_an_archive_whose_first_file_is_not_its_metadata_is_refused(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = member("other.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    path = tmp_path / "fs.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    with pytest.raises(RestoreError, match=r"does not start with vzpy-fsstate\.json"):
        restore_tree(path, tmp_path / "private")


def test_three_differences_are_all_in_the_summary(tree: Path) -> None:
    recorded = fingerprint(tree)
    for name in ("a", "b", "c"):
        (tree / name).write_text(name)
    message, detail = describe_differences("101", compare(recorded, tree))
    assert "/a added, /b added, /c added (3 differences);" in message
    assert detail == "/a added (file)\n/b added (file)\n/c added (file)"
