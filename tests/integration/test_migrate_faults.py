"""A migration interrupted at every step boundary (VZPY_MIGRATE_FAULT, vzpy.migrate.fault) ends with the CT
running on exactly one of the two test hosts, and no copy on the other that `vzpy start` would bring back.

source:before:STEP kills `vzpy migrate` (SIGKILL) before STEP, then `vzpy migrate --recover` settles it;
source:fail:STEP makes STEP fail (the rollback); agent:before/after:OP kills the destination's agent
on receiving OP or just before answering it (the reply is lost). The CT is small (busybox init and an
httpd) so that each case takes seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy_lab.netns import TestHost, TestNetwork

pytestmark = pytest.mark.root
CTID = "201"
RECOVER = "vzpy migrate --recover"
IN_DOUBT = 21  # the link broke with the outcome unknown (MIG_ERR_CONN_BROKEN): the source copy stays suspended
ONLINE_STEPS = [
    "preflight",
    "prepare",
    "tunnel",
    "sync",
    "suspend",
    "dump",
    "final-sync",
    "copy-images",
    "restore",
    "resume",
    "finish",
]
OFFLINE_STEPS = ["preflight", "prepare", "sync", "stop", "final-sync", "start", "finish"]
# the first step after which the CT is the destination's (the commit request was sent before it)
ONLINE_COMMITTED_FROM = "finish"
OFFLINE_COMMITTED_FROM = "finish"


def vzpy(host: TestHost, *args: str, fault: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"VZPY_MIGRATE_FAULT": fault} if fault else {}
    return host.run(["vzpy", *args], env=env, timeout=timeout)


def status(host: TestHost) -> str:
    result = vzpy(host, "status", "--json", CTID)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return data["status"] if data["exist"] else "absent"


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def assert_runs_only_on(running: TestHost, other: TestHost) -> None:
    """The CT runs on `running`; on `other` there is nothing that runs or can be started, and nothing of the
    migration is left (the agent there may still be rolling back when the source gives up: wait for it)."""
    assert status(running) == "running"
    assert not running.path(f"/vz/lock/{CTID}.migration.json").exists()
    wait_until(lambda: status(other) == "absent" and not other.path(f"/vz/dump/Migrate.{CTID}").exists())
    started = vzpy(other, "start", CTID)
    assert started.returncode != 0 and status(other) == "absent", started.stdout
    # "absent" is only the config: no process of a restored (frozen) copy, nor its mounted root, may be left
    procs = Path(f"/sys/fs/cgroup/freezer/{other.cgroup_parent}/{CTID}/cgroup.procs")
    assert not procs.exists() or not procs.read_text().split(), f"processes of CT {CTID} left on {other.address}"
    assert not other.path(f"/vz/root/{CTID}").is_mount()
    for host in (running, other):  # scratch dirs of a killed run go with the recovery
        assert not list(host.path("/vz/dump").glob(f".vzpy-migrate-{CTID}-*"))


@pytest.fixture
def ct_on_a(host_a: TestHost, host_b: TestHost, test_network: TestNetwork) -> Iterator[str]:
    ip = test_network.new_ct_address()
    created = vzpy(host_a, "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "fault.test")
    assert created.returncode == 0, created.stderr
    www = host_a.path(f"/vz/private/{CTID}/var/www")
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("hello\n")
    service = host_a.path(f"/vz/private/{CTID}/etc/vzpy/services/httpd")
    service.write_text("#!/bin/sh\nexec httpd -f -p 80 -h /var/www\n")
    service.chmod(0o755)
    assert vzpy(host_a, "start", CTID).returncode == 0
    try:
        yield ip
    finally:
        for host in (host_a, host_b):
            host.remove_ct(CTID)


def migrate(host_a: TestHost, host_b: TestHost, *extra: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    return vzpy(host_a, "migrate", *extra, host_b.address, CTID, fault=fault)


def recover(host_a: TestHost, host_b: TestHost) -> subprocess.CompletedProcess[str]:
    result = vzpy(host_a, "migrate", "--recover", host_b.address, CTID)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# --- the source killed at each step boundary, then --recover ------------------------------------------------


@pytest.mark.parametrize("step", ONLINE_STEPS)
def test_online_source_killed_before_each_step_is_recovered(host_a, host_b, ct_on_a, step: str) -> None:
    killed = migrate(host_a, host_b, "--online", fault=f"source:before:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    committed = ONLINE_STEPS.index(step) >= ONLINE_STEPS.index(ONLINE_COMMITTED_FROM)
    if ONLINE_STEPS.index(step) > ONLINE_STEPS.index("suspend"):
        assert status(host_a) == "suspended"
    if step == "finish":  # the commit request was sent: nothing resumes the copy here by accident
        refused = vzpy(host_a, "chkpnt", "--resume", CTID)
        assert refused.returncode == 9 and RECOVER in refused.stderr, refused.stdout + refused.stderr  # VZ_LOCKED
    said = recover(host_a, host_b)
    if committed:
        assert "runs on" in said.stdout
        assert_runs_only_on(host_b, host_a)
    else:
        assert "runs here" in said.stdout
        assert_runs_only_on(host_a, host_b)


def test_online_source_killed_after_the_last_step_left_nothing_to_recover(host_a, host_b, ct_on_a) -> None:
    killed = migrate(host_a, host_b, "--online", fault="source:after:finish")
    assert killed.returncode == -signal.SIGKILL
    assert_runs_only_on(host_b, host_a)


@pytest.mark.parametrize("step", OFFLINE_STEPS)
def test_offline_source_killed_before_each_step_is_recovered(host_a, host_b, ct_on_a, step: str) -> None:
    killed = migrate(host_a, host_b, fault=f"source:before:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    if step in ("final-sync", "start", "finish"):  # stopped for the migration: only --recover starts it
        refused = vzpy(host_a, "start", CTID)
        assert refused.returncode == 9 and RECOVER in refused.stderr, refused.stdout + refused.stderr  # VZ_LOCKED
    said = recover(host_a, host_b)
    if OFFLINE_STEPS.index(step) >= OFFLINE_STEPS.index(OFFLINE_COMMITTED_FROM):
        assert "runs on" in said.stdout
        assert_runs_only_on(host_b, host_a)
    else:
        assert "runs here" in said.stdout
        assert_runs_only_on(host_a, host_b)


# --- a step failing: the rollback --------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["prepare", "sync", "suspend", "dump", "final-sync", "copy-images", "restore"])
def test_online_failure_at_each_step_rolls_back(host_a, host_b, ct_on_a, step: str) -> None:
    failed = migrate(host_a, host_b, "--online", fault=f"source:fail:{step}")
    assert failed.returncode == 6 and "injected fault" in failed.stderr, failed.stdout + failed.stderr
    assert_runs_only_on(host_a, host_b)


@pytest.mark.parametrize("step", ["sync", "stop", "final-sync"])
def test_offline_failure_at_each_step_rolls_back(host_a, host_b, ct_on_a, step: str) -> None:
    failed = migrate(host_a, host_b, fault=f"source:fail:{step}")
    assert failed.returncode == 6, failed.stdout + failed.stderr
    assert status(host_a) == "running", failed.stdout + failed.stderr
    assert_runs_only_on(host_a, host_b)


# --- the destination's agent dying --------------------------------------------------------------------------


def test_destination_resumed_but_the_reply_lost(host_a, host_b, ct_on_a) -> None:
    lost = migrate(host_a, host_b, "--online", fault="agent:after:resume")
    assert lost.returncode == IN_DOUBT, lost.stdout + lost.stderr
    assert f"{RECOVER} root@{host_b.address} {CTID}" in lost.stderr, lost.stderr
    assert status(host_a) == "suspended" and status(host_b) == "running"  # never two running copies
    assert "runs on" in recover(host_a, host_b).stdout
    assert_runs_only_on(host_b, host_a)


def test_destination_agent_dies_on_the_resume_request(host_a, host_b, ct_on_a) -> None:
    lost = migrate(host_a, host_b, "--online", fault="agent:before:resume")
    assert lost.returncode == IN_DOUBT and RECOVER in lost.stderr, lost.stderr
    assert status(host_a) == "suspended"
    assert "runs here" in recover(host_a, host_b).stdout  # the frozen copy there is killed
    assert_runs_only_on(host_a, host_b)


@pytest.mark.parametrize("when", ["before", "after"])
def test_destination_agent_dies_around_the_restore(host_a, host_b, ct_on_a, when: str) -> None:
    failed = migrate(host_a, host_b, "--online", fault=f"agent:{when}:restore")
    assert failed.returncode != 0 and "rolling back: suspend" in failed.stdout, failed.stdout + failed.stderr
    assert_runs_only_on(host_a, host_b)  # the rollback cleaned host_b over a new connection


def test_offline_start_reply_lost(host_a, host_b, ct_on_a) -> None:
    lost = migrate(host_a, host_b, fault="agent:after:start")
    assert lost.returncode == IN_DOUBT and RECOVER in lost.stderr, lost.stderr
    assert status(host_a) == "stopped" and status(host_b) == "running"
    assert "runs on" in recover(host_a, host_b).stdout
    assert_runs_only_on(host_b, host_a)


# --- the link dropped right after the commit request ----------------------------------------------------------


@pytest.mark.parametrize("delay", [0.03, 0.1])
def test_link_dropped_just_after_resume_on_destination(host_a, host_b, ct_on_a, delay: float) -> None:
    migration = host_a.popen(
        ["vzpy", "migrate", "--online", host_b.address, CTID],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in migration.stdout:
        seen.append(line)
        if "resume on destination ..." in line:
            break
    else:
        pytest.fail("resume on destination never started:\n" + "".join(seen))
    time.sleep(delay)
    host_b.drop_ssh_sessions()
    output = "".join(seen) + migration.communicate(timeout=120)[0]
    if migration.returncode == 0:  # the reply made it before the link went
        assert_runs_only_on(host_b, host_a)
        return
    assert RECOVER in output, output
    assert status(host_a) == "suspended"  # never resumed while the outcome is unknown
    said = recover(host_a, host_b)
    if "runs on" in said.stdout:
        assert_runs_only_on(host_b, host_a)
    else:
        assert_runs_only_on(host_a, host_b)


# --- what would only fail after the freeze is found before it ----------------------------------------------


def test_a_task_criu_cannot_dump_stops_the_migration_before_the_freeze(host_a, host_b, ct_on_a) -> None:
    """A task in the CT with a host file open (and its session outside the CT): preflight refuses, the CT is
    never frozen."""
    init_pid = json.loads(host_a.path(f"/vz/lock/{CTID}.state.json").read_text())["init_pid"]
    with open("/etc/hostname", "rb") as host_file:
        intruder = subprocess.Popen(["nsenter", "-t", str(init_pid), "-p", "-m", "--", "sleep", "600"], stdin=host_file)
    try:
        wait_until(lambda: bool(_children(intruder.pid)))
        sleeper = _children(intruder.pid)[0]
        for controller in ("freezer", "memory", "cpu", "pids"):
            Path(f"/sys/fs/cgroup/{controller}/{host_a.cgroup_parent}/{CTID}/cgroup.procs").write_text(str(sleeper))
        refused = migrate(host_a, host_b, "--online")
        assert refused.returncode == 8, refused.stdout + refused.stderr
        assert "CRIU cannot dump" in refused.stderr and "suspend" not in refused.stdout
        assert status(host_a) == "running" and status(host_b) == "absent"
    finally:
        for pid in _children(intruder.pid):
            os.kill(pid, signal.SIGKILL)
        intruder.kill()
        intruder.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_migration_frozen_longer_than_max_frozen_is_undone(host_a, host_b, ct_on_a) -> None:
    too_long = migrate(host_a, host_b, "--online", "--max-frozen", "0.1")
    assert too_long.returncode == 22, too_long.stdout + too_long.stderr
    assert "--max-frozen 0.1s" in too_long.stderr and "resumed here" in too_long.stderr
    assert_runs_only_on(host_a, host_b)
    alive = vzpy(host_a, "exec", CTID, "wget", "-q", "-O", "-", "http://127.0.0.1/")
    processes = vzpy(host_a, "exec", CTID, "ps").stdout
    assert alive.returncode == 0 and alive.stdout == "hello\n", alive.stdout + alive.stderr + processes


# --- the link going silent (no RST, no ICMP) while the CT is frozen ----------------------------------------


def test_a_link_gone_silent_during_the_dump_ends_at_max_frozen_with_the_ct_resumed_here(
    host_a, host_b, ct_on_a
) -> None:
    """The page server stops answering while CRIU's parasite code is in the CT's tasks, where no notification
    comes to abort at: at --max-frozen the dump's connection is closed, CRIU stops cleanly, and the CT runs on
    here, before any request to the silent destination is waited out."""
    migration = host_a.popen(
        ["vzpy", "migrate", "--online", "--max-frozen", "2", host_b.address, CTID],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        for line in migration.stdout:
            seen.append(line)
            if "sync files: done" in line:  # the next steps: suspend (here), then the dump
                host_b.silence()
            if "rolling back: suspend" in line:
                break
        else:
            pytest.fail("the migration never rolled back:\n" + "".join(seen))
        wait_until(lambda: status(host_a) == "running", timeout=10)
        served = vzpy(host_a, "exec", CTID, "wget", "-q", "-O", "-", "http://127.0.0.1/")
        assert served.stdout == "hello\n", served.stdout + served.stderr  # with the link still silent
    finally:
        host_b.unsilence()
    output = "".join(seen) + migration.communicate(timeout=180)[0]
    assert migration.returncode == 22, output
    assert "--max-frozen 2s" in output and "resumed here" in output, output
    log = host_a.path(f"/vz/dump/.logs/{CTID}/dump.log").read_text()
    assert "Dumping FAILED" in log, log[-2000:]  # CRIU stopped itself: a killed CRIU writes no such line
    assert_runs_only_on(host_a, host_b)
