"""vzctl's semantics the lifecycle commands keep, root-free: the status line, a dump waiting for `start`,
the stop timeout."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import write_vz_conf
from vzpy import lifecycle, stage
from vzpy.cli import display
from vzpy.cli.lifecycle import waiting_dump
from vzpy.config import GlobalConfig
from vzpy.container import Container, RunState
from vzpy.stage import Stage


@pytest.fixture
def ct(tmp_path: Path) -> Container:
    conf = write_vz_conf(tmp_path / "vz.conf", tmp_path / "vz", CGROUP_PARENT="vzpy-unit-none")
    return Container("101", GlobalConfig.load(conf))


@pytest.mark.parametrize(
    ("exists", "mounted", "running", "suspended", "line"),
    [
        (True, True, True, False, "CTID 101 exist mounted running"),
        (True, False, False, False, "CTID 101 exist unmounted down"),
        (True, False, False, True, "CTID 101 exist unmounted down suspended"),  # vzctl's sixth word
        (False, False, False, False, "CTID 101 deleted unmounted down"),
    ],
)
def test_status_line_is_vzctls(exists: bool, mounted: bool, running: bool, suspended: bool, line: str) -> None:
    assert display.status_line("101", exists=exists, mounted=mounted, running=running, suspended=suspended) == line


def test_a_dump_waits_after_chkpnt_until_a_start_or_restore(ct: Container, tmp_path: Path) -> None:
    dump = tmp_path / "Dump.101"
    dump.write_bytes(b"dump")
    state = RunState(stage=Stage.DUMPED, init_pid=4242, dumpfile=str(dump), veth="veth101.0")
    stage.persist(ct, state, Stage.STOPPED)  # what chkpnt --kill leaves
    assert ct.load_state() == RunState(stage=Stage.STOPPED, dumpfile=str(dump), updated=ct.load_state().updated)
    assert ct.stage() is Stage.STOPPED
    assert waiting_dump(ct) == dump
    dump.unlink()
    assert waiting_dump(ct) is None  # removed by the operator: nothing waits


def test_a_stop_without_a_dump_leaves_no_state(ct: Container) -> None:
    stage.persist(ct, RunState(stage=Stage.RUNNING, init_pid=4242), Stage.STOPPED)
    assert not ct.state_path.exists()
    assert waiting_dump(ct) is None


@pytest.mark.parametrize(("configured", "seconds"), [(None, 120.0), (0, 120.0), (30, 30.0), (1, 1.0)])
def test_stop_timeout_is_vzctls(configured: int | None, seconds: float) -> None:
    """STOP_TIMEOUT as vzctl reads it: unset or 0 is the default, 120 s."""
    assert lifecycle.stop_timeout(SimpleNamespace(stop_timeout=configured)) == seconds  # type: ignore[arg-type]
