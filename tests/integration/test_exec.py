"""`vzpy exec` and `vzpy enter` hand the CT nothing of the host, so what they start stays checkpointable;
`vzpy chkpnt` names what CRIU could not dump before it freezes anything.

Real CTs, real CRIU, the real `vzpy` command line.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from helpers import VZPY, VzRoot, ns_pids, read_pty

pytestmark = pytest.mark.root

SECRET = "host-only secret 4711"
CAP_SYS_RESOURCE = 24
T = TypeVar("T")


def host_has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    eff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(eff, 16) >> CAP_SYS_RESOURCE & 1)


def ct_pids_of(vz: VzRoot, ctid: str, cmdline: str) -> list[int]:
    """Host pids of the CT's processes whose command line is exactly `cmdline`."""
    pids = []
    for pid in Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}/cgroup.procs").read_text().split():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except FileNotFoundError:
            continue
        if b" ".join(args).decode() == cmdline:
            pids.append(int(pid))
    return pids


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)
    return value


def checkpoint_and_restore(vz: VzRoot, ctid: str) -> None:
    dumped = vz.run("chkpnt", ctid, timeout=120)
    assert dumped.returncode == 0, dumped.stderr
    restored = vz.run("restore", ctid, timeout=120)
    assert restored.returncode == 0, restored.stderr


def test_daemon_started_by_exec_is_checkpointable(running_ct) -> None:
    vz, ctid, _ = running_ct
    # stdin on the host's /dev/null, stdout/stderr host pipes: none of it may reach the daemon
    started = vz.run("exec", ctid, "sh", "-c", "sleep 1234 &", stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stderr
    daemon = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1234"), "the daemon")[0]
    stat = Path(f"/proc/{daemon}/status").read_text()
    sid = next(line.split() for line in stat.splitlines() if line.startswith("NSsid:"))
    assert sid[-1] != "0", "the daemon's session leader is outside the CT's pid namespace"

    checkpoint_and_restore(vz, ctid)
    assert ct_pids_of(vz, ctid, "sleep 1234"), "the daemon did not come back with the restore"


def test_stdin_stdout_and_exit_code_pass_through(running_ct) -> None:
    vz, ctid, _ = running_ct
    piped = subprocess.run(
        ["sh", "-c", f"echo x | {VZPY} exec {ctid} cat"], env=vz.env, capture_output=True, text=True, timeout=60
    )
    assert (piped.returncode, piped.stdout) == (0, "x\n"), piped.stderr
    assert vz.run("exec", ctid, "sh", "-c", "exit 7", stdin=subprocess.DEVNULL).returncode == 7
    both = vz.run("exec", ctid, "sh", "-c", "echo out; echo err >&2; exit 3", stdin=subprocess.DEVNULL)
    assert (both.returncode, both.stdout, both.stderr) == (3, "out\n", "err\n")
    big = "y" * (1 << 20)
    echoed = vz.run("exec", ctid, "cat", input=big)
    assert echoed.returncode == 0 and echoed.stdout == big


def test_a_host_file_open_in_the_caller_is_not_visible_in_the_ct(running_ct, tmp_path: Path) -> None:
    vz, ctid, _ = running_ct
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    fd = os.open(secret, os.O_RDONLY)
    try:
        reader = vz.run("exec", ctid, "cat", f"/proc/self/fd/{fd}", stdin=subprocess.DEVNULL, pass_fds=(fd,))
        assert SECRET not in reader.stdout and reader.returncode != 0
        # a command still running: the host sees exactly its three stdio pipes and a session inside the CT
        holder = subprocess.Popen(
            [VZPY, "exec", ctid, "sleep", "1235"],
            env=vz.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    try:
        sleeper = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1235"), "the command")[0]
        fds = {name: os.readlink(f"/proc/{sleeper}/fd/{name}") for name in os.listdir(f"/proc/{sleeper}/fd")}
        assert sorted(fds) == ["0", "1", "2"] and all(t.startswith("pipe:") for t in fds.values()), fds
        assert ns_pids(sleeper)[-1] == _last_field(sleeper, "NSsid:"), "the command is not a session leader"
    finally:
        holder.terminate()  # forwarded to the command: it ends, and so does vzpy
        assert holder.wait(timeout=30) == 128 + 15


def _last_field(pid: int, key: str) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[-1])


def test_daemon_started_from_an_enter_shell_is_checkpointable(running_ct, tmp_path: Path) -> None:
    vz, ctid, _ = running_ct
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    pid, master = pty.fork()
    if pid == 0:
        os.open(secret, os.O_RDONLY)  # inheritable: a host fd the caller holds
        os.execve(VZPY, [VZPY, "enter", ctid], vz.env)
    try:
        assert "# " in read_pty(master, until=b"# ")
        os.write(master, b"sleep 1236 &\r")
        read_pty(master, until=b"# ")
        os.write(master, b"exit 5\r")
        read_pty(master, until=None)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 5
    daemon = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1236"), "the daemon")[0]
    assert all(not os.readlink(f"/proc/{daemon}/fd/{n}").endswith("secret") for n in os.listdir(f"/proc/{daemon}/fd"))

    checkpoint_and_restore(vz, ctid)
    assert ct_pids_of(vz, ctid, "sleep 1236"), "the daemon did not come back with the restore"


def test_chkpnt_names_a_non_root_task_before_freezing(running_ct) -> None:
    vz, ctid, _ = running_ct
    start = vz.run("exec", ctid, "sh", "-c", "su -s /bin/sh nobody -c 'exec sleep 1237' &", stdin=subprocess.DEVNULL)
    assert start.returncode == 0, start.stderr
    task = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1237"), "the non-root task")[0]
    assert Path(f"/proc/{task}/status").read_text().count("65534") >= 2

    result = vz.run("chkpnt", ctid, timeout=120)
    if host_has_cap_sys_resource():
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 16, result.stderr
    first = result.stderr.splitlines()[0]
    assert f"pid {task} (sleep" in first and "uid 65534" in first and "CAP_SYS_RESOURCE" in first, result.stderr
    status = json.loads(vz.run("status", "--json", ctid).stdout)
    assert status["status"] == "running"
    freezer = Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}/freezer.state")
    assert freezer.read_text().strip() == "THAWED"
    assert not list((vz.base / "dump").glob(f"Dump.{ctid}*"))
    assert not list((vz.base / "dump").rglob("dump.log")), "CRIU ran: the check came too late"


