"""The VM lab itself: both guests boot with the stock kernel, have what pre-copy and post-copy need, run the
checkout's vzpy, checkpoint and restore a CT, and migrate it from one guest to the other (stop-and-copy)
while a client outside both keeps its TCP connection to the CT."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from vzpy_lab.vm.lab import Lab, LabVM
from vzpy_lab.vm.layout import GUEST_CRIU_PREFIX
from vzpy_lab.workload.client import EchoStream

pytestmark = [pytest.mark.root, pytest.mark.slow]
CTID = "101"
ECHO_PORT = 7001
CRIU = f"{GUEST_CRIU_PREFIX}/bin/criu"


def status(vm: LabVM, ctid: str = CTID) -> str:
    result = vm.run(["vzpy", "status", "--json", ctid])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return str(data["status"]) if data["exist"] else "absent"


@pytest.fixture
def echo_ct(lab: Lab, vm1: LabVM, vm2: LabVM) -> Iterator[tuple[str, EchoStream]]:
    """CT 101 (minimal template) in vm1 with a busybox echo service, and a connection to it from the lab netns."""
    ip = lab.new_ct_address()
    vm1.run(["vzpy", "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "ct.lab"], check=True)
    service = f"/vz/private/{CTID}/etc/vzpy/services/echo"
    script = f"#!/bin/sh\nexec nc -ll -p {ECHO_PORT} -e cat\n"
    vm1.run(["sh", "-c", f"cat > {service} && chmod 755 {service}"], input=script, check=True)
    echo: EchoStream | None = None
    try:
        vm1.run(["vzpy", "start", CTID], check=True)
        echo = _connect_when_listening(lab, ip)
        echo.exchange(16 * 1024)
        yield ip, echo
    finally:
        if echo is not None:
            echo.close()
        for vm in (vm1, vm2):
            vm.remove_ct(CTID)


def _connect_when_listening(lab: Lab, ip: str) -> EchoStream:
    """The CT's service starts after `vzpy start` returns: retry the connection for a while."""
    last: OSError | None = None
    for _ in range(30):
        try:
            return EchoStream(ip, ECHO_PORT, timeout=60, connect=lambda a, t: lab.client_connect(a[0], a[1], t))
        except OSError as e:
            last = e
            time.sleep(1)
    raise AssertionError(f"no echo service at {ip}:{ECHO_PORT}: {last}")


def test_guests_run_the_stock_kernel_and_reach_each_other(lab: Lab, vm1: LabVM, vm2: LabVM) -> None:
    for vm, other in ((vm1, vm2), (vm2, vm1)):
        assert vm.run(["uname", "-r"], check=True).stdout.strip().endswith("-cloud-amd64")
        assert vm.run(["cat", "/proc/sys/net/ipv4/ip_forward"], check=True).stdout.strip() == "1"
        # what vzpy migrate does: root ssh to the other guest, strict host keys, the default key
        hop = vm.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", other.ssh_target, "hostname"])
        assert hop.returncode == 0, hop.stderr
        assert hop.stdout.strip() == f"vzpy-lab-{other.name}"
    for vm in (vm1, vm2):
        lab.client_connect(vm.address, 22).close()  # the client endpoint (lab netns) reaches both


@pytest.mark.parametrize("feature", ["mem_dirty_track", "uffd-noncoop"])
def test_criu_has_what_pre_copy_and_post_copy_need(vm1: LabVM, vm2: LabVM, feature: str) -> None:
    for vm in (vm1, vm2):
        result = vm.run([CRIU, "check", "--feature", feature])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{feature} is supported" in result.stdout + result.stderr


def test_vzpy_check_runs_the_checkout_in_the_guest(vm1: LabVM) -> None:
    result = vm1.run(["vzpy", "check", "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report, result.stdout
    where = vm1.run(["/opt/vzpy/venv/bin/python3", "-c", "import vzpy; print(vzpy.__file__)"], check=True)
    assert where.stdout.startswith("/opt/vzpy/checkout/src/vzpy/")


def test_checkpoint_and_restore_in_a_guest(vm1: LabVM, echo_ct: tuple[str, EchoStream]) -> None:
    _ip, echo = echo_ct
    chkpnt = vm1.run(["vzpy", "chkpnt", CTID])
    assert chkpnt.returncode == 0, chkpnt.stdout + chkpnt.stderr
    assert status(vm1) != "running"
    restore = vm1.run(["vzpy", "restore", CTID])
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert status(vm1) == "running"
    echo.exchange(16 * 1024)  # the same TCP connection, restored with the CT


def test_online_migration_from_one_guest_to_the_other(vm1: LabVM, vm2: LabVM, echo_ct: tuple[str, EchoStream]) -> None:
    _ip, echo = echo_ct
    # --max-frozen: an emulated CPU shared with other work is slow, and this test is about the lab, not speed
    migrate = ["vzpy", "migrate", "--online", "--stop-and-copy", "--max-frozen", "900", "--json", vm2.address, CTID]
    result = vm1.run(migrate, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["path"].startswith("stop-and-copy"), summary
    assert summary["frozen_seconds"] > 0, summary
    assert status(vm2) == "running" and status(vm1) == "absent"
    echo.exchange(16 * 1024)  # the client's connection followed the CT to vm2
