"""fsstate: fingerprints catch every kind of change, compare reports them, the --with-fs archive round-trips."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy import fsstate
from vzpy.errors import RestoreError
from vzpy.fsstate import Entry, Fingerprint, archive_tree, compare, describe_differences, fingerprint, restore_tree

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


def test_same_size_same_mtime_needs_deep(tree: Path) -> None:
    shallow, deep = fingerprint(tree), fingerprint(tree, deep=True)
    (tree / "etc/hostname").write_text("ct999\n")
    os.utime(tree / "etc/hostname", ns=(MTIME, MTIME))
    assert changes(shallow, tree) == []  # the documented limit of the quick check
    assert changes(deep, tree) == ["/etc/hostname changed (content)"]


def test_deep_sees_xattrs(tree: Path) -> None:
    deep = fingerprint(tree, deep=True)
    os.setxattr(tree / "etc/passwd", "user.test", b"1")
    assert changes(deep, tree) == ["/etc/passwd changed (xattrs)"]


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
    with pytest.raises(fsstate.PrivateNotFound):
        fingerprint(tmp_path / "missing")


# --- the compact form


def test_json_round_trip(tree: Path) -> None:
    os.mkdir(tree / os.fsdecode(b"caf\xe9"))  # not UTF-8: must survive JSON as it does the filesystem
    for deep in (False, True):
        recorded = fingerprint(tree, deep=deep, exclude=["/tmp/*"])
        loaded = Fingerprint.from_json(json.loads(json.dumps(recorded.to_json())))
        assert loaded == recorded
        assert loaded.digest == recorded.digest
        assert compare(loaded, tree) == []


def test_digest_changes_with_any_field(tree: Path) -> None:
    recorded = fingerprint(tree)
    entries = list(recorded.entries)
    entries[3] = entries[3]._replace(mode=entries[3].mode ^ 1)
    assert Fingerprint(tuple(entries)).digest != recorded.digest


def synthetic(count: int, *, deep: bool) -> Fingerprint:
    """A Debian-like listing without touching the disk: nested dirs, varied names, sizes and mtimes."""
    entries = [Entry("", "d", 0o755, 0, 0)]
    for d in range(count // 50):
        directory = f"usr/share/doc/package-{d:05d}"
        entries.append(Entry(directory, "d", 0o755, 0, 0))
        for f in range(49):
            digest = f"{(d * 49 + f) * 2654435761 % 2**128:032x}" if deep else ""
            mtime = 1_690_000_000_000_000_000 + (d * 7919 + f * 104729) * 1_000_003
            entries.append(
                Entry(f"{directory}/file-{f:02d}.gz", "f", 0o644, 0, 0, 1000 + f * 37 + d, mtime, hash=digest)
            )
    entries.sort(key=lambda e: fsstate._key(e.path))
    return Fingerprint(tuple(entries), deep)


@pytest.mark.parametrize(("deep", "bound"), [(False, 2_000_000), (True, 4_000_000)])
def test_json_size_bound_for_100k_entries(deep: bool, bound: int) -> None:
    recorded = synthetic(100_000, deep=deep)
    size = len(json.dumps(recorded.to_json()))
    assert size < bound, f"{size} bytes for {len(recorded.entries)} entries"
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
    expected = fingerprint(tree, deep=True)
    info = archive_tree(tree, tmp_path / "fs.tar.zst")
    assert info.full and info.stored == len(expected.entries) and info.size < 1 << 20
    restored = tmp_path / "restored" / "101"
    restored.parent.mkdir()
    restore_tree(info.path, restored)
    assert changes(expected, restored) == []  # modes, setuid, links, xattrs, contents, fifo
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
    expected = fingerprint(tree, deep=True)
    restore_tree(archive_tree(tree, tmp_path / "fs.tar.zst").path, tmp_path / "restored")
    assert changes(expected, tmp_path / "restored") == []
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
    before = fingerprint(tree, deep=True)
    data = archive.read_bytes()
    if damage == "truncate":
        archive.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        archive.write_bytes(data[:200] + bytes(len(data) - 200))
    else:
        archive.unlink()
    with pytest.raises(RestoreError):
        restore_tree(archive, tree)
    assert changes(before, tree) == []
    assert sorted(p.name for p in tree.parent.iterdir()) == ["101"]


def test_restore_checks_what_tar_extracted(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = archive_tree(tree, tmp_path / "fs.tar.zst").path
    extract = fsstate._extract

    def lossy(part: Path, dest: Path) -> None:
        extract(part, dest)
        (dest / fsstate.TREE / "etc/hostname").unlink()  # as if tar had silently skipped a member

    monkeypatch.setattr(fsstate, "_extract", lossy)
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

    monkeypatch.setattr(fsstate.os, "rename", failing)
    with pytest.raises(RestoreError, match="cross-device"):
        restore_tree(archive, tree)
    monkeypatch.undo()
    assert (tree / "etc/passwd").read_text() == "current\n"
    assert sorted(p.name for p in tree.parent.iterdir()) == ["101"]


# --- deltas against a full base


def take_base(root: Path, out: Path) -> fsstate.ArchiveInfo:
    """A full archive taken once the tree's ctimes are clearly older than it, as a nightly base would be."""
    time.sleep(2 * fsstate.CTIME_SLACK_NS / 1e9)
    return archive_tree(root, out)


def add_bulk(root: Path) -> None:
    """Unchanged bytes, so a delta of a few small files stays below the rebase threshold."""
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/libbig.so").write_bytes(os.urandom(256 << 10))


