"""A restore leaves the host's cgroups alone: CRIU dumps only the hierarchies that hold the CT's own cgroups
(vzpy.runtime.cgroups.ct_hierarchies). In every other one the CT sits in the root cgroup, and a dump of
that records the host's whole tree, which `--manage-cgroups=soft` recreates at restore."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root
CTID = "148"


def test_a_host_cgroup_removed_after_the_dump_stays_removed(vzroot: VzRoot) -> None:
    vz = vzroot
    vz.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vz.new_ip(), check=True)
    vz.add_service(CTID, "sleeper", "exec sleep 1000")
    vz.run("start", CTID, check=True)
    probe = Path("/sys/fs/cgroup/blkio") / f"vzpy-probe-{secrets.token_hex(4)}"
    probe.mkdir()
    try:
        vz.run("chkpnt", CTID, check=True)
        probe.rmdir()
        vz.run("restore", CTID, check=True)
        assert not probe.exists(), "the restore recreated a host cgroup the dump had seen"
        cgroups = Path(f"/proc/{vz.state(CTID)['init_pid']}/cgroup").read_text()
        assert f"freezer:/{vz.cgroup_parent}/{CTID}" in cgroups
    finally:
        if probe.exists():
            probe.rmdir()
