"""A CT whose processes fork all the time (the VM lab): a shell spawning a child every few ms, parents whose
children check and write (copy-on-write) the memory they inherit, children forking grandchildren.

CT 151 runs, from before the migration to after it:
- the forker workload (vzpy_lab/workload/forker.c) as a service, 48 MiB: a child forked every 20 ms checks
  and writes its inherited memory, one in four forks a grandchild doing the same;
- a second forker, 16 MiB, started as operators start daemons: `vzpy exec` with setsid in the background;
- a shell service spawning a short-lived child (usleep) every 5 ms.

Post-copy cannot carry it with CRIU 4.2.1: every fork of a restored task hands `criu lazy-pages` a new
userfaultfd (UFFD_EVENT_FORK) with a copy of the parent's remaining page list and a buffer as large as its
largest lazy mapping, released only once a failed copy shows the child gone. Measured here: the daemon ran
out of fds after ~2,500 forks in 90 s ("Can't read uffd message: Too many open files", the CT's memory lost);
given more fds, its memory filled the 1 GiB destination until it stopped answering. vzpy must refuse it
before anything is frozen, and the CT moves with pre-copy: checked there (children that ran there passed
their checks, the parent's memory holds its pattern). A child counts as "lazy" when pages of its inherited
memory were not resident when it started (mincore): pre-copy leaves none."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vzpy_lab.vm.lab import Lab, LabVM
from vzpy_lab.workload.build import build_forker
from vzpy_lab.workload.forker import ForkerStatus, forker_status, wait_for_forker

pytestmark = [pytest.mark.root, pytest.mark.slow]
CTID = "151"
SERVICE_PORT = 7200  # the forker started by the CT's services, 48 MiB
EXEC_PORT = 7201  # the forker started with `vzpy exec`, 16 MiB
SPAWNED = "/run/spawned"  # the spawner's loop count
SPAWNER = f"#!/bin/sh\ni=0\nwhile :; do i=$((i+1)); usleep 5000; echo $i > {SPAWNED}; done\n"
LOGS = f"/vz/dump/.logs/{CTID}"  # CRIU's logs of the CT's last dump, lazy-pages daemon and restore
WAIT = 600.0  # TCG on a loaded machine: a deadline for things that must happen, never a timed assert


@dataclass(frozen=True)
class ForkingCt:
    ip: str
    lab: Lab
    logs: Path  # where a failed migration's CRIU logs are copied to

    def status(self, port: int) -> ForkerStatus:
        return forker_status(self.ip, port, self.lab.connector(), timeout=WAIT)

    def wait_for_more_children(self, port: int, than: ForkerStatus, more: int = 20) -> ForkerStatus:
        """The forker's status once it reaped `more` children since `than`: it still runs and forks."""
        return wait_for_forker(self.ip, port, self.lab.connector(), timeout=WAIT, reaped=than.reaped + more)


def spawned(vm: LabVM) -> int:
    """The spawner's loop count (its file is rewritten every few ms: an empty read is retried)."""
    for _ in range(20):
        read = vm.run(["vzpy", "exec", CTID, "cat", SPAWNED])
        if re.fullmatch(r"\d+\n", read.stdout):
            return int(read.stdout)
    raise AssertionError(f"no count in {SPAWNED} of CT {CTID} in {vm.name}: {read.stdout!r} {read.stderr!r}")


def wait_for_spawner(vm: LabVM, past: int) -> int:
    for _ in range(int(WAIT)):
        count = spawned(vm)
        if count > past:
            return count
        vm.run(["sleep", "1"])
    raise AssertionError(f"the spawner of CT {CTID} in {vm.name} stopped at {past}")


def status_of(vm: LabVM) -> str:
    result = vm.run(["vzpy", "status", "--json", CTID])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return str(data["status"]) if data["exist"] else "absent"


def assert_healthy(status: ForkerStatus) -> None:
    assert status.intact, status  # every page of the parent's memory holds its pattern
    assert status.failures == 0, status
    assert status["fork_errors"] == 0, status


def criu_errors(vm: LabVM) -> str:
    """The error lines of CRIU's logs of CT 151 in `vm` (dump, lazy-pages, restore), for a failure's message."""
    script = (
        f'cd {LOGS} 2>/dev/null && for f in *.log; do echo "== {vm.name} $f"; '
        "grep -n -i -E 'error|fail|warn' \"$f\" | tail -n 15; done"
    )
    return vm.run(["sh", "-c", script]).stdout


