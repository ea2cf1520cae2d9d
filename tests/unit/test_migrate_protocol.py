"""Migration transport without a network: protocol framing and version negotiation, the agent's ops on a
temp vz tree over a socketpair, preflight decisions, target parsing, and rsync/ssh argv building."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from helpers import write_vz_conf
from vzpy.config import GlobalConfig
from vzpy.lock import ct_lock
from vzpy.migrate import (
    ApplyConfigFailed,
    ConnectionBroken,
    ConnectionTimeout,
    CopyFailed,
    CtExistsRemote,
    DestinationNotReady,
    IncompatibleVersion,
    IpInUseRemote,
    MigrateUsage,
    MigrationLocked,
    NoDiskSpaceRemote,
    ProtocolError,
    RestoreFailed,
    UnsupportedCpu,
    destination,
    error_for_code,
    ops,
)
from vzpy.migrate.agent import handle, serve
from vzpy.migrate.preflight import (
    CHECKS,
    DISK_MARGIN,
    SourceFacts,
    check,
    dump_estimate,
    old_area_in_way,
    parse_cpu_flags,
    parse_nodeps,
    raise_blocking,
    relevant_cpu_flags,
)
from vzpy.migrate.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Client,
    Connection,
    FdStream,
    check_compatible,
    decode,
    encode,
    negotiated,
)
from vzpy.migrate.remote import RemoteAgent
from vzpy.migrate.rsync import BASE_OPTIONS, parse_progress, parse_rsync_opts, rsync_argv
from vzpy.migrate.session import AgentSession, Incoming
from vzpy.migrate.ssh import OpenSsh, Target, fingerprint, parse_target

# --- framing -----------------------------------------------------------------------------------------------


def pair() -> tuple[Connection, Connection, socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return Connection(FdStream(a.fileno(), a.fileno())), Connection(FdStream(b.fileno(), b.fileno())), a, b


def test_encode_is_one_ascii_line_and_round_trips() -> None:
    message = {"op": "prepare", "conf_text": 'A="1"\nB="é"\n', "n": [1, 2]}
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")
    assert decode(line[:-1]) == message


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe"])
def test_decode_refuses_anything_but_an_object(garbage: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(garbage)
    assert info.value.exit_code == 26


def test_connection_splits_lines_across_reads_and_reports_eof() -> None:
    left, _, a, b = pair()
    with a, b:
        data = encode({"x": 1}) + encode({"y": "z" * 100_000})
        b.sendall(data[:7])
        b.sendall(data[7:])
        b.shutdown(socket.SHUT_WR)
        assert left.receive(5) == {"x": 1}
        assert left.receive(5) == {"y": "z" * 100_000}
        assert left.receive(5) is None


def test_connection_timeout_and_half_message_at_eof() -> None:
    left, _, a, b = pair()
    with a, b:
        with pytest.raises(ConnectionTimeout) as info:
            left.receive(0.05)
        assert info.value.exit_code == 22
        b.sendall(b'{"half": ')
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionBroken) as broken:
            left.receive(5)
        assert broken.value.exit_code == 21


def test_connection_refuses_endless_lines() -> None:
    left, _, a, b = pair()
    with a, b:

        def send() -> None:
            with contextlib.suppress(OSError):
                b.sendall(b"x" * (MAX_LINE + 2 * 65536))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        with pytest.raises(ProtocolError, match="exceeds"):
            left.receive(5)
        a.shutdown(socket.SHUT_RDWR)
        sender.join(5)


# --- version negotiation --------------------------------------------------------------------------------------


def test_versions_same_major_are_compatible_and_the_lower_minor_wins() -> None:
    check_compatible((PROTOCOL_VERSION[0], 7), peer="x")
    assert negotiated((1, 3), (1, 5)) == (1, 3)
    assert negotiated((1, 9), (1, 5)) == (1, 5)


def test_a_different_major_is_refused_with_exit_17() -> None:
    with pytest.raises(IncompatibleVersion, match=r"protocol 2\.0.*same vzpy version") as info:
        check_compatible((2, 0), peer="vzpy on b")
    assert info.value.exit_code == 17


def test_error_replies_come_back_as_their_exit_codes_class() -> None:
    assert isinstance(error_for_code(9, "exists"), CtExistsRemote)
    unknown = error_for_code(99, "odd")
    assert unknown.exit_code == 99 and unknown.message == "odd"


# --- the agent over a socketpair ---------------------------------------------------------------------------


@pytest.fixture
def vz(tmp_path: Path) -> GlobalConfig:
    return GlobalConfig.load(write_vz_conf(tmp_path / "vz.conf", tmp_path))


class Served:
    """An Agent serving one end of a socketpair in a thread; the test holds the client end."""

    def __init__(self, gconf: GlobalConfig) -> None:
        self.agent = AgentSession(lambda: gconf)
        ours, theirs = socket.socketpair()
        self.sock, self.theirs = ours, theirs
        self.client = Client(Connection(FdStream(ours.fileno(), ours.fileno()), peer="agent"), timeout=10)
        self.result: list[int] = []
        connection = Connection(FdStream(theirs.fileno(), theirs.fileno()), peer="source")
        self.thread = threading.Thread(target=lambda: self.result.append(serve(self.agent, connection)), daemon=True)
        self.thread.start()

    def hang_up(self) -> int:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.sock.close()
        self.theirs.close()
        return self.result[0]


@pytest.fixture
def served(vz: GlobalConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    facts = {"hostname": "dst", "criu": {"ok": True}, "cpu": {"flags": []}, "disk": {}, "config": {}}
    monkeypatch.setattr(ops, "host_facts", lambda gconf: facts)
    s = Served(vz)
    yield s
    if s.thread.is_alive():
        s.hang_up()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lck")}


def test_hello_must_come_first_and_unknown_ops_are_protocol_errors(served: Served) -> None:
    with pytest.raises(ProtocolError, match="before hello"):
        served.client.call("ct_exists", ctid="101")
    served.client._broken = None  # an error reply does not break the connection; reset for the next call
    served.client.hello()
    assert served.client.version == PROTOCOL_VERSION
    with pytest.raises(ProtocolError, match="unknown op 'frobnicate'"):
        served.client.call("frobnicate")


def test_agent_refuses_another_major_version(served: Served) -> None:
    with pytest.raises(IncompatibleVersion) as info:
        served.client.call("hello", proto=[PROTOCOL_VERSION[0] + 1, 0], vzpy="9.9")
    assert info.value.exit_code == 17


def test_prepare_commit_and_idempotence(served: Served, vz: GlobalConfig) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    conf_text = '# CT 101\nHOSTNAME="web"\nVE_PRIVATE="/elsewhere/101"\nIP_ADDRESS="10.0.0.5"\n'
    paths = remote.prepare("101", conf_text, token="t1")
    assert remote.prepare("101", conf_text, token="t1") == paths  # a retried request
    with pytest.raises(MigrationLocked):
        remote.prepare("101", conf_text, token="other")
    workdir = Path(paths["workdir"])
    assert (workdir.stat().st_mode & 0o777, Path(paths["images_dir"]).is_dir()) == (0o700, True)
    staged = (vz.confdir / "101.conf.migrating").read_text()
    assert f'VE_PRIVATE="{vz.ve_private("101")}"' in staged and 'HOSTNAME="web"' in staged
    assert remote.ct_exists("101")["migrating"] is True
    (Path(paths["private"]) / "etc").mkdir()
    result = remote.start("101", start=False, timeout=10)  # offline, stopped: commit only
    assert result["conf"] == str(vz.confdir / "101.conf")
    assert (vz.confdir / "101.conf").exists() and not workdir.exists()
    assert not (vz.confdir / "101.conf.migrating").exists()
    assert remote.ct_exists("101")["exists"] is True
    with pytest.raises(CopyFailed, match="committed"):
        remote.cleanup("101")
    with pytest.raises(CtExistsRemote) as info:
        remote.prepare("101", conf_text, token="t2")
    assert info.value.exit_code == 9


def test_cleanup_removes_exactly_what_prepare_made(served: Served, vz: GlobalConfig) -> None:
    base = vz.path.parent
    (base / "private").mkdir()
    (base / "private" / "other").mkdir()
    before = tree(base)
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    paths = remote.prepare("102", 'HOSTNAME="x"\n', token="t")
    (Path(paths["private"]) / "file").write_text("synced")
    removed = remote.cleanup("102")
    assert set(removed) >= {paths["private"], paths["workdir"], str(vz.confdir / "102.conf.migrating")}
    assert tree(base) - {"conf", "dump", "lock"} == before
    assert remote.cleanup("102") == []  # idempotent


def test_keep_dst_keeps_the_private_area_for_the_next_attempt(served: Served, vz: GlobalConfig) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    paths = remote.prepare("103", 'HOSTNAME="x"\n', token="t", keep_dst=True)
    (Path(paths["private"]) / "big").write_text("synced")
    remote.cleanup("103")
    assert (Path(paths["private"]) / "big").exists() and not Path(paths["images_dir"]).exists()
    exists = remote.ct_exists("103")
    assert exists["kept"] is True and exists["private_exists"] is True
    again = remote.prepare("103", 'HOSTNAME="x"\n', token="t2")  # adopts the kept area
    assert (Path(again["private"]) / "big").exists()
    remote.cleanup("103", keep_dst=False)
    assert not Path(paths["private"]).exists() and not Path(paths["workdir"]).exists()


def test_prepare_refuses_a_foreign_private_area_and_a_bad_config(served: Served, vz: GlobalConfig) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    private = vz.ve_private("104")
    private.mkdir(parents=True)
    (private / "data").write_text("not ours")
    with pytest.raises(CtExistsRemote, match="private area"):
        remote.prepare("104", 'HOSTNAME="x"\n', token="t")
    assert (private / "data").exists()
    with pytest.raises(ApplyConfigFailed) as info:
        remote.prepare("105", 'HOSTNAME="not a hostname!"\n', token="t")
    assert info.value.exit_code == 15
    assert not (vz.confdir / "105.conf.migrating").exists()


def test_a_ct_locked_here_cannot_be_prepared(served: Served, vz: GlobalConfig) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    with ct_lock(vz.lockdir, "109", "start"):
        assert remote.ct_exists("109")["locked"] == f"locked by vzpy pid {os.getpid()} (start)"
        with pytest.raises(MigrationLocked, match=r"locked on .* by vzpy pid \d+ \(start\)") as info:
            remote.prepare("109", "", token="t")
        assert info.value.exit_code == 20
    remote.prepare("109", "", token="t")
    remote.cleanup("109")


def test_ct_exists_reports_ips_used_by_other_cts(served: Served, vz: GlobalConfig) -> None:
    vz.confdir.mkdir(parents=True)
    (vz.confdir / "200.conf").write_text('IP_ADDRESS="10.0.0.5 10.0.0.6"\n')
    served.client.hello()
    exists = RemoteAgent(served.client, {}).ct_exists("101", ["10.0.0.6", "10.0.0.9"])
    assert exists["ips_in_use"] == {"10.0.0.6": "200"} and exists["exists"] is False


def test_restore_without_images_fails_with_the_restore_exit_code(served: Served) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    remote.prepare("106", 'HOSTNAME="x"\n', token="t")
    with pytest.raises(RestoreFailed, match="criu restore") as info:
        remote.restore("106", None, timeout=30)
    assert info.value.exit_code == 7
    with pytest.raises(CopyFailed, match="prepare it first"):
        served.client.call("page_server_start", ctid="999")


def test_hanging_up_before_commit_rolls_back(served: Served, vz: GlobalConfig) -> None:
    served.client.hello()
    paths = RemoteAgent(served.client, {}).prepare("107", 'HOSTNAME="x"\n', token="t")
    assert served.hang_up() == 21
    assert not Path(paths["private"]).exists() and not Path(paths["workdir"]).exists()
    assert not (vz.confdir / "107.conf.migrating").exists()
    lock = vz.lockdir / "107.lck"
    assert lock.read_text() == ""  # released


def test_a_new_agent_takes_over_what_a_dead_one_left(vz: GlobalConfig) -> None:
    dead = AgentSession(lambda: vz)
    dead.version = PROTOCOL_VERSION
    reply = handle(dead, {"v": 1, "id": 1, "op": "prepare", "ctid": "108", "conf_text": "", "token": "t"})
    assert reply["ok"], reply
    dead.unlock("108")  # as if the process died: the kernel drops its flock, its files stay
    fresh = AgentSession(lambda: vz)
    fresh.version = PROTOCOL_VERSION
    assert handle(fresh, {"v": 1, "id": 1, "op": "ct_exists", "ctid": "108"})["migrating"] is True
    cleaned = handle(fresh, {"v": 1, "id": 2, "op": "cleanup", "ctid": "108"})
    assert cleaned["ok"] and reply["private"] in cleaned["removed"]
    assert not Path(reply["workdir"]).exists()


def dead_agent_left(vz: GlobalConfig, ctid: str, *, restored: bool, commit: bool = False) -> Incoming:
    """What an agent killed (SIGKILL: no rollback) after prepare (and a restore, and maybe the commit) left."""
    dead = AgentSession(lambda: vz)
    dead.version = PROTOCOL_VERSION
    assert handle(dead, {"v": 1, "id": 1, "op": "prepare", "ctid": ctid, "conf_text": "", "token": "t"})["ok"]
    incoming = dead.incoming[ctid]
    incoming.restored = restored
    incoming.save()
    if commit:
        dead.commit(incoming)
    dead.unlock(ctid)
    return incoming


def test_recovery_of_a_dead_agents_uncommitted_restore_kills_the_restored_ct(
    vz: GlobalConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = dead_agent_left(vz, "110", restored=True)
    killed: list[str] = []
    monkeypatch.setattr(destination.lifecycle, "kill", lambda ct: killed.append(ct.ctid))
    fresh = AgentSession(lambda: vz)
    fresh.version = PROTOCOL_VERSION
    state = handle(fresh, {"v": 1, "id": 1, "op": "recover_state", "ctid": "110", "wait": 1})
    assert state["ok"] and state["state"] == "prepared"
    cleaned = handle(fresh, {"v": 1, "id": 2, "op": "cleanup", "ctid": "110"})
    assert cleaned["ok"], cleaned
    assert killed == ["110"] and not Path(left.workdir).exists() and not left.staged_conf.exists()


def test_recovery_of_a_dead_agents_commit_finishes_it(vz: GlobalConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    left = dead_agent_left(vz, "111", restored=True, commit=True)
    fresh = AgentSession(lambda: vz)
    fresh.version = PROTOCOL_VERSION
    state = handle(fresh, {"v": 1, "id": 1, "op": "recover_state", "ctid": "111", "wait": 1})
    assert state["ok"] and state["state"] == "committed" and state["stage"] == "stopped"
    refused = handle(fresh, {"v": 1, "id": 2, "op": "cleanup", "ctid": "111"})
    assert not refused["ok"] and "committed" in refused["error"]
    done = handle(fresh, {"v": 1, "id": 3, "op": "recover_commit", "ctid": "111", "start": False})
    assert done["ok"] and done["woken"] is False, done
    assert Path(left.conf).exists() and not Path(left.workdir).exists()


def test_recover_state_waits_for_a_busy_agent_then_says_so(vz: GlobalConfig) -> None:
    busy = AgentSession(lambda: vz)
    busy.lock("112")
    fresh = AgentSession(lambda: vz)
    fresh.version = PROTOCOL_VERSION
    reply = handle(fresh, {"v": 1, "id": 1, "op": "recover_state", "ctid": "112", "wait": 0.2})
    assert not reply["ok"] and reply["exit_code"] == 20 and "incoming-migration" in reply["error"]
    busy.unlock("112")
    assert handle(fresh, {"v": 1, "id": 2, "op": "recover_state", "ctid": "112", "wait": 1})["state"] == "none"


def test_a_resume_that_cannot_wake_the_ct_is_undone(
    served: Served, vz: GlobalConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    remote.prepare("113", 'HOSTNAME="x"\n', token="t")

    def broken_wake(ct: object) -> float:
        raise OSError("freezer gone")

    monkeypatch.setattr(destination.checkpoint, "wake", broken_wake)
    monkeypatch.setattr(destination.lifecycle, "kill", lambda ct: None)
    with pytest.raises(RestoreFailed, match="could not be resumed"):
        remote.resume("113", timeout=10)
    assert remote.ct_exists("113")["exists"] is False  # what the source asks before it rolls back
    assert (vz.confdir / "113.conf.migrating").exists()
    remote.cleanup("113")
    assert not (vz.confdir / "113.conf.migrating").exists()


def test_fault_injection_kills_the_agent_before_its_reply(vz: GlobalConfig) -> None:
    env = {**os.environ, "VZPY_CONF": str(vz.path)}
    requests = [
        {"v": 1, "id": 1, "op": "hello", "proto": list(PROTOCOL_VERSION), "fault": "agent:after:ping"},
        {"v": 1, "id": 2, "op": "ping"},
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "vzpy.migrate.agent"],
        input=b"".join(encode(r) for r in requests),
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == -9, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == [1]  # ping's reply never left


def test_agent_module_runs_as_a_process(vz: GlobalConfig) -> None:
    env = {**os.environ, "VZPY_CONF": str(vz.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "vzpy.migrate.agent"],
        input=encode({"v": 1, "id": 1, "op": "bye"}),
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"id": 1, "ok": True}


# --- preflight -------------------------------------------------------------------------------------------


def hello(**over: object) -> dict:
    base = {
        "proto": list(PROTOCOL_VERSION),
        "hostname": "dst",
        "criu": {"ok": True},
        "cpu": {"machine": "x86_64", "flags": ["sse2", "avx2", "aes", "hypervisor"]},
        "disk": {"private": {"path": "/vz/private", "free": 10 << 30, "dev": 1}, "dump": {"free": 10 << 30, "dev": 1}},
    }
    return {**base, **over}


SOURCE = SourceFacts(ctid="101", private_bytes=1 << 30, memory_bytes=256 << 20, cpu_flags=frozenset({"sse2", "avx2"}))


def names(problems: list) -> list[str]:
    return [p.check for p in problems]


def test_preflight_passes_a_good_destination() -> None:
    assert check(hello(), {"exists": False}, SOURCE) == []


def test_preflight_finds_each_problem_with_its_exit_code() -> None:
    bad = hello(
        proto=[2, 0],
        criu={"ok": False, "error": "criu check fails"},
        cpu={"machine": "x86_64", "flags": ["sse2"]},
        disk={"private": {"path": "/vz/private", "free": 100 << 20, "dev": 1}, "dump": {"free": 100 << 20, "dev": 1}},
    )
    problems = check(bad, {"exists": True, "conf": "/etc/vz/conf/101.conf", "ips_in_use": {"10.0.0.5": "7"}}, SOURCE)
    assert names(problems) == ["version", "criu", "ctid", "disk_space", "cpu", "ip"]
    assert [p.as_error().exit_code for p in problems] == [17, 14, 9, 31, 18, 12]
    assert "lacks avx2" in problems[4].message and "hypervisor" not in problems[4].message
    with pytest.raises(IncompatibleVersion) as info:
        raise_blocking(problems)
    assert "also:" in info.value.detail


def test_an_old_area_in_the_way_of_r_no_is_found_before_anything_is_copied(tmp_path: Path) -> None:
    """With -r no the area is renamed PRIVATE.migrated after the commit: a name already taken would only fail
    then, with the CT moved and its area left under its own name."""
    private = tmp_path / "101"
    private.mkdir()
    assert old_area_in_way(private) == ""
    (tmp_path / "101.migrated").symlink_to(tmp_path / "nowhere")  # dangling: still in the way
    assert old_area_in_way(private) == str(tmp_path / "101.migrated")
    kept = SourceFacts(
        ctid="101", private_bytes=1, cpu_flags=SOURCE.cpu_flags, old_area_in_way="/vz/private/101.migrated"
    )
    [problem] = check(hello(), {}, kept)
    assert (problem.check, problem.as_error().exit_code) == ("old_area", 6)
    assert "/vz/private/101.migrated exists" in problem.message and "-r yes" in problem.message
    assert check(hello(), {}, kept, skip=parse_nodeps("old_area"))[0].skipped


def test_the_nodeps_help_names_every_check() -> None:
    from vzpy.cli.migrate import migrate

    [nodeps] = [param for param in migrate.params if "--nodeps" in param.opts]
    assert isinstance(nodeps, click.Option) and nodeps.help is not None
    assert [name for name in CHECKS if name not in nodeps.help] == []


def test_nodeps_skips_by_name() -> None:
    problems = check(hello(cpu={"machine": "x86_64", "flags": []}), {}, SOURCE, skip=parse_nodeps("cpu"))
    assert [(p.check, p.skipped) for p in problems] == [("cpu", True)]
    raise_blocking(problems)  # nothing left to stop the migration
    assert parse_nodeps("") == parse_nodeps("all") == frozenset(CHECKS)
    assert parse_nodeps(None) == frozenset()
    with pytest.raises(MigrateUsage, match="unknown --nodeps check ipv6") as info:
        parse_nodeps("cpu,ipv6")
    assert info.value.exit_code == 1


def test_disk_space_counts_private_and_dump_on_one_or_two_filesystems() -> None:
    need_private = SOURCE.private_bytes + DISK_MARGIN
    need_dump = dump_estimate(SOURCE.memory_bytes) + DISK_MARGIN
    shared = {"private": {"free": need_private + 1, "dev": 1}, "dump": {"free": need_private + 1, "dev": 1}}
    assert names(check(hello(disk=shared), {}, SOURCE)) == ["disk_space"]  # the dump does not fit too
    split = {"private": {"free": need_private + 1, "dev": 1}, "dump": {"free": need_dump + 1, "dev": 2}}
    assert check(hello(disk=split), {}, SOURCE) == []
    offline = SourceFacts(ctid="101", private_bytes=SOURCE.private_bytes, online=False)
    assert check(hello(disk=shared, criu={"ok": False}), {}, offline) == []  # no dump, no CRIU needed
    problem = check(hello(disk={"private": {"path": "/vz/private", "free": 5, "dev": 1}}), {}, SOURCE)[0]
    assert isinstance(problem.as_error(), NoDiskSpaceRemote) and "/vz/private has 5 B free" in problem.message


def test_what_would_fail_after_the_freeze_is_found_by_preflight() -> None:
    """A destination without the cgroup hierarchies, and tasks CRIU cannot dump, stop the migration
    before anything is copied or frozen."""
    no_cgroups = hello(cgroups=["freezer", "cpu"])
    blocked = SourceFacts(
        ctid="101",
        private_bytes=1,
        cpu_flags=SOURCE.cpu_flags,
        dump_blockers=("pid 7 (daemon) runs as uid 1000 and CRIU lacks CAP_SYS_RESOURCE: ...",),
    )
    problems = check(no_cgroups, {}, blocked)
    assert names(problems) == ["cgroups", "dumpable"]
    assert [p.as_error().exit_code for p in problems] == [14, 8]
    assert "memory, pids" in problems[0].message and "pid 7 (daemon)" in problems[1].message
    assert check(hello(cgroups=["freezer", "memory", "cpu", "pids", "devices"]), {}, SOURCE) == []
    assert check(hello(), {}, SOURCE) == []  # an agent that does not report its cgroups (protocol 1.0)


def test_ctid_check_tells_kept_areas_from_foreign_ones() -> None:
    assert check(hello(), {"private_exists": True, "kept": True}, SOURCE) == []
    foreign = check(hello(), {"private_exists": True, "private": "/vz/private/101"}, SOURCE)
    assert names(foreign) == ["ctid"] and isinstance(foreign[0].as_error(), CtExistsRemote)
    busy = check(hello(), {"locked": "locked by vzpy pid 7"}, SOURCE)
    assert isinstance(busy[0].as_error(), MigrationLocked)


def test_cpu_flags_that_matter() -> None:
    flags = parse_cpu_flags("processor\t: 0\nflags\t\t: fpu sse2 avx512f hypervisor constant_tsc aes\n")
    assert relevant_cpu_flags(flags, "x86_64") == {"fpu", "sse2", "avx512f", "aes"}
    assert relevant_cpu_flags({"fp", "asimd"}, "aarch64") == {"fp", "asimd"}
    other_arch = check(hello(), {}, SourceFacts(ctid="1", private_bytes=0, machine="aarch64"))
    assert isinstance(other_arch[0].as_error(), UnsupportedCpu)
    assert isinstance(check(hello(criu={"ok": False}), {}, SOURCE)[0].as_error(), DestinationNotReady)
    assert isinstance(check(hello(), {"ips_in_use": {"1.2.3.4": "9"}}, SOURCE)[0].as_error(), IpInUseRemote)


# --- targets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.231.0.2", Target("root", "10.231.0.2", 22)),
        ("admin@host.example:2222", Target("admin", "host.example", 2222)),
        ("b:2200", Target("root", "b", 2200)),
        ("[fd00::2]:2222", Target("root", "fd00::2", 2222)),
        ("user@[fd00::2]", Target("user", "fd00::2", 22)),
        ("fd00::2", Target("root", "fd00::2", 22)),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text", ["", "@host", "-oProxyCommand=x", "host:0", "host:99999", "host:x", "a b", "us$er@host", "[fd00::2", "h;id"]
)
def test_parse_target_refuses_garbage_with_exit_1(text: str) -> None:
    with pytest.raises(MigrateUsage) as info:
        parse_target(text)
    assert info.value.exit_code == 1


def test_target_spellings() -> None:
    v6 = Target("root", "fd00::2", 2222)
    assert (str(v6), v6.known_hosts_name, v6.rsync_spec("/vz/x/")) == (
        "root@[fd00::2]:2222",
        "[fd00::2]:2222",
        "root@[fd00::2]:/vz/x/",
    )
    assert Target("root", "h", 22).known_hosts_name == "h"


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    import paramiko

    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    theirs = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True).stdout.split()[1]
    assert fingerprint(paramiko.Ed25519Key.from_private_key_file(str(key))) == theirs


# --- rsync and OpenSSH argv ----------------------------------------------------------------------------------


def openssh(key: Path | None = Path("/root/.ssh/id_ed25519")) -> OpenSsh:
    return OpenSsh(Target("root", "10.231.0.2", 2222), Path("/root/.ssh/known_hosts"), key, 5, prefer_gcm=False)


def test_rsync_argv_layout() -> None:
    argv = rsync_argv(Path("/vz/private/101"), "/vz/private/101", openssh(), "--bwlimit=10M -z")
    e = argv.index("-e")
    assert argv[: len(BASE_OPTIONS) + 1] == ["rsync", *BASE_OPTIONS]
    assert argv[e + 2 :] == ["--bwlimit=10M", "-z", "--", "/vz/private/101/", "root@10.231.0.2:/vz/private/101/"]
    rsh = argv[e + 1].split(" ")
    assert rsh[:5] == ["ssh", "-F", "/dev/null", "-p", "2222"]
    for option in (
        "-oBatchMode=yes",
        "-oStrictHostKeyChecking=yes",
        "-oUserKnownHostsFile=/root/.ssh/known_hosts",
        "-oIdentitiesOnly=yes",
    ):
        assert option in rsh
    assert rsh[rsh.index("-i") + 1] == "/root/.ssh/id_ed25519"


@pytest.mark.parametrize(
    "hostile",
    [
        "-e 'sh -c id'",
        "-ave sh",
        "--rsh=sh",
        "--rs=sh",
        "--rsh sh",
        "'; rm -rf /'",
        "/etc/shadow",
        "root@evil:/",
        "--server",
        "--old-args",
        "unbalanced 'quote",
        "--copy-dest=/vz/private/102",
        "--link-dest=/",
        "--compare-d=/tmp",
    ],
)
def test_hostile_rsync_opts_are_refused(hostile: str) -> None:
    with pytest.raises(MigrateUsage) as info:
        rsync_argv(Path("/vz/private/101"), "/vz/private/101", openssh(), hostile)
    assert info.value.exit_code == 1


def test_rsync_opts_never_reach_the_ssh_command() -> None:
    sneaky = "--exclude=$(touch${IFS}/tmp/x) --exclude='a b;c' --rsync-path=/usr/bin/rsync"
    argv = rsync_argv(Path("/src"), "/dst", openssh(), sneaky)
    rsh = argv[argv.index("-e") + 1]
    assert "$(" not in rsh and "exclude" not in rsh
    assert "--exclude=a b;c" in argv and "--exclude=$(touch${IFS}/tmp/x)" in argv
    assert parse_rsync_opts(None) == []


def test_paths_ssh_cannot_take_as_one_word_are_refused() -> None:
    with pytest.raises(MigrateUsage, match="spaces"):
        OpenSsh(Target("root", "h"), Path("/tmp/known hosts"), None).rsh()
    with pytest.raises(CopyFailed, match="absolute"):
        rsync_argv(Path("/src"), "relative/dst", openssh())


def test_openssh_prefers_gcm_only_when_asked_and_without_a_key_uses_its_defaults() -> None:
    plain = openssh(key=None)
    assert "-i" not in plain.options() and not any("Ciphers" in o for o in plain.options())
    gcm = OpenSsh(Target("root", "h"), Path("/k"), None, prefer_gcm=True)
    assert "-oCiphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com" in gcm.options()
    assert gcm.argv("-N")[-2:] == ["--", "root@h"]


def test_parse_progress() -> None:
    progress = parse_progress("    134,217,728  12%  127.50MB/s    0:00:07 (xfr#1, to-chk=0/2)")
    assert progress is not None and (progress.bytes, progress.percent, progress.eta) == (134217728, 12, "0:00:07")
    assert parse_progress("sending incremental file list") is None


def test_prepare_refuses_an_area_inside_another_cts_before_making_anything(served: Served, vz: GlobalConfig) -> None:
    """The destination checks its areas for the incoming CT (here: inside CT 300's private area) first."""
    vz.confdir.mkdir(parents=True)
    (vz.confdir / "300.conf").write_text(f'VE_PRIVATE="{vz.ve_private("106").parent}"\n')
    served.client.hello()
    remote = RemoteAgent(served.client, {})
    with pytest.raises(ApplyConfigFailed, match="overlaps CT 300's VE_PRIVATE") as info:
        remote.prepare("106", 'HOSTNAME="x"\n', token="t")
    assert info.value.exit_code == 15
    assert not vz.ve_private("106").exists()
    assert not (vz.confdir / "106.conf.migrating").exists()
    assert not AgentSession(lambda: vz).workdir("106").exists()


@pytest.mark.parametrize("option", ["-L", "-aL", "-k", "-K", "-zK", "--copy-links", "--copy-unsafe", "--keep-dirlinks"])
def test_rsync_opts_that_follow_the_cts_symlinks_are_refused(option: str) -> None:
    with pytest.raises(MigrateUsage, match="follow symlinks, which the CT controls"):
        parse_rsync_opts(option)


def test_rsync_opts_that_copy_links_as_links_still_pass() -> None:
    assert parse_rsync_opts("-z --bwlimit=50000 -v --safe-links") == ["-z", "--bwlimit=50000", "-v", "--safe-links"]