def change_everything_kind(root: Path) -> None:
    (root / "etc/hostname").write_text("ct102\n")
    (root / "tmp/new").write_text("new")
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").mkdir()  # file -> dir
    shutil.rmtree(root / "var/log")
    (root / "var/log").write_text("dir -> file")
    (root / "bin/ls").unlink()
    shutil.copy2(root / "bin/busybox", root / "bin/ls")  # hard link broken
    os.link(root / "etc/hostname", root / "etc/hostname.link")  # a new link to a changed file
    os.chmod(root / "empty", 0o711)
    (root / "bin/sh").unlink()
    (root / "bin/sh").symlink_to("ls")


def test_delta_round_trip(tree: Path, tmp_path: Path) -> None:
    add_bulk(tree)
    base = take_base(tree, tmp_path / "base.tar.zst")
    change_everything_kind(tree)
    expected = fingerprint(tree, deep=True)
    delta = archive_tree(tree, tmp_path / "delta.tar.zst", previous=base.path)
    assert delta.base == base.path
    # a second delta is taken against the full base too, never against the first delta
    again = archive_tree(tree, tmp_path / "again.tar.zst", previous=delta.path)
    assert again.base == base.path
    moved = tmp_path / "elsewhere" / "fs.tar.zst"  # as when a dump file's member is extracted to a work dir
    moved.parent.mkdir()
    shutil.copy(delta.path, moved)
    for archive in (delta.path, again.path, moved):
        target = tmp_path / f"restored-{archive.parent.name}-{archive.stem}"
        restore_tree(archive, target)
        assert changes(expected, target) == []
        assert os.stat(target / "etc/hostname").st_ino == os.stat(target / "etc/hostname.link").st_ino
        for directory in ("", "etc", "tmp", "var"):  # not compared, but a restore puts them back too
            assert os.stat(target / directory).st_mtime_ns == os.stat(tree / directory).st_mtime_ns, directory


def test_delta_sees_changes_only_ctime_reveals(tree: Path, tmp_path: Path) -> None:
    add_bulk(tree)
    base = take_base(tree, tmp_path / "base.tar.zst")
    (tree / "etc/hostname").write_text("ct999\n")  # same size, mtime put back: only the ctime moved
    os.utime(tree / "etc/hostname", ns=(MTIME, MTIME))
    delta = archive_tree(tree, tmp_path / "delta.tar.zst", previous=base.path)
    restore_tree(delta.path, tmp_path / "restored")
    assert (tmp_path / "restored/etc/hostname").read_text() == "ct999\n"


def test_delta_takes_whole_hard_link_groups() -> None:
    old = 1_000 * 10**9
    root, a, b, c = Entry("", "d", 0o755, 0, 0), *(Entry(p, "f", 0o644, 0, 0, 1) for p in "abc")
    base = Fingerprint((root, a, b, c._replace(link="a")))
    now = [root, a, b._replace(link="a"), c._replace(link="a")]  # b became a link to a; a and c did not change
    assert fsstate._changed_since(now, [old] * 4, base, since_ns=old + 10**9) == {"", "a", "b", "c"}
    assert fsstate._changed_since(base.entries, [old] * 4, base, since_ns=old + 10**9) == {""}
    ctimes = [old, old, old + 2 * 10**9, old]
    assert fsstate._changed_since(base.entries, ctimes, base, since_ns=old + 10**9) == {"", "b"}


def test_delta_stores_only_changes(tmp_path: Path) -> None:
    root = tmp_path / "ct"
    (root / "data").mkdir(parents=True)
    for i in range(200):
        (root / f"data/f{i}").write_bytes(os.urandom(4096))
    old = MTIME // 10**9
    for path in root.rglob("*"):
        os.utime(path, (old, old))
    time.sleep(2 * fsstate.CTIME_SLACK_NS / 1e9)
    base = archive_tree(root, tmp_path / "base.tar.zst", previous=tmp_path / "no-such-archive")
    assert base.full  # an unusable previous archive means a full one, not a failure
    (root / "data/f7").write_bytes(b"changed")
    delta = archive_tree(root, tmp_path / "delta.tar.zst", previous=base.path)
    assert not delta.full
    assert delta.size < base.size / 10
    restore_tree(delta.path, tmp_path / "restored")
    assert (tmp_path / "restored/data/f7").read_bytes() == b"changed"
    assert changes(fingerprint(root), tmp_path / "restored") == []


def test_delta_too_big_becomes_full(tree: Path, tmp_path: Path) -> None:
    base = archive_tree(tree, tmp_path / "base.tar.zst")
    (tree / "var/big").write_bytes(os.urandom(1 << 20))
    assert archive_tree(tree, tmp_path / "next.tar.zst", previous=base.path).full


def test_delta_without_its_base_is_refused(tree: Path, tmp_path: Path) -> None:
    add_bulk(tree)
    base = take_base(tree, tmp_path / "base.tar.zst")
    (tree / "tmp/x").write_text("x")
    delta = archive_tree(tree, tmp_path / "delta.tar.zst", previous=base.path)
    assert not delta.full
    base.path.unlink()
    with pytest.raises(RestoreError, match=r"base\.tar\.zst is missing"):
        restore_tree(delta.path, tree)
    archive_tree(tree, base.path)  # a new base of the same name is not the one the delta was taken against
    with pytest.raises(RestoreError, match="is not the base archive"):
        restore_tree(delta.path, tree)
    assert (tree / "tmp/x").exists()
