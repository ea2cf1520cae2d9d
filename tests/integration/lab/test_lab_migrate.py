"""The migration ladder on hosts with a stock kernel (the VM lab): path selection explained, pre-copy with
iterations while the CT keeps rewriting a small part of its memory, post-copy back, and the rollback at each
step pre-copy and post-copy added. A client in the lab keeps an established TCP connection to the CT
throughout, and the workload checks every page of its memory after each move (vzpy_lab/workload/dirtier.c)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy_lab.vm.lab import Lab, LabVM
from vzpy_lab.workload.build import build_dirtier
from vzpy_lab.workload.client import EchoStream, dirtier_generation, wait_for_dirtier

pytestmark = [pytest.mark.root, pytest.mark.slow]
CTID = "131"
DIRTIER_PORT = 7100
ECHO_PORT = 7101


@pytest.fixture(scope="module")
def dirtier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dirtier(tmp_path_factory.mktemp("dirtier"))


def status(vm: LabVM) -> str:
    result = vm.run(["vzpy", "status", "--json", CTID])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return str(data["status"]) if data["exist"] else "absent"


def memory_intact(lab: Lab, ip: str) -> int:
    """Every page of the workload's memory holds what it must; its rewrite generation."""
    return dirtier_generation(ip, DIRTIER_PORT, lab.connector())


def connect(lab: Lab, vm: LabVM, ip: str) -> EchoStream:
    """The CT's services start after `vzpy start` returns: retry for a while."""
    last: OSError | None = None
    for _ in range(60):
        try:
            return EchoStream(ip, ECHO_PORT, timeout=120, connect=lab.connector())
        except OSError as e:
            last = e
            vm.run(["sleep", "1"])
    raise AssertionError(f"no echo service at {ip}:{ECHO_PORT}: {last}")