def migrate(vm: LabVM, to: LabVM, *args: str, keep_logs: Path) -> dict[str, object]:
    moved: subprocess.CompletedProcess[str] = vm.run(
        ["vzpy", "migrate", "--online", "--json", "--max-frozen", "600", *args, to.address, CTID], timeout=1200
    )
    if moved.returncode != 0:
        for guest in (vm, to):
            guest.copy_out(f"{LOGS}/", keep_logs / guest.name)
        errors = "".join(criu_errors(guest) for guest in (vm, to))
        raise AssertionError(f"{moved.stdout}{moved.stderr}\nCRIU's logs (all in {keep_logs}):\n{errors}")
    summary: dict[str, object] = json.loads(moved.stdout)
    print(f"lab-json: {json.dumps(summary)}")  # the CI log keeps what each migration did
    return summary


@pytest.fixture(scope="module")
def forking_ct(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkingCt]:
    """CT 151 on vm1, its forkers and spawner running; removed from both guests at the end of the module."""
    vm1, vm2 = lab.vms
    forker = build_forker(tmp_path_factory.mktemp("forker"))
    ip = lab.new_ct_address()
    private = f"/vz/private/{CTID}"
    vm1.run(["vzpy", "create", CTID, "--ostemplate", "minimal", "--ipadd", ip], check=True)
    try:
        vm1.copy_in(forker, f"{private}/usr/bin/forker")
        services = {"forker": f"#!/bin/sh\nexec /usr/bin/forker {SERVICE_PORT} 48\n", "spawner": SPAWNER}
        for name, script in services.items():
            path = f"{private}/etc/vzpy/services/{name}"
            vm1.run(["sh", "-c", f"cat > {path} && chmod 755 {path}"], input=script, check=True)
        vm1.run(["vzpy", "start", CTID], check=True)
        daemon = f"setsid /usr/bin/forker {EXEC_PORT} 16 </dev/null >/dev/null 2>&1 &"
        vm1.run(["vzpy", "exec", CTID, "sh", "-c", daemon], check=True)
        yield ForkingCt(ip, lab, tmp_path_factory.mktemp("criu-logs"))
    finally:
        for vm in (vm1, vm2):
            vm.remove_ct(CTID)


def test_post_copy_of_a_ct_that_keeps_forking_is_refused_before_anything_is_frozen(
    vm1: LabVM, vm2: LabVM, forking_ct: ForkingCt
) -> None:
    """Only the preflight runs (--check-only): an actual post-copy here loses the CT or the destination."""
    ct = forking_ct
    for port in (SERVICE_PORT, EXEC_PORT):
        wait_for_forker(ct.ip, port, ct.lab.connector(), timeout=WAIT, reaped=20)
    asked = vm1.run(["vzpy", "migrate", "--online", "--check-only", "--postcopy", vm2.address, CTID], timeout=900)
    error = asked.stderr.strip()
    assert asked.returncode != 0, asked.stdout + asked.stderr
    assert "fork" in error and "\n" not in error, error  # one line naming the reason
    assert status_of(vm1) == "running" and status_of(vm2) == "absent"


def test_a_ct_that_keeps_forking_moves_with_pre_copy(vm1: LabVM, vm2: LabVM, forking_ct: ForkingCt) -> None:
    ct = forking_ct
    ports = (SERVICE_PORT, EXEC_PORT)
    before = {port: wait_for_forker(ct.ip, port, ct.lab.connector(), timeout=WAIT, reaped=20) for port in ports}
    for status in before.values():
        assert_healthy(status)
        assert status["lazy_ok"] == 0 and status["missing"] == 0, status  # all of it resident here
    spawned_before = wait_for_spawner(vm1, 0)

    summary = migrate(vm1, vm2, "--precopy", keep_logs=ct.logs)
    assert summary["path"] == "pre-copy", summary
    assert status_of(vm2) == "running" and status_of(vm1) == "absent"
    after = {port: ct.wait_for_more_children(port, before[port]) for port in ports}
    print(f"forker before: {before}\nforker after: {after}")
    for port, status in after.items():
        assert_healthy(status)  # every child forked there passed its checks, the parent's memory intact
        assert status["forks"] > before[port]["forks"], status  # the same parent, its counters carried over
        assert status["missing"] == 0 and status["lazy_ok"] == 0, status
    wait_for_spawner(vm2, spawned_before)
