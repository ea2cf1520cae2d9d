"""The pre-freeze check names a CT task whose parent is outside the CT (the command of a `vzpy exec` still
running): CRIU dumps the init's tree only, so it would be lost with the CT (root-free, over test_dumpable's
fake /proc)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_dumpable import INIT, FakeProc

from vzpy.dumpable import CtView, find_blockers

HELPER = 900  # vzpy's helper: in the host's PID namespace, out of the CT's cgroups


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    fake.init()
    return fake


def with_ppid(fake: FakeProc, pid: int, ppid: int) -> None:
    status = fake.root / str(pid) / "status"
    status.write_text(status.read_text() + f"PPid:\t{ppid}\n")


def test_a_command_whose_parent_is_on_the_host_is_named(proc: FakeProc) -> None:
    proc.task(HELPER, "vzpy", pidns="host")
    proc.task(1001, "memd", parent=HELPER, inner=7, sid=7)
    with_ppid(proc, 1001, HELPER)
    with_ppid(proc, INIT, HELPER)  # the init's parent is on the host too: that is what an init is
    proc.task(1002, "sleep", parent=INIT)
    with_ppid(proc, 1002, INIT)
    [blocker] = find_blockers(CtView(INIT, proc=proc.root), [INIT, 1001, 1002], can_dump_other_uids=True)
    assert (blocker.pid, blocker.reason) == (1001, "parent")
    assert blocker.message.startswith("pid 1001 (memd, pid 7 in the CT) was started by a `vzpy exec`")
    assert "\n" not in blocker.message


def test_a_command_whose_parent_exited_meanwhile_is_the_inits(proc: FakeProc) -> None:
    proc.task(1001, "memd", inner=7, sid=7)
    with_ppid(proc, 1001, 4242)  # gone: the kernel hands the task to the CT's init
    assert find_blockers(CtView(INIT, proc=proc.root), [INIT, 1001], can_dump_other_uids=True) == []
