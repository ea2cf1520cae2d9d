"""The pre-freeze dumpability check over a fake /proc, and the reading of CRIU dump logs (root-free).

The fake /proc mirrors the host's layout: /proc/PID/{status,ns/pid,fd/N -> target,fdinfo/N,mountinfo,
task/TID/children,net/*}; tasks sharing a PID namespace share one ns/pid file (hard links, same inode).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpy import dumpable
from vzpy.criu import diagnose
from vzpy.dumpable import CtView, TaskStatus, find_blockers

ME = os.getuid()
INIT = 1000
CT_MOUNTS = (500, 501, 502)
HOST_MOUNT = 24


def status_text(name: str, *, uid: int = ME, ns_pid: tuple[int, ...], pgid: int = 1, sid: int = 1) -> str:
    outer = ns_pid[0]
    pids = "\t".join(map(str, ns_pid))
    return (
        f"Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{outer}\nPid:\t{outer}\n"
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{os.getgid()}\t{os.getgid()}\t{os.getgid()}\t{os.getgid()}\n"
        f"NSpid:\t{pids}\nNSpgid:\t{outer}\t{pgid}\nNSsid:\t{outer}\t{sid}\n"
        "CapEff:\t000001fffeffffff\n"
    )


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ct_pidns = root / "ns-ct"
        self.ct_pidns.write_text("")
        self.host_pidns = root / "ns-host"
        self.host_pidns.write_text("")

    def task(
        self,
        pid: int,
        name: str,
        *,
        parent: int | None = None,
        uid: int = ME,
        inner: int = 2,
        sid: int = 1,
        fds: dict[int, tuple[str, int | None]] | None = None,
        pidns: str = "ct",
    ) -> None:
        base = self.root / str(pid)
        (base / "ns").mkdir(parents=True)
        (base / "fd").mkdir()
        (base / "fdinfo").mkdir()
        (base / "task" / str(pid)).mkdir(parents=True)
        (base / "task" / str(pid) / "children").write_text("")
        ns_pid = (pid, inner) if pidns == "ct" else (pid,)
        (base / "status").write_text(status_text(name, uid=uid, ns_pid=ns_pid, sid=sid))
        os.link(self.ct_pidns if pidns == "ct" else self.host_pidns, base / "ns" / "pid")
        for fd, (target, mnt_id) in (fds or {0: ("/dev/null", CT_MOUNTS[2])}).items():
            os.symlink(target, base / "fd" / str(fd))
            (base / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t{mnt_id}\nino:\t7\n")
        if parent is not None:
            children = self.root / str(parent) / "task" / str(parent) / "children"
            children.write_text(children.read_text() + f"{pid} ")

    def init(self) -> None:
        self.task(INIT, "init", inner=1)
        (self.root / str(INIT) / "mountinfo").write_text(
            "".join(f"{m} 1 0:{m} / /m{m} rw - tmpfs tmpfs rw\n" for m in CT_MOUNTS)
        )
        net = self.root / str(INIT) / "net"
        net.mkdir()
        (net / "unix").write_text(
            "Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00000000 0001 03 7001\n"
        )
        host_net = self.root / "self" / "net"
        host_net.mkdir(parents=True)
        (host_net / "unix").write_text(
            "Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00000000 0001 03 9001 /run/host.sock\n"
        )


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    fake.init()
    return fake


def reasons(proc: FakeProc, cgroup: list[int], *, cap: bool = False) -> list[tuple[int, str]]:
    found = find_blockers(CtView(INIT, proc=proc.root), cgroup, can_dump_other_uids=cap)
    return [(b.pid, b.reason) for b in found]


def test_a_clean_ct_has_no_blockers(proc: FakeProc) -> None:
    proc.task(
        1001, "httpd", parent=INIT, fds={0: ("/dev/null", 502), 3: ("socket:[7001]", None), 4: ("pipe:[5]", None)}
    )
    assert reasons(proc, [INIT, 1001]) == []


def test_a_non_root_task_blocks_only_without_cap_sys_resource(proc: FakeProc) -> None:
    proc.task(1001, "sleep", parent=INIT, uid=ME + 65534, inner=7)
    assert reasons(proc, [INIT, 1001], cap=True) == []
    [blocker] = find_blockers(CtView(INIT, proc=proc.root), [INIT, 1001], can_dump_other_uids=False)
    assert (blocker.pid, blocker.comm, blocker.reason) == (1001, "sleep", "uid")
    assert blocker.message.startswith(f"pid 1001 (sleep, pid 7 in the CT) runs as uid {ME + 65534} ")
    assert "CAP_SYS_RESOURCE" in blocker.message and "\n" not in blocker.message


def test_host_files_and_host_sockets_are_named_with_their_fds(proc: FakeProc) -> None:
    fds = {
        0: ("/dev/null", HOST_MOUNT),
        1: ("/dev/pts/3", HOST_MOUNT + 1),
        2: ("/tmp/ok", 501),
        5: ("socket:[9001]", None),
        6: ("socket:[1234]", None),  # in neither netns list: left to CRIU
    }
    proc.task(1001, "daemon", parent=INIT, fds=fds)
    found = find_blockers(CtView(INIT, proc=proc.root), [INIT, 1001], can_dump_other_uids=True)
    assert [(b.pid, b.reason) for b in found] == [(1001, "host-file"), (1001, "host-socket")]
    assert "fds 0 (/dev/null), 1 (/dev/pts/3) on files outside the CT" in found[0].message
    assert "fd 5 on sockets of the host's network namespace" in found[1].message


def test_a_session_led_from_outside_the_ct(proc: FakeProc) -> None:
    proc.task(1001, "sleep", parent=INIT, sid=0)
    assert reasons(proc, [INIT, 1001]) == [(1001, "session")]


def test_tasks_outside_the_pid_namespace_or_the_cgroup(proc: FakeProc) -> None:
    proc.task(1001, "vzpy", pidns="host", fds={0: ("/dev/pts/3", HOST_MOUNT)})  # in the cgroup only
    proc.task(1002, "sleep", parent=INIT)  # in the tree only (nsenter)
    assert reasons(proc, [INIT, 1001]) == [(1001, "pidns"), (1002, "cgroup")]


def test_a_task_that_exited_meanwhile_is_skipped(proc: FakeProc) -> None:
    assert reasons(proc, [INIT, 4242]) == []


def test_a_zombie_of_the_tree_is_in_no_cgroup_and_no_blocker(proc: FakeProc) -> None:
    """cgroup.procs never lists zombies: a child exited and not reaped yet is dumped like any zombie."""
    proc.task(1001, "forker", parent=INIT)
    status = proc.root / "1001" / "status"
    status.write_text(status.read_text().replace("State:\tS (sleeping)", "State:\tZ (zombie)"))
    proc.task(1002, "sleep", parent=INIT)  # alive and outside: still named
    assert reasons(proc, [INIT]) == [(1002, "cgroup")]


def test_a_task_forked_after_the_cgroup_was_read_is_found_in_it_read_again(proc: FakeProc) -> None:
    proc.task(1001, "forker", parent=INIT)
    view = CtView(INIT, proc=proc.root)
    reads = iter([[INIT], [INIT, 1001]])  # the kernel adds a new task to its cgroup just after the tree
    found = find_blockers(view, [INIT], can_dump_other_uids=True, reread_cgroup=lambda: next(reads))
    assert found == []
    never = find_blockers(view, [INIT], can_dump_other_uids=True, reread_cgroup=lambda: [INIT])
    assert [(b.pid, b.reason) for b in never] == [(1001, "cgroup")]


def test_ct_controlled_names_are_shown_sanitized() -> None:
    text = status_text("evil\x1b[2J\x07", ns_pid=(5, 2))
    assert TaskStatus.parse(text).comm == "evil?[2J?"
    assert dumpable.printable("x" * 100, limit=10) == "xxxxxxx..."


def test_capability_is_read_from_cap_eff(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    for eff, expected in (("000001fffeffffff", False), ("000001ffffffffff", True)):
        (tmp_path / "self" / "status").write_text(f"Name:\tx\nCapInh:\t0\nCapEff:\t{eff}\n")
        assert dumpable.has_capability(dumpable.CAP_SYS_RESOURCE, proc=tmp_path) is expected


def test_socket_tables_of_each_format() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1505 1 0 100\n"
    )
    assert dumpable.socket_inodes(tcp, dumpable.SOCKET_TABLES["tcp"]) == {1505}
    netlink = (
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
        "00000000f7fe9101 0   0          00000000 0        0        0     2        0        4\n"
    )
    assert dumpable.socket_inodes(netlink, dumpable.SOCKET_TABLES["netlink"]) == {4}


# --- CRIU dump logs (lines as CRIU 4.2.1 wrote them on this host)

LOG_HEAD = (
    "(00.031519) net: Dumping netns links\n"
    "(00.058635) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
    "(00.062735) Dumping processes (pid: 2527 comm: init)\n"
    "(00.067214) Dumping task (pid: 2527 comm: init)\n"
    "(00.082010) Dumping task cwd id 0x4 root id 0x5\n"
)
RLIMIT_LOG = LOG_HEAD + (
    "(00.082979) Dumping task (pid: 4415 comm: sleep)\n"
    "(00.087905) dumping /proc/4415/oom_score_adj\n"
    "(00.087912) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted\n"
    "(00.087913) ----------------------------------------\n"
    "(00.087914) Error (criu/cr-dump.c:1584): Dump core (pid: 4415) failed with -1\n"
    "(00.088529) Error (criu/cr-dump.c:1975): Dumping FAILED.\n"
)
GHOST_LOG = LOG_HEAD + (
    "(00.044000) Dumping task (pid: 19616 comm: sleep)\n"
    "(00.044860) Dumping path for 3 fd via self 19 [/tmp/big (deleted)]\n"
    "(00.044861) Dumping ghost file for fd 19 id 0xc\n"
    "(00.044862) Error (criu/files-reg.c:1031): Can't dump ghost file /tmp/big of 2097152 size, increase limit\n"
    "(00.044867) Error (criu/cr-dump.c:1545): Dump files (pid: 19616) failed with -1\n"
)
SESSION_LOG = LOG_HEAD + (
    "(00.106768) Dumping task (pid: 3275 comm: sleep)\n"
    "(00.107060) Error (criu/cr-dump.c:1528): A session leader of 3275(9) is outside of its pid namespace\n"
)
MOUNT_LOG = LOG_HEAD + (
    "(00.050000) Dumping task (pid: 3300 comm: sh)\n"
    "(00.050100) Error (criu/files-reg.c:1794): Can't lookup mount=24 for fd=10 path=/dev/null\n"
)
UNSEIZABLE_LOG = (
    "(00.053135) Dumping processes (pid: 2527 comm: init)\n"
    "(00.053149) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 2968 found, state S, err -1/10\n"
)


@pytest.mark.parametrize(
    ("log", "pid", "comm", "fd", "words"),
    [
        (RLIMIT_LOG, 4415, "sleep", None, "CAP_SYS_RESOURCE"),
        (GHOST_LOG, 19616, "sleep", 3, "deleted file"),
        (SESSION_LOG, 3275, "sleep", None, "session began outside"),
        (MOUNT_LOG, 3300, "sh", 10, "outside the CT"),
        (UNSEIZABLE_LOG, 2968, "", None, "not in its cgroups"),
    ],
)
def test_the_failing_task_is_found_in_the_log(log: str, pid: int, comm: str, fd: int | None, words: str) -> None:
    found = diagnose.find_culprit(log)
    assert found is not None
    message, culprit = found
    assert (culprit.pid, culprit.comm, culprit.fd) == (pid, comm, fd)
    text = diagnose.explain(log, proc=Path("/nonexistent"))
    assert text is not None and text.startswith(message) and words in text and "\n" not in text
    assert f"caused by pid {pid}" in text


def test_an_error_outside_any_task_or_in_a_restore_log_is_not_blamed_on_a_task() -> None:
    between = LOG_HEAD + "(00.09) Error (criu/net.c:1): Can't dump netns\n"
    assert diagnose.find_culprit(between) is None
    restore = "(00.01) Restoring task 7\n(00.02) Error (criu/cr-restore.c:1): Can't restore pid 7\n"
    assert diagnose.explain(restore) is None


def test_the_culprit_is_described_from_the_host_proc(tmp_path: Path) -> None:
    (tmp_path / "4415").mkdir()
    (tmp_path / "4415" / "status").write_text(status_text("sleep", ns_pid=(4415, 11)))
    text = diagnose.explain(RLIMIT_LOG, proc=tmp_path)
    assert text is not None and "caused by pid 4415 (sleep, pid 11 in the CT):" in text
