"""vzpy.migrate.changes: what the frozen final sync sends, found from ctimes and directory inodes on a real
tree (root-free). The sleeps only age the tree past the (shrunk) ctime margin; nothing is timed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vzpy.migrate import changes

MARGIN_NS = 20_000_000
SETTLE = 0.1  # > MARGIN_NS and a jiffy of the coarse clock ctimes are stamped with


@pytest.fixture(autouse=True)
def short_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes, "CTIME_MARGIN_NS", MARGIN_NS)


def make_tree(root: Path) -> None:
    for d in ("a/sub/deep", "b", "c"):
        (root / d).mkdir(parents=True)
    for f in ("a/f", "a/sub/g", "a/sub/deep/h", "b/keep", "c/x", "top"):
        (root / f).write_text(f"{f}\n")
    (root / "b" / "link").symlink_to("keep")


def snapshot_of(root: Path) -> changes.TreeSnapshot:
    make_tree(root)
    time.sleep(SETTLE)
    snap = changes.snapshot(root)
    time.sleep(SETTLE)
    return snap


def test_an_unchanged_tree_has_nothing_to_send(tmp_path: Path) -> None:
    found = changes.changes_since(snapshot_of(tmp_path))
    assert found.empty and found.files_from() == b"" and found.forced_from() == b""


def test_a_file_changed_in_place_is_named_alone(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    (tmp_path / "a" / "sub" / "g").write_text("changed, longer\n")
    found = changes.changes_since(snap)
    assert (found.dirs, found.files, found.forced) == ([], ["a/sub/g"], [])


def test_added_and_deleted_entries_list_their_directory(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    (tmp_path / "b" / "new").write_text("new\n")
    (tmp_path / "c" / "x").unlink()
    found = changes.changes_since(snap)
    assert sorted(found.dirs) == ["b", "c"] and found.files == []  # b/new goes with b's listing
    assert sorted(found.files_from().split(b"\0")[:-1]) == [b"b/", b"c/"]


def test_a_renamed_directory_brings_its_whole_subtree(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    (tmp_path / "a" / "sub").rename(tmp_path / "c" / "moved")
    found = changes.changes_since(snap)
    # its entries kept their ctimes: every directory under the new name is listed, so all of them go
    assert {"a", "c", "c/moved", "c/moved/deep"} <= set(found.dirs)


def test_a_directory_replaced_at_the_same_path_is_new(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    os.rename(tmp_path / "a" / "sub", tmp_path / "old")
    (tmp_path / "a" / "sub").mkdir()
    os.rename(tmp_path / "old" / "deep", tmp_path / "a" / "sub" / "deep")
    found = changes.changes_since(snap)
    assert {"a", "a/sub", "a/sub/deep"} <= set(found.dirs)


def test_a_replaced_symlink_lists_its_directory(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    (tmp_path / "b" / "tmp").symlink_to("/etc/passwd")
    os.replace(tmp_path / "b" / "tmp", tmp_path / "b" / "link")
    assert changes.changes_since(snap).dirs == ["b"]


def test_a_new_hard_link_names_every_path_of_the_inode(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    os.link(tmp_path / "a" / "sub" / "deep" / "h", tmp_path / "c" / "h2")
    found = changes.changes_since(snap)
    assert found.dirs == ["c"] and found.files == ["a/sub/deep/h"]  # rsync -H sees both names


def test_changes_rsync_quick_check_cannot_see_are_forced(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    f = tmp_path / "a" / "f"
    before = os.stat(f)
    f.write_text("A/F\n")  # same size
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back
    os.setxattr(tmp_path / "top", "user.vzpy", b"changed")
    os.chmod(tmp_path / "b" / "keep", 0o600)
    found = changes.changes_since(snap)
    assert sorted(found.files) == ["a/f", "b/keep", "top"]
    assert sorted(found.forced) == ["a/f", "b/keep", "top"]
    assert sorted(found.forced_from().split(b"\0")[:-1]) == [b"a/f", b"b/keep", b"top"]


def test_a_change_at_the_top_lists_the_root_as_dot(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    (tmp_path / "new-at-top").write_text("x")
    found = changes.changes_since(snap)
    assert found.dirs == [""] and found.files_from() == b"./\0"


def test_names_that_are_not_utf8_go_through_unchanged(tmp_path: Path) -> None:
    snap = snapshot_of(tmp_path)
    name = os.fsdecode(b"caf\xe9\nline")
    (tmp_path / "a" / "sub" / "g").write_text("changed\n")
    (tmp_path / "b" / name).write_text("x")
    found = changes.changes_since(snap)
    assert found.files_from().split(b"\0")[:-1] == [b"b/", b"a/sub/g"]
    assert (tmp_path / "b" / name).exists()


def test_a_clock_set_back_makes_it_a_full_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = snapshot_of(tmp_path)
    stepped = snap.clock_offset_ns - MARGIN_NS
    monkeypatch.setattr(changes, "_clock_offset", lambda: stepped)
    found = changes.changes_since(snap)
    assert found.why_full is not None and "clock" in found.why_full and not found.empty


def test_a_replaced_or_vanished_root_makes_it_a_full_sync(tmp_path: Path) -> None:
    root = tmp_path / "private"
    snap = snapshot_of(root)
    root.rename(tmp_path / "gone")
    assert changes.changes_since(snap).why_full is not None
    root.mkdir()
    assert "replaced" in (changes.changes_since(snap).why_full or "")


def test_the_walk_never_follows_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host-file").write_text("x")
    root = tmp_path / "private"
    snap = snapshot_of(root)
    (root / "a" / "escape").symlink_to(outside)
    (outside / "host-file").write_text("changed")
    found = changes.changes_since(snap)
    assert found.dirs == ["a"] and found.files == []
    assert "escape" not in b"".join([found.files_from(), found.forced_from()]).decode(errors="replace")


# --- the source's fingerprint, taken while the final sync's rsync runs (background.InThread)


def test_a_result_computed_in_a_thread_comes_back_and_so_does_its_error() -> None:
    from vzpy.background import InThread
    from vzpy.migrate import MigrateError

    assert InThread(lambda: {"count": 3}, "fingerprint", late=MigrateError).result(10.0) == {"count": 3}

    def fails() -> None:
        raise OSError("cannot read the tree")

    with pytest.raises(OSError, match="cannot read the tree"):
        InThread(fails, "fingerprint", late=MigrateError).result(10.0)


def test_a_result_not_ready_in_time_is_an_error_not_a_wait() -> None:
    import threading

    from vzpy.background import InThread
    from vzpy.migrate import MigrateError

    release = threading.Event()
    slow = InThread(lambda: release.wait(30), "fingerprint of CT 101", late=MigrateError)
    with pytest.raises(MigrateError, match=r"fingerprint of CT 101 not done within 0\.01s"):
        slow.result(0.01)
    release.set()
    assert slow.result(30.0) is True


# --- the images with the restore request: only to an agent that speaks protocol 1.2


@pytest.mark.parametrize(("theirs", "takes"), [((1, 1), False), ((1, 2), True), ((1, 9), True)])
def test_the_images_go_with_the_restore_only_if_the_agent_knows_how(theirs: tuple[int, int], takes: bool) -> None:
    from types import SimpleNamespace

    from vzpy.migrate.protocol import negotiated
    from vzpy.migrate.remote import RemoteAgent

    agent = RemoteAgent(SimpleNamespace(version=negotiated(theirs)), {})  # type: ignore[arg-type]
    assert agent.restore_takes_images is takes
