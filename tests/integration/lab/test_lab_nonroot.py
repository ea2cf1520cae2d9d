"""Services running as non-root users, on a host whose root has CAP_SYS_RESOURCE (the VM lab): the common
CT (redis, nginx workers, postgres) that this machine cannot checkpoint ("Can't get rlimit 0").

The CT runs the fidelity workload without -r (its credentials child changes to uid 1234 for real) and a
daemon started as operators start them: `vzpy exec` running `su` to `nobody`. Both survive a local
chkpnt/restore and an online migration, every fidelity item checked, and the daemon still runs as nobody."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy_lab.vm.lab import Lab, LabVM
from vzpy_lab.workload.build import build_dirtier, build_fidelity
from vzpy_lab.workload.client import (
    ITEMS,
    EchoStream,
    FidelityClient,
    dirtier_generation,
    failures,
    wait_for_dirtier,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]
CTID = "141"
PORT = 7000
DIRTIER_PORT = 7100
NOBODY = 65534


NonrootCt = tuple[str, FidelityClient, EchoStream]


def uids_of(vm: LabVM, comm: str) -> set[int]:
    """The real uids of the CT's processes named `comm` (their /proc status, read inside the CT)."""
    script = f"grep -l '^Name:[[:space:]]{comm}$' /proc/[0-9]*/status | xargs -r grep -h '^Uid:'"
    found = vm.run(["vzpy", "exec", CTID, "sh", "-c", script], check=True).stdout.splitlines()
    return {int(line.split()[1]) for line in found}


def dirtier_ok(lab: Lab, ip: str) -> None:
    dirtier_generation(ip, DIRTIER_PORT, lab.connector())


def assert_all_ok(client: FidelityClient) -> None:
    result = client.verify()
    assert set(result) == set(ITEMS)
    assert failures(result) == {}, failures(result)


@pytest.fixture
def nonroot_ct(lab: Lab, vm1: LabVM, vm2: LabVM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NonrootCt]:
    workdir: Path = tmp_path_factory.getbasetemp() / "workload"
    ip = lab.new_ct_address()
    private = f"/vz/private/{CTID}"
    vm1.run(["vzpy", "create", CTID, "--ostemplate", "minimal", "--ipadd", ip], check=True)
    try:
        vm1.copy_in(build_fidelity(workdir), f"{private}/usr/bin/fidelity")
        vm1.copy_in(build_dirtier(workdir), f"{private}/usr/bin/dirtier")
        service = f"{private}/etc/vzpy/services/fidelity"
        script = f"#!/bin/sh\nexec /usr/bin/fidelity {PORT}\n"  # no -r: the credentials child becomes uid 1234
        vm1.run(["sh", "-c", f"cat > {service} && chmod 755 {service}"], input=script, check=True)
        vm1.run(["vzpy", "start", CTID], check=True)
        daemon = f"su -s /bin/sh -c 'exec /usr/bin/dirtier {DIRTIER_PORT}' nobody"
        vm1.run(["vzpy", "exec", CTID, "sh", "-c", f"{daemon} </dev/null >/dev/null 2>&1 &"], check=True)
        client = FidelityClient(ip, PORT, timeout=120, connect=lab.connector())
        client.wait_ready(timeout=120)
        wait_for_dirtier(ip, DIRTIER_PORT, lab.connector())
        with EchoStream(ip, PORT + 1, timeout=120, connect=lab.connector()) as echo:
            echo.exchange(16 * 1024)
            yield ip, client, echo
    finally:
        for vm in (vm1, vm2):
            vm.remove_ct(CTID)


def test_non_root_services_checkpoint_and_restore(lab: Lab, vm1: LabVM, nonroot_ct: NonrootCt) -> None:
    ip, client, echo = nonroot_ct
    assert uids_of(vm1, "dirtier") == {NOBODY}
    assert_all_ok(client)
    dumped = vm1.run(["vzpy", "chkpnt", CTID], timeout=900)
    assert dumped.returncode == 0, dumped.stdout + dumped.stderr
    restored = vm1.run(["vzpy", "restore", CTID], timeout=900)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert_all_ok(client)  # the credentials item: the child's uids/gids are 1234 again
    assert uids_of(vm1, "dirtier") == {NOBODY}
    dirtier_ok(lab, ip)
    echo.exchange(64 * 1024)


def test_non_root_services_migrate_there_with_pre_copy_and_back_with_post_copy(
    lab: Lab, vm1: LabVM, vm2: LabVM, nonroot_ct: NonrootCt
) -> None:
    ip, client, echo = nonroot_ct
    moved = vm1.run(["vzpy", "migrate", "--online", "--max-frozen", "600", vm2.address, CTID], timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert_all_ok(client)
    assert uids_of(vm2, "dirtier") == {NOBODY}
    dirtier_ok(lab, ip)
    echo.exchange(64 * 1024)
    # and back with post-copy: fidelity's unlinked-but-linked file needs CRIU's link-remap file there, which
    # its lazy dump deletes before it serves pages (vzpy puts it back before the final sync)
    back = vm2.run(["vzpy", "migrate", "--online", "--postcopy", "--max-frozen", "600", vm1.address, CTID], timeout=900)
    assert back.returncode == 0, back.stdout + back.stderr
    assert_all_ok(client)
    assert uids_of(vm1, "dirtier") == {NOBODY}
    dirtier_ok(lab, ip)
    echo.exchange(64 * 1024)