@pytest.fixture
def dirty_ct(lab: Lab, vm1: LabVM, vm2: LabVM, dirtier: Path) -> Iterator[tuple[str, EchoStream]]:
    """CT 131 in vm1: the dirtier (32 MiB, 16 pages rewritten every 20 ms) and an echo service, with a
    connection to it from the lab netns."""
    ip = lab.new_ct_address()
    vm1.run(["vzpy", "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "dirty.lab"], check=True)
    private = f"/vz/private/{CTID}"
    try:
        vm1.copy_in(dirtier, f"{private}/usr/bin/dirtier")
        services = {
            "dirtier": f"#!/bin/sh\nexec /usr/bin/dirtier {DIRTIER_PORT}\n",
            "echo": f"#!/bin/sh\nexec nc -ll -p {ECHO_PORT} -e cat\n",
        }
        for name, script in services.items():
            path = f"{private}/etc/vzpy/services/{name}"
            vm1.run(["sh", "-c", f"cat > {path} && chmod 755 {path}"], input=script, check=True)
        vm1.run(["vzpy", "start", CTID], check=True)
        echo = connect(lab, vm1, ip)
        echo.exchange(16 * 1024)
        wait_for_dirtier(ip, DIRTIER_PORT, lab.connector())  # it may start after the echo service
        yield ip, echo
        echo.close()
    finally:
        for vm in (vm1, vm2):
            vm.remove_ct(CTID)


def migrate(vm: LabVM, to: LabVM, *args: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    env = ["env", f"VZPY_MIGRATE_FAULT={fault}"] if fault else []
    # TCG is 10-50x slower than a real host: the frozen part takes seconds, not the default budget
    return vm.run([*env, "vzpy", "migrate", "--online", "--max-frozen", "600", *args, to.address, CTID], timeout=900)


def test_check_and_check_only_say_which_path_and_why(vm1: LabVM, vm2: LabVM, dirty_ct: tuple[str, EchoStream]) -> None:
    check = vm1.run(["vzpy", "check", "--json", "--to", vm2.address])
    assert check.returncode == 0, check.stderr
    migration = json.loads(check.stdout)["migration"]
    assert migration["path"] == "pre-copy" and set(migration["possible"]) == {"pre-copy", "post-copy", "stop-and-copy"}
    assert any("--postcopy" in reason for reason in migration["reasons"]), migration
    only = migrate(vm1, vm2, "--check-only")
    assert only.returncode == 0, only.stderr
    assert "would take pre-copy" in only.stdout + only.stderr
    asked = migrate(vm1, vm2, "--check-only", "--postcopy")
    assert asked.returncode == 0 and "would take post-copy" in asked.stdout + asked.stderr
    assert status(vm1) == "running" and status(vm2) == "absent"


def test_pre_copy_there_and_post_copy_back(lab: Lab, vm1: LabVM, vm2: LabVM, dirty_ct: tuple[str, EchoStream]) -> None:
    ip, echo = dirty_ct
    before = memory_intact(lab, ip)
    there = migrate(vm1, vm2, "--json")
    assert there.returncode == 0, there.stdout + there.stderr
    summary = json.loads(there.stdout)
    assert summary["path"] == "pre-copy", summary
    assert len(summary["iterations"]) >= 2, summary
    assert summary["pages_while_frozen"] <= 0.1 * summary["pages_total"], summary
    assert summary["iterations"][0]["pages"] >= (32 << 20) // 4096, summary  # the first round: all of it
    assert status(vm2) == "running" and status(vm1) == "absent"
    assert memory_intact(lab, ip) > before  # every page right, and it kept rewriting on vm2
    echo.exchange(64 * 1024)  # the same TCP connection

    back = migrate(vm2, vm1, "--json", "--postcopy")
    assert back.returncode == 0, back.stdout + back.stderr
    summary = json.loads(back.stdout)
    assert summary["path"] == "post-copy", summary
    assert summary["pages_total"] > summary["pages_while_frozen"], summary  # most pages went after the restore
    assert status(vm1) == "running" and status(vm2) == "absent"
    memory_intact(lab, ip)
    echo.exchange(64 * 1024)
    for vm in (vm1, vm2):
        left = vm.run(["sh", "-c", f"ls -d /vz/dump/Migrate.{CTID} /vz/dump/.vzpy-migrate-{CTID}-* 2>/dev/null"])
        assert left.stdout.strip() == "", f"{vm.name}: {left.stdout}"


@pytest.mark.parametrize(
    ("step", "path"),
    [
        ("precopy", "--precopy"),
        ("lazy-dump", "--postcopy"),
        ("final-sync", "--postcopy"),
        ("lazy-restore", "--postcopy"),
    ],
)
def test_a_failure_at_a_new_step_leaves_the_ct_running_here_and_nothing_there(
    lab: Lab, vm1: LabVM, vm2: LabVM, dirty_ct: tuple[str, EchoStream], step: str, path: str
) -> None:
    ip, echo = dirty_ct
    result = migrate(vm1, vm2, path, fault=f"source:fail:{step}")
    assert result.returncode == 6, result.stdout + result.stderr  # the injected failure's code
    assert "injected fault" in result.stderr
    assert status(vm1) == "running" and status(vm2) == "absent"
    assert vm2.run(["test", "-e", f"/vz/dump/Migrate.{CTID}"]).returncode != 0, "destination images left"
    assert vm1.run(["test", "-e", f"/vz/lock/{CTID}.migration.json"]).returncode != 0, "marker left"
    memory_intact(lab, ip)
    echo.exchange(16 * 1024)


def test_a_pre_copy_killed_mid_way_is_recovered(
    lab: Lab, vm1: LabVM, vm2: LabVM, dirty_ct: tuple[str, EchoStream]
) -> None:
    """vzpy killed (SIGKILL) after the pre-dumps: the CT never stopped running here; --recover cleans vm2."""
    ip, echo = dirty_ct
    killed = migrate(vm1, vm2, "--precopy", fault="source:after:precopy")
    assert killed.returncode != 0
    assert status(vm1) == "running"
    recovered = vm1.run(["vzpy", "migrate", "--recover", vm2.address, CTID])
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert status(vm1) == "running" and status(vm2) == "absent"
    assert vm2.run(["test", "-e", f"/vz/dump/Migrate.{CTID}"]).returncode != 0
    memory_intact(lab, ip)
    echo.exchange(16 * 1024)
