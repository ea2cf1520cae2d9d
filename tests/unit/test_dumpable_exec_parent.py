"""The pre-freeze check names a CT task whose parent is outside the CT (the command of a `vzpy exec` still
running): CRIU dumps the init's tree only, so it would be lost with the CT (root-free, over test_dumpable's
fake /proc)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_dumpable import INIT, FakeProc

from vzpy import dumpable
from vzpy.dumpable import Blocker, CtView, NotDumpable, find_blockers, require_dumpable

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


EXEC_COMMAND = Blocker(1001, "sleep", "parent", "pid 1001 (sleep) was started by a `vzpy exec`")
HOST_FILE = Blocker(1002, "tail", "host-file", "pid 1002 (tail) has a file of the host open")
CT: Any = SimpleNamespace(ctid="101")


def answers(monkeypatch: pytest.MonkeyPatch, *rounds: list[Blocker]) -> list[int]:
    """Make dumpable.blockers() return each round in turn (the last one from then on); counts the calls."""
    calls: list[int] = []

    def blockers(_ct: object) -> list[Blocker]:
        calls.append(1)
        return rounds[min(len(calls), len(rounds)) - 1]

    monkeypatch.setattr(dumpable, "blockers", blockers)
    monkeypatch.setattr(dumpable, "EXEC_POLL", 0.001)
    return calls


def test_a_vzpy_exec_command_that_ends_within_the_grace_lets_the_chkpnt_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, [EXEC_COMMAND], [EXEC_COMMAND], [])
    require_dumpable(CT, exec_grace=10)
    assert len(calls) == 3


def test_a_vzpy_exec_command_still_running_after_the_grace_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, [EXEC_COMMAND])
    with pytest.raises(NotDumpable, match="was started by a `vzpy exec`"):
        require_dumpable(CT, exec_grace=0.05)
    assert len(calls) > 1


def test_other_blockers_are_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = answers(monkeypatch, [EXEC_COMMAND, HOST_FILE], [])
    with pytest.raises(NotDumpable, match=r"sleep.*\(and 1 more, below\)"):
        require_dumpable(CT, exec_grace=10)
    assert len(calls) == 1
