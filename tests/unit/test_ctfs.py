"""runtime/ctfs: paths inside a CT's root resolve as the CT sees them and never lead out (openat2, no root needed)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from vzpy.errors import CtFileError
from vzpy.runtime.ctfs import CtRoot


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    """A file outside the CT root standing in for a host file a hostile CT aims at."""
    target = tmp_path / "host" / "victim"
    target.parent.mkdir()
    target.write_text("host data\n")
    return target


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ct_root = tmp_path / "ct"
    (ct_root / "etc").mkdir(parents=True)
    (ct_root / "etc" / "hostname").write_text("old\n")
    return ct_root


def escapes(host_file: Path, depth: int = 12) -> list[str]:
    """Link targets that reach `host_file` from the host's point of view: absolute and climbing with .."""
    return [str(host_file), "../" * depth + str(host_file).lstrip("/")]


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_write_replaces_a_symlink_to_a_host_file_instead_of_writing_through_it(
    root: Path, host_file: Path, kind: str
) -> None:
    link = root / "etc" / "hostname"
    link.unlink()
    link.symlink_to(escapes(host_file)[kind == "relative"])
    with CtRoot(root) as ct_root:
        ct_root.write_atomic("/etc/hostname", b"ct\n")
    assert host_file.read_text() == "host data\n"
    assert not link.is_symlink() and link.read_text() == "ct\n"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["hostname"]  # no temp file left


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_a_directory_symlink_pointing_out_resolves_inside_the_root(root: Path, host_file: Path, kind: str) -> None:
    (root / "etc").rename(root / "etc.real")
    (root / "etc").symlink_to(escapes(host_file.parent)[kind == "relative"])
    with CtRoot(root) as ct_root, pytest.raises(CtFileError) as raised:
        ct_root.write_atomic("/etc/hostname", b"ct\n")
    assert raised.value.errno == errno.ENOENT  # the host dir's path does not exist inside the CT
    assert raised.value.exit_code == 8
    assert sorted(p.name for p in host_file.parent.iterdir()) == ["victim"]
    assert host_file.read_text() == "host data\n"


def test_links_inside_the_root_are_followed_there(root: Path) -> None:
    (root / "etc").rename(root / "etc.real")
    (root / "etc").symlink_to("/etc.real")  # absolute: from inside the CT
    (root / "up").symlink_to("../../../../..")
    with CtRoot(root) as ct_root:
        ct_root.write_atomic("/up/etc/hostname", b"ct\n")
        assert ct_root.read_bytes("/etc/hostname") == b"ct\n"
        assert ct_root.resolve("/up/etc/hostname") == root / "etc.real" / "hostname"
        assert ct_root.resolve("../../..") == root
    assert (root / "etc.real" / "hostname").read_text() == "ct\n"


def test_written_file_gets_the_mode_asked_for_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o077)
    try:
        with CtRoot(root) as ct_root:
            ct_root.write_atomic("/etc/tool", b"#!/bin/sh\n", mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "etc" / "tool").stat().st_mode) == 0o755


def test_write_over_a_directory_fails_clearly_and_leaves_no_temp_file(root: Path) -> None:
    (root / "etc" / "hostname").unlink()
    (root / "etc" / "hostname").mkdir()
    (root / "etc" / "hostname" / "inside").write_text("x")
    with CtRoot(root) as ct_root, pytest.raises(CtFileError, match=r"cannot write /etc/hostname inside the CT root"):
        ct_root.write_atomic("/etc/hostname", b"ct\n")
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["hostname"]


def test_read_refuses_what_is_not_a_regular_file_without_blocking(root: Path, host_file: Path) -> None:
    os.mkfifo(root / "etc" / "fifo")
    (root / "etc" / "out").symlink_to(host_file)
    with CtRoot(root) as ct_root:
        with pytest.raises(CtFileError, match="not a regular file"):
            ct_root.read_bytes("/etc/fifo")
        with pytest.raises(CtFileError) as raised:
            ct_root.read_bytes("/etc/out")
        assert raised.value.errno == errno.ENOENT
        with pytest.raises(CtFileError, match="larger than 2 bytes"):
            ct_root.read_bytes("/etc/hostname", limit=2)


def test_stat_follows_links_inside_only(root: Path, host_file: Path) -> None:
    (root / "etc" / "out").symlink_to(host_file)
    (root / "etc" / "in").symlink_to("hostname")
    (root / "etc" / "loop").symlink_to("loop")
    with CtRoot(root) as ct_root:
        assert ct_root.stat("/etc/out") is None
        assert ct_root.stat("/etc/loop") is None
        inside = ct_root.stat("/etc/in")
        assert inside is not None and inside.st_ino == (root / "etc" / "hostname").stat().st_ino


def test_mkdir_and_symlink_create_inside_and_report_what_exists(root: Path, host_file: Path) -> None:
    (root / "out").symlink_to(host_file.parent)
    with CtRoot(root) as ct_root:
        assert ct_root.mkdir("/sbin", 0o700) is True
        assert ct_root.mkdir("/sbin") is False
        assert ct_root.symlink("vzpy-init", "/sbin/init") is True
        assert ct_root.symlink("other", "/sbin/init") is False
        with pytest.raises(CtFileError):
            ct_root.mkdir("/out/new")
    assert stat.S_IMODE((root / "sbin").stat().st_mode) == 0o700
    assert os.readlink(root / "sbin" / "init") == "vzpy-init"
    assert sorted(p.name for p in host_file.parent.iterdir()) == ["victim"]


@pytest.mark.parametrize("path", ["/", "/etc/..", "/etc/.", "../x"])
def test_paths_that_name_no_file_are_a_programming_error(root: Path, path: str) -> None:
    with CtRoot(root) as ct_root, pytest.raises(ValueError):
        ct_root.write_atomic(path, b"")


def test_a_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CtFileError, match="cannot open the CT root"):
        CtRoot(tmp_path / "absent")
