"""CriuOptions -> criu_req for every action (no CRIU is run; needs pycriu's messages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import require_real
from vzpy.criu.options import (
    CgroupMode,
    CriuAction,
    CriuOptions,
    DirFds,
    NetworkLock,
    build_request,
)
from vzpy.runtime.cgroups import ct_hierarchies

try:
    from pycriu import rpc_pb2 as rpc
except ImportError:
    # Every test here builds a criu_req, which needs pycriu. In CI (VZPY_REQUIRE_REAL=1) a missing pycriu is a
    # broken environment: the import error fails the run instead of skipping. The tests that need no pycriu
    # are in test_criu_binary.py.
    if require_real():
        raise
    pytest.skip("pycriu comes with `make setup`", allow_module_level=True)

DIRS = DirFds(images=7, work=8)


def request(action: CriuAction, dirs: DirFds = DIRS, **options: Any) -> Any:
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
        (CriuAction.DUMP, rpc.DUMP),
        (CriuAction.PRE_DUMP, rpc.SINGLE_PRE_DUMP),
        (CriuAction.RESTORE, rpc.RESTORE),
        (CriuAction.PAGE_SERVER, rpc.PAGE_SERVER_CHLD),
    ],
)
def test_image_actions_pass_dirs_as_fds_and_name_their_log(action: CriuAction, request_type: int) -> None:
    req = request(action, pid=42, page_server=("10.0.0.2", 0))
    assert req.type == request_type
    assert req.opts.images_dir_fd == 7
    assert req.opts.work_dir_fd == 8
    assert req.opts.log_file == f"{action}.log"
    assert req.opts.log_level == 4
    assert not sent(req, "images_dir")  # the fd, never a path


def test_work_dir_fd_only_when_a_work_dir_is_given() -> None:
    req = request(CriuAction.DUMP, DirFds(images=7), pid=42)
    assert not sent(req, "work_dir_fd")


def test_log_file_name_can_be_chosen() -> None:
    assert request(CriuAction.DUMP, pid=42, log_file="dump.3.log").opts.log_file == "dump.3.log"


# --- dump ---


def test_plain_dump_sends_only_what_is_set() -> None:
    req = request(CriuAction.DUMP, pid=42)
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
        CriuAction.DUMP,
        pid=42,
        leave_running=True,
        tcp_established=True,
        network_lock=NetworkLock.NFTABLES,
        freeze_cgroup=Path("/sys/fs/cgroup/freezer/vzpy/101"),
        manage_cgroups=CgroupMode.SOFT,
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
    assert opts.timeout == 20


def test_dump_streams_pages_to_a_page_server_only_when_given() -> None:
    req = request(CriuAction.DUMP, pid=42, page_server=("10.0.0.2", 27000))
    assert (req.opts.ps.address, req.opts.ps.port) == ("10.0.0.2", 27000)
    assert not sent(req, "lazy_pages")


def test_a_dump_given_a_connected_page_server_socket_sends_only_its_fd() -> None:
    req = request(CriuAction.DUMP, pid=42, page_server=("127.0.0.1", 27000), page_server_fd=9)
    assert req.opts.ps.fd == 9
    # CRIU warns that an address given with the socket is ignored
    assert not req.opts.ps.HasField("address") and not req.opts.ps.HasField("port")


def test_only_a_dump_streaming_pages_hands_over_a_page_server_socket() -> None:
    lazy = request(CriuAction.DUMP, pid=42, lazy_pages=True, page_server=("0.0.0.0", 27000), page_server_fd=9)
    listening = request(CriuAction.PAGE_SERVER, page_server=("0.0.0.0", 0), page_server_fd=9)
    restore = request(CriuAction.RESTORE, page_server=("10.0.0.2", 1), page_server_fd=9)
    assert not lazy.opts.ps.HasField("fd") and lazy.opts.ps.port == 27000
    assert not listening.opts.ps.HasField("fd")
    assert not sent(restore, "ps")


def test_lazy_dump_sets_lazy_pages_and_where_to_serve_them() -> None:
    req = request(CriuAction.DUMP, pid=42, lazy_pages=True, page_server=("0.0.0.0", 27000))
    assert req.opts.lazy_pages
    assert req.opts.ps.port == 27000


def test_dump_never_gets_restore_only_fields() -> None:
    req = request(
        CriuAction.DUMP,
        pid=42,
        root=Path("/vz/root/101"),
        rst_sibling=True,
        veths={"eth0": "veth101.0@br0"},
        inherit_fd={"pipe:[1]": 5},
    )
    for name in ("root", "rst_sibling", "orphan_pts_master"):
        assert not sent(req, name), name
    assert not req.opts.veths and not req.opts.inherit_fd


@pytest.mark.parametrize("action", [CriuAction.DUMP, CriuAction.PRE_DUMP])
def test_a_dump_without_a_pid_is_refused(action: CriuAction) -> None:
    # Without a pid CRIU would dump the swrk itself.
    with pytest.raises(ValueError, match="pid"):
        request(action)


# --- pre-dump ---


def test_pre_dump_tracks_memory_against_its_parent() -> None:
    req = request(CriuAction.PRE_DUMP, pid=42, track_mem=True, parent_img="../1")
    assert req.opts.track_mem
    assert req.opts.parent_img == "../1"


def test_pre_dump_leaves_network_and_running_state_alone() -> None:
    req = request(
        CriuAction.PRE_DUMP,
        pid=42,
        leave_running=True,
        tcp_established=True,
        network_lock=NetworkLock.IPTABLES,
        lazy_pages=True,
    )
    for name in ("leave_running", "tcp_established", "network_lock", "lazy_pages"):
        assert not sent(req, name), name


def test_first_pre_dump_has_no_parent() -> None:
    req = request(CriuAction.PRE_DUMP, pid=42, track_mem=True)
    assert not sent(req, "parent_img")


# --- restore ---


def test_restore_of_a_ct() -> None:
    req = request(
        CriuAction.RESTORE,
        root=Path("/vz/root/101"),
        rst_sibling=True,
        veths={"eth0": "veth101.0@br0"},
        inherit_fd={"pipe:[1234]": 5},
        tcp_established=True,
        network_lock=NetworkLock.NFTABLES,
        cgroup_roots={"": "/vzpy/101", "freezer": "/vzpy/101"},
        lazy_pages=True,
    )
    opts = req.opts
    assert opts.root == "/vz/root/101"
    assert opts.rst_sibling and opts.tcp_established and opts.lazy_pages
    assert [(v.if_in, v.if_out) for v in opts.veths] == [("eth0", "veth101.0@br0")]
    assert [(i.key, i.fd) for i in opts.inherit_fd] == [("pipe:[1234]", 5)]
    assert opts.network_lock == rpc.NFTABLES
    roots = [(r.ctrl if r.HasField("ctrl") else None, r.path) for r in opts.cg_root]
    assert roots == [(None, "/vzpy/101"), ("freezer", "/vzpy/101")]


def test_restore_never_gets_dump_only_fields() -> None:
    req = request(
        CriuAction.RESTORE,
        pid=42,
        leave_running=True,
        freeze_cgroup=Path("/sys/fs/cgroup/freezer/x"),
        track_mem=True,
        parent_img="../1",
        page_server=("10.0.0.2", 1),
    )
    for name in ("pid", "leave_running", "freeze_cgroup", "track_mem", "parent_img", "ps"):
        assert not sent(req, name), name


# --- page server, check, feature check, version ---


def test_page_server_listens_where_asked() -> None:
    req = request(CriuAction.PAGE_SERVER, page_server=("0.0.0.0", 0))
    assert (req.opts.ps.address, req.opts.ps.port) == ("0.0.0.0", 0)
    assert not sent(req, "pid")


def test_page_server_needs_an_address() -> None:
    with pytest.raises(ValueError, match="page_server"):
        request(CriuAction.PAGE_SERVER)


def test_check_needs_no_images() -> None:
    req = build_request(CriuAction.CHECK, CriuOptions())
    req.SerializeToString()
    assert req.type == rpc.CHECK
    assert req.opts.images_dir_fd == -1
    assert not sent(req, "log_file")


def test_feature_check_asks_for_every_rpc_feature() -> None:
    req = build_request(CriuAction.FEATURE_CHECK, CriuOptions())
    assert req.type == rpc.FEATURE_CHECK
    assert (req.features.mem_track, req.features.lazy_pages, req.features.pidfd_store) == (True, True, True)
    assert not req.HasField("opts")


def test_feature_check_refuses_unknown_features() -> None:
    with pytest.raises(ValueError, match="knows only"):
        build_request(CriuAction.FEATURE_CHECK, CriuOptions(features=("mem_dirty_track",)))


def test_version_request_is_bare() -> None:
    req = build_request(CriuAction.VERSION, CriuOptions())
    assert req.type == rpc.VERSION
    assert not req.HasField("opts")


# --- which cgroup hierarchies a dump records


def test_dumps_name_the_hierarchies_to_record_and_restores_never_do() -> None:
    wanted = ["freezer", "cpu,cpuacct"]
    for action in (CriuAction.DUMP, CriuAction.PRE_DUMP):
        assert list(request(action, pid=42, dump_cgroup_hierarchies=wanted).opts.cgroup_dump_controller) == wanted
    assert list(request(CriuAction.DUMP, pid=42).opts.cgroup_dump_controller) == []  # none given: CRIU dumps all
    assert list(request(CriuAction.RESTORE, dump_cgroup_hierarchies=wanted).opts.cgroup_dump_controller) == []


def test_ct_hierarchies_are_those_holding_a_ct_controller_as_proc_names_them() -> None:
    v1 = "12:name=systemd:/\n11:blkio:/\n10:cpu,cpuacct:/user.slice\n9:freezer:/\n8:memory:/\n7:pids:/\n"
    v1 += "6:devices:/\n5:cpuset:/\n4:net_cls,net_prio:/\n0::/\n"
    assert ct_hierarchies(v1) == ["cpu,cpuacct", "freezer", "memory", "pids", "devices"]
    assert ct_hierarchies("0::/user.slice/session-1.scope\n") == []  # cgroup v2 only: CRIU's default (all)