def test_a_failed_dump_names_the_process_that_caused_it(running_ct) -> None:
    vz, ctid, _ = running_ct
    # a deleted file bigger than CRIU's ghost limit (1 MiB): nothing the pre-freeze check looks for
    script = "dd if=/dev/zero of=/tmp/big bs=1024 count=2048 2>/dev/null; exec 3</tmp/big; rm /tmp/big; exec sleep 1239"
    assert vz.run("exec", ctid, "sh", "-c", f"{script} &", stdin=subprocess.DEVNULL).returncode == 0
    task = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1239"), "the task")[0]
    inner = ns_pids(task)[-1]

    result = vz.run("chkpnt", ctid, timeout=120)
    assert result.returncode == 16, result.stderr
    first = result.stderr.splitlines()[0]
    assert f"pid {task} (sleep, pid {inner} in the CT), fd 3:" in first and "ghost file" in first, first
    assert json.loads(vz.run("status", "--json", ctid).stdout)["status"] == "running"


def test_chkpnt_names_tasks_started_from_the_host_before_freezing(running_ct, tmp_path: Path) -> None:
    vz, ctid, _ = running_ct
    init = vz.state(ctid)["init_pid"]
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    join = "".join(
        f"echo $$ > /sys/fs/cgroup/{c}/{vz.cgroup_parent}/{ctid}/cgroup.procs; "
        for c in ("freezer", "memory", "cpu", "pids")
    )
    fd = os.open(secret, os.O_RDONLY)
    try:
        # as the old `vzpy exec` did: in the CT's cgroups, with the caller's fds and session
        entered = f"exec nsenter -t {init} -a sh -c 'sleep 1241 &'"
        subprocess.run(["sh", "-c", join + entered], pass_fds=(fd,), stdin=subprocess.DEVNULL, check=True)
    finally:
        os.close(fd)
    # entered with nsenter alone: in the CT's PID namespace but not in its cgroups
    subprocess.run(
        ["nsenter", "-t", str(init), "-a", "sh", "-c", "sleep 1242 </dev/null >/dev/null 2>&1 &"], check=True
    )
    leaked = wait_for(lambda: ct_pids_of(vz, ctid, "sleep 1241"), "the task with host fds")[0]
    stray = wait_for(lambda: _pids_in_ct_pidns(init, "sleep 1242"), "the task outside the cgroups")[0]

    result = vz.run("chkpnt", ctid, timeout=120)
    assert result.returncode == 16, result.stderr
    lines = result.stderr.splitlines()
    assert any(f"pid {leaked} (sleep" in line and "session whose leader is outside the CT" in line for line in lines)
    assert any(f"pid {leaked} (sleep" in line and "on files outside the CT" in line for line in lines), lines
    assert any(f"pid {stray} (sleep" in line and "not in its cgroups" in line for line in lines), result.stderr
    assert not list((vz.base / "dump").rglob("dump.log")), "CRIU ran: the check came too late"
    assert json.loads(vz.run("status", "--json", ctid).stdout)["status"] == "running"


def _pids_in_ct_pidns(init: int, cmdline: str) -> list[int]:
    pidns = os.stat(f"/proc/{init}/ns/pid").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.stat(entry / "ns" / "pid").st_ino != pidns:
                continue
            if (entry / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode() == cmdline:
                found.append(int(entry.name))
        except OSError:
            continue
    return found
