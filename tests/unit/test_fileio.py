"""fileio: atomic replacement (fsync of the data before the rename, of the directory after), exact mode, no
temp file left behind on failure; plus the shared size formatter."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vzpy import fileio
from vzpy.units import human_size


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The order of fsync (of a file or a directory) and rename calls fileio makes."""
    seen: list[str] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "fsync":
                kind = "dir" if os.path.isdir(f"/proc/self/fd/{args[0]}") else "file"
                seen.append(f"fsync {kind}")
            else:
                seen.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(fileio.os, "fsync", spy("fsync", os.fsync))
    monkeypatch.setattr(fileio.os, "rename", spy("rename", os.rename))
    monkeypatch.setattr(fileio.os, "replace", spy("rename", os.replace))
    return seen


def test_write_atomic_fsyncs_data_then_renames_then_fsyncs_dir(tmp_path: Path, events: list[str]) -> None:
    target = tmp_path / "state"
    target.write_text("old")
    fileio.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert events == ["fsync file", "rename", "fsync dir"]
    assert os.listdir(tmp_path) == ["state"]


def test_not_durable_skips_fsync(tmp_path: Path, events: list[str]) -> None:
    fileio.write_atomic(tmp_path / "cache", b"x", durable=False)
    assert events == ["rename"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0o077)
    try:
        fileio.write_atomic(tmp_path / "f", "x", mode=mode)
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o7777 == mode


def test_default_mode_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fileio.write_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


def test_failure_while_writing_leaves_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "conf"
    target.write_text("old")
    with pytest.raises(RuntimeError), fileio.atomic_fd(target) as fd:
        os.write(fd, b"half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["conf"]


def test_failed_fsync_leaves_target_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", no_space)
    target = tmp_path / "conf"
    with pytest.raises(OSError, match="No space"):
        fileio.write_atomic(target, "new")
    assert os.listdir(tmp_path) == []


def test_failed_rename_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_text("x")
    with pytest.raises(OSError):
        fileio.write_atomic(target, "new")  # a file cannot replace a non-empty directory
    assert sorted(os.listdir(tmp_path)) == ["dir"]


def test_large_content_is_written_whole(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    fileio.write_atomic(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_replace_durably(tmp_path: Path, events: list[str]) -> None:
    src, dst = tmp_path / "partial", tmp_path / "done"
    src.write_text("x")
    fileio.replace_durably(src, dst)
    assert dst.read_text() == "x"
    assert not src.exists()
    assert events == ["fsync file", "rename", "fsync dir"]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB")],
)
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


def test_dir_fd_form_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path, events: list[str]) -> None:
    outside = tmp_path / "outside"
    outside.write_text("host file")
    inside = tmp_path / "ct"
    inside.mkdir()
    (inside / "hostname").symlink_to(outside)
    dir_fd = os.open(inside, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fileio.write_atomic("hostname", "ct\n", mode=0o644, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert outside.read_text() == "host file"
    assert not (inside / "hostname").is_symlink()
    assert (inside / "hostname").read_text() == "ct\n"
    assert os.listdir(inside) == ["hostname"]
    assert events == ["fsync file", "rename", "fsync dir"]


def test_dir_fd_form_takes_only_a_bare_name(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ValueError, match="bare file name"):
            fileio.write_atomic("etc/hostname", "x", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def test_failure_with_dir_fd_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            fileio.write_atomic("d", "new", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert os.listdir(tmp_path) == ["d"]


def test_dir_fd_may_be_an_o_path_fd(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fileio.write_atomic("f", "x", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "f").read_text() == "x"
