"""A CT holding a zombie (a child its parent never reaps) checkpoints, restores and runs on: the kernel lists a
zombie among its parent's children but in no cgroup.procs, and the pre-freeze check must not take it for a
process that entered the CT from outside (vzpy.dumpable)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root
CTID = "149"


def _tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += _tree(int(child))
    return found


def _zombies(vz: VzRoot) -> list[int]:
    """The zombies in the CT's process tree, once there is one (a deadline, not a timed assert)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [p for p in _tree(vz.state(CTID)["init_pid"]) if "\nState:\tZ" in Path(f"/proc/{p}/status").read_text()]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the service's zombie never appeared")


def test_a_ct_with_a_zombie_checkpoints_and_restores(vzroot: VzRoot) -> None:
    vz = vzroot
    vz.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vz.new_ip(), check=True)
    # the shell's child exits at once; the shell then becomes sleep, which never reaps it
    vz.add_service(CTID, "zombie-keeper", "sleep 0 &\nexec sleep 1000")
    vz.run("start", CTID, check=True)
    assert _zombies(vz)

    vz.run("chkpnt", CTID, check=True)
    vz.run("restore", CTID, check=True)

    assert json.loads(vz.run("status", "--json", CTID).stdout)["status"] == "running"
    assert _zombies(vz), "the zombie came back with its parent"
