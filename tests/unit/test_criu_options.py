"""CriuOptions -> criu_req, the criu version policy, and CRIU log excerpts (no CRIU is run)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from vzpy.criu import binary
from vzpy.criu.binary import CriuVersion, find_binary, parse_kernel_release, parse_version, version_problem
from vzpy.criu.options import (
    Action,
    CgroupMode,
    CriuOptions,
    DirFds,
    NetworkLock,
    build_request,
    open_dirs,
)
from vzpy.criu.rpc import first_error, log_excerpt
from vzpy.errors import CriuUnavailable

rpc = pytest.importorskip("pycriu.rpc_pb2", reason="pycriu comes with `make setup`")

DIRS = DirFds(images=7, work=8)


def request(action: Action, dirs: DirFds = DIRS, **options: Any) -> Any:
    opts = CriuOptions(images_dir=Path("/images"), **options)
    req = build_request(action, opts, dirs)
    req.SerializeToString()  # every required proto2 field is set
    return req


def sent(req: Any, name: str) -> bool:
    return req.opts.HasField(name)


# --- request types and the fields every image action gets ---


@pytest.mark.parametrize(
    ("action", "request_type"),
    [
        (Action.DUMP, rpc.DUMP),
        (Action.PRE_DUMP, rpc.SINGLE_PRE_DUMP),
        (Action.RESTORE, rpc.RESTORE),
        (Action.PAGE_SERVER, rpc.PAGE_SERVER_CHLD),
    ],
)
def test_image_actions_pass_dirs_as_fds_and_name_their_log(action: Action, request_type: int) -> None:
    req = request(action, pid=42, page_server=("10.0.0.2", 0))
    assert req.type == request_type
    assert req.opts.images_dir_fd == 7
    assert req.opts.work_dir_fd == 8
    assert req.opts.log_file == f"{action}.log"
    assert req.opts.log_level == 4
    assert not sent(req, "images_dir")  # the fd, never a path


def test_work_dir_fd_only_when_a_work_dir_is_given() -> None:
    req = request(Action.DUMP, DirFds(images=7), pid=42)
    assert not sent(req, "work_dir_fd")


def test_log_file_name_can_be_chosen() -> None:
    assert request(Action.DUMP, pid=42, log_file="dump.3.log").opts.log_file == "dump.3.log"


# --- dump ---


def test_plain_dump_sends_only_what_is_set() -> None:
    req = request(Action.DUMP, pid=42)
    assert req.opts.pid == 42
    for name in (
        "leave_running",
        "tcp_established",
        "freeze_cgroup",
        "network_lock",
        "track_mem",
        "parent_img",
        "ps",
        "lazy_pages",
        "manage_cgroups_mode",
        "ghost_limit",
        "timeout",
        "notify_scripts",
        "shell_job",
        "ext_unix_sk",
        "file_locks",
        "root",
        "rst_sibling",
        "orphan_pts_master",
    ):
        assert not sent(req, name), name
    assert not req.opts.veths
    assert not req.opts.inherit_fd
    assert not req.opts.external


def test_dump_of_a_ct() -> None:
    req = request(
        Action.DUMP,
        pid=42,
        leave_running=True,
        tcp_established=True,
        network_lock=NetworkLock.NFTABLES,
        freeze_cgroup=Path("/sys/fs/cgroup/freezer/vzpy/101"),
        manage_cgroups=CgroupMode.SOFT,
        external=["mnt[/data]:data"],
        ghost_limit=4 << 20,
        timeout=20,
        notify_scripts=True,
        file_locks=True,
        link_remap=True,
    )
    opts = req.opts
    assert opts.leave_running and opts.tcp_established and opts.notify_scripts and opts.file_locks
    assert opts.link_remap
    assert opts.network_lock == rpc.NFTABLES
    assert opts.freeze_cgroup == "/sys/fs/cgroup/freezer/vzpy/101"
    assert opts.manage_cgroups_mode == rpc.SOFT
    assert list(opts.external) == ["mnt[/data]:data"]
    assert opts.ghost_limit == 4 << 20
    assert opts.timeout == 20


def test_dump_streams_pages_to_a_page_server_only_when_given() -> None:
    req = request(Action.DUMP, pid=42, page_server=("10.0.0.2", 27000))
    assert (req.opts.ps.address, req.opts.ps.port) == ("10.0.0.2", 27000)
    assert not sent(req, "lazy_pages")


def test_lazy_dump_sets_lazy_pages_and_where_to_serve_them() -> None:
    req = request(Action.DUMP, pid=42, lazy_pages=True, page_server=("0.0.0.0", 27000))
    assert req.opts.lazy_pages
    assert req.opts.ps.port == 27000


def test_dump_never_gets_restore_only_fields() -> None:
    req = request(
        Action.DUMP,
        pid=42,
        root=Path("/vz/root/101"),
        rst_sibling=True,
        orphan_pts_master=True,
        veths={"eth0": "veth101.0@br0"},
        inherit_fd={"pipe:[1]": 5},
    )
    for name in ("root", "rst_sibling", "orphan_pts_master"):
        assert not sent(req, name), name
    assert not req.opts.veths and not req.opts.inherit_fd


@pytest.mark.parametrize("action", [Action.DUMP, Action.PRE_DUMP])
def test_a_dump_without_a_pid_is_refused(action: Action) -> None:
    # Without a pid CRIU would dump the swrk itself.
    with pytest.raises(ValueError, match="pid"):
        request(action)


# --- pre-dump ---


def test_pre_dump_tracks_memory_against_its_parent() -> None:
    req = request(Action.PRE_DUMP, pid=42, track_mem=True, parent_img="../1")
    assert req.opts.track_mem
    assert req.opts.parent_img == "../1"


def test_pre_dump_leaves_network_and_running_state_alone() -> None:
    req = request(
        Action.PRE_DUMP,
        pid=42,
        leave_running=True,
        tcp_established=True,
        network_lock=NetworkLock.IPTABLES,
        lazy_pages=True,
        ghost_limit=1,
    )
    for name in ("leave_running", "tcp_established", "network_lock", "lazy_pages", "ghost_limit"):
        assert not sent(req, name), name


def test_first_pre_dump_has_no_parent() -> None:
    req = request(Action.PRE_DUMP, pid=42, track_mem=True)
    assert not sent(req, "parent_img")


# --- restore ---


def test_restore_of_a_ct() -> None:
    req = request(
        Action.RESTORE,
        root=Path("/vz/root/101"),
        rst_sibling=True,
        orphan_pts_master=True,
        veths={"eth0": "veth101.0@br0"},
        inherit_fd={"pipe:[1234]": 5},
        tcp_established=True,
        network_lock=NetworkLock.NFTABLES,
        cgroup_roots={"": "/vzpy/101", "freezer": "/vzpy/101"},
        lazy_pages=True,
    )
    opts = req.opts
    assert opts.root == "/vz/root/101"
    assert opts.rst_sibling and opts.orphan_pts_master and opts.tcp_established and opts.lazy_pages
    assert [(v.if_in, v.if_out) for v in opts.veths] == [("eth0", "veth101.0@br0")]
    assert [(i.key, i.fd) for i in opts.inherit_fd] == [("pipe:[1234]", 5)]
    assert opts.network_lock == rpc.NFTABLES
    roots = [(r.ctrl if r.HasField("ctrl") else None, r.path) for r in opts.cg_root]
    assert roots == [(None, "/vzpy/101"), ("freezer", "/vzpy/101")]


def test_restore_never_gets_dump_only_fields() -> None:
    req = request(
        Action.RESTORE,
        pid=42,
        leave_running=True,
        freeze_cgroup=Path("/sys/fs/cgroup/freezer/x"),
        track_mem=True,
        parent_img="../1",
        page_server=("10.0.0.2", 1),
        ghost_limit=1,
    )
    for name in ("pid", "leave_running", "freeze_cgroup", "track_mem", "parent_img", "ps", "ghost_limit"):
        assert not sent(req, name), name


# --- page server, check, feature check, version ---


def test_page_server_listens_where_asked() -> None:
    req = request(Action.PAGE_SERVER, page_server=("0.0.0.0", 0))
    assert (req.opts.ps.address, req.opts.ps.port) == ("0.0.0.0", 0)
    assert not sent(req, "pid")


def test_page_server_needs_an_address() -> None:
    with pytest.raises(ValueError, match="page_server"):
        request(Action.PAGE_SERVER)


def test_check_needs_no_images() -> None:
    req = build_request(Action.CHECK, CriuOptions())
    req.SerializeToString()
    assert req.type == rpc.CHECK
    assert req.opts.images_dir_fd == -1
    assert not sent(req, "log_file")


def test_feature_check_asks_for_every_rpc_feature() -> None:
    req = build_request(Action.FEATURE_CHECK, CriuOptions())
    assert req.type == rpc.FEATURE_CHECK
    assert (req.features.mem_track, req.features.lazy_pages, req.features.pidfd_store) == (True, True, True)
    assert not req.HasField("opts")


def test_feature_check_refuses_unknown_features() -> None:
    with pytest.raises(ValueError, match="knows only"):
        build_request(Action.FEATURE_CHECK, CriuOptions(features=("mem_dirty_track",)))


def test_version_request_is_bare() -> None:
    req = build_request(Action.VERSION, CriuOptions())
    assert req.type == rpc.VERSION
    assert not req.HasField("opts")


# --- validation, dirs and log path ---


def test_image_actions_need_an_images_dir() -> None:
    with pytest.raises(ValueError, match="images_dir"):
        build_request(Action.RESTORE, CriuOptions())


def test_log_file_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError, match="plain name"):
        request(Action.DUMP, pid=1, log_file="../dump.log")


def test_log_path_is_absolute_in_work_dir_else_images_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert CriuOptions(images_dir=Path("img")).log_path(Action.DUMP) == tmp_path / "img" / "dump.log"
    opts = CriuOptions(images_dir=Path("img"), work_dir=tmp_path / "work", log_file="x.log")
    assert opts.log_path(Action.RESTORE) == tmp_path / "work" / "x.log"
    assert CriuOptions().log_path(Action.CHECK) is None


def test_open_dirs_keeps_fds_open_only_inside(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    opts = CriuOptions(images_dir=tmp_path, work_dir=tmp_path / "work")
    with open_dirs(Action.DUMP, opts) as dirs:
        assert dirs.images is not None and dirs.work is not None
        assert os.readlink(f"/proc/self/fd/{dirs.images}") == str(tmp_path)
        assert os.readlink(f"/proc/self/fd/{dirs.work}") == str(tmp_path / "work")
    with pytest.raises(OSError):
        os.fstat(dirs.images)


def test_open_dirs_of_a_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), open_dirs(Action.DUMP, CriuOptions(images_dir=tmp_path / "no")):
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
