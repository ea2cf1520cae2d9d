"""What needs no pycriu: request validation, the dirs and log path, the criu version policy and binary lookup,
and CRIU log excerpts (no CRIU is run)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from vzpy.criu import binary
from vzpy.criu.binary import CriuVersion, find_binary, parse_kernel_release, parse_version, version_problem
from vzpy.criu.options import CriuAction, CriuOptions, build_request, open_dirs
from vzpy.criu.rpc import first_error, log_excerpt
from vzpy.errors import CriuUnavailable

# --- validation, dirs and log path ---


def test_image_actions_need_an_images_dir() -> None:
    with pytest.raises(ValueError, match="images_dir"):
        build_request(CriuAction.RESTORE, CriuOptions())


def test_log_file_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError, match="plain name"):
        build_request(CriuAction.DUMP, CriuOptions(images_dir=Path("/images"), pid=1, log_file="../dump.log"))


def test_log_path_is_absolute_in_work_dir_else_images_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert CriuOptions(images_dir=Path("img")).log_path(CriuAction.DUMP) == tmp_path / "img" / "dump.log"
    opts = CriuOptions(images_dir=Path("img"), work_dir=tmp_path / "work", log_file="x.log")
    assert opts.log_path(CriuAction.RESTORE) == tmp_path / "work" / "x.log"
    assert CriuOptions().log_path(CriuAction.CHECK) is None


def test_open_dirs_keeps_fds_open_only_inside(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    opts = CriuOptions(images_dir=tmp_path, work_dir=tmp_path / "work")
    with open_dirs(CriuAction.DUMP, opts) as dirs:
        assert dirs.images is not None and dirs.work is not None
        assert os.readlink(f"/proc/self/fd/{dirs.images}") == str(tmp_path)
        assert os.readlink(f"/proc/self/fd/{dirs.work}") == str(tmp_path / "work")
    with pytest.raises(OSError):
        os.fstat(dirs.images)


def test_open_dirs_of_a_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), open_dirs(CriuAction.DUMP, CriuOptions(images_dir=tmp_path / "no")):
        pass


# --- version policy ---


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Version: 4.2.1\n", CriuVersion(4, 2, 1)),
        ("Version: 3.17\nGitID: v3.17-12-gabc\n", CriuVersion(3, 17, 0)),
        ("Version: 4.1.1\n", CriuVersion(4, 1, 1)),
    ],
)
def test_parse_version(text: str, version: CriuVersion) -> None:
    assert parse_version(text) == version


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="Version"):
        parse_version("criu: command not found")


def test_parse_kernel_release() -> None:
    assert parse_kernel_release("6.18.44-fc-v669") == (6, 18)
    assert parse_kernel_release("5.10.0-28-amd64") == (5, 10)


@pytest.mark.parametrize(
    ("version", "kernel", "ok"),
    [
        (CriuVersion(4, 1, 1), (6, 18), False),  # SO_PASSCRED: cannot dump TCP/UDP sockets
        (CriuVersion(3, 17, 1), (6, 16), False),
        (CriuVersion(4, 2, 0), (6, 16), True),
        (CriuVersion(4, 2, 1), (6, 18), True),
        (CriuVersion(5, 0, 0), (7, 0), True),
        (CriuVersion(3, 17, 1), (6, 1), True),  # older kernels: `criu check` decides
        (CriuVersion(4, 1, 1), (6, 15), True),
    ],
)
def test_version_policy(version: CriuVersion, kernel: tuple[int, int], ok: bool) -> None:
    problem = version_problem(version, kernel)
    assert (problem is None) is ok
    if problem:
        assert "4.2" in problem and str(version) in problem


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_env_var_wins_over_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_criu = _executable(tmp_path / "env-criu")
    monkeypatch.setenv("VZPY_CRIU", str(env_criu))
    assert find_binary(_executable(tmp_path / "conf-criu")) == env_criu


def test_config_path_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZPY_CRIU", raising=False)
    conf_criu = _executable(tmp_path / "conf-criu")
    assert find_binary(conf_criu) == conf_criu


def test_a_named_criu_that_is_not_executable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZPY_CRIU", str(tmp_path / "missing"))
    with pytest.raises(CriuUnavailable, match=r"VZPY_CRIU=.*make setup"):
        find_binary()


def test_no_criu_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZPY_CRIU", raising=False)
    monkeypatch.setattr(binary, "DEFAULT_CRIU", tmp_path / "criu")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CriuUnavailable, match="make setup"):
        find_binary()


def test_missing_pycriu_is_criu_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    binary.load_rpc.cache_clear()
    monkeypatch.setitem(sys.modules, "pycriu", None)  # makes `import pycriu` fail
    try:
        with pytest.raises(CriuUnavailable, match=r"pycriu is not importable.*make setup"):
            binary.load_rpc()
    finally:
        binary.load_rpc.cache_clear()


# --- CRIU log excerpts ---

SAMPLE_LOG = """\
(00.000001) Version: 4.2.1 (gitid 0)
(00.041079) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.050001) Dumping task cwd id 0x15 root id 0x16
(00.050002) Dumping file-locks
(00.050003) Dumping opened files (pid: 42)
(00.068747) Error (criu/files-reg.c:1790): Can't lookup mount=24 for fd=0 path=/dev/null
(00.068763) Error (criu/cr-dump.c:1545): Dump files (pid: 42) failed with -1
(00.068800) Unlock network
(00.068801) Unfreezing tasks into 1
(00.068802) \tUnseizing 42 into 1
(00.069174) Error (criu/cr-dump.c:1975): Dumping FAILED.
"""


def test_first_error_skips_benign_lines() -> None:
    assert first_error(SAMPLE_LOG) == "Can't lookup mount=24 for fd=0 path=/dev/null"


def test_first_error_of_a_restored_task_line() -> None:
    line = "(00.123456)      1: Error (criu/files.c:123): Can't open fd 3\n"
    assert first_error(line) == "Can't open fd 3"


def test_first_error_none_without_errors() -> None:
    assert first_error("(00.1) Warn  (criu/x.c:1): not fatal\n(00.2) Looks good.\n") is None


def test_excerpt_has_each_error_with_lines_before_it() -> None:
    excerpt = log_excerpt(SAMPLE_LOG, before=2).splitlines()
    assert excerpt == [
        "...",
        "(00.050002) Dumping file-locks",
        "(00.050003) Dumping opened files (pid: 42)",
        "(00.068747) Error (criu/files-reg.c:1790): Can't lookup mount=24 for fd=0 path=/dev/null",
        "(00.068763) Error (criu/cr-dump.c:1545): Dump files (pid: 42) failed with -1",
        "...",
        "(00.068801) Unfreezing tasks into 1",
        "(00.068802) \tUnseizing 42 into 1",
        "(00.069174) Error (criu/cr-dump.c:1975): Dumping FAILED.",
    ]
    assert not any("RLIMIT_NOFILE" in line for line in excerpt)


def test_excerpt_stops_after_max_errors() -> None:
    excerpt = log_excerpt(SAMPLE_LOG, before=0, max_errors=1)
    assert excerpt.splitlines() == [
        "...",
        "(00.068747) Error (criu/files-reg.c:1790): Can't lookup mount=24 for fd=0 path=/dev/null",
    ]


def test_excerpt_of_a_clean_log_is_empty() -> None:
    assert log_excerpt("(00.1) Dumping finished successfully\n") == ""
