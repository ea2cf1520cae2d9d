"""The boot service's plans (vzpy.boot): which CT gets what at boot and at shutdown, in which order, and that
one CT's failure neither stops the others nor goes unreported. Pure logic: facts in, tasks out; the runner
that would start vzpy processes is a recording stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy import boot
from vzpy.boot import CtFacts, Outcome, Step, StopMode, Task
from vzpy.config import GlobalConfig
from vzpy.container import Container, RunState
from vzpy.errors import CommandFailed
from vzpy.stage import Stage


def _plan_boot(*facts: CtFacts) -> list[tuple[str, Step]]:
    return [(t.ctid, t.step) for t in boot.boot_plan(facts, lambda _: None)]


def _dump(ctid: str) -> Path:
    return Path(f"/vz/dump/Dump.{ctid}")


def test_boot_starts_onboot_yes_only() -> None:
    assert _plan_boot(CtFacts("101", onboot=True), CtFacts("102", onboot=False), CtFacts("103")) == [
        ("101", Step.START)
    ]


def test_boot_restores_what_shutdown_checkpointed_even_without_onboot() -> None:
    plan = boot.boot_plan([CtFacts("101", boot_dump=_dump("101"))], lambda _: None)
    assert plan == [Task("101", Step.RESTORE, _dump("101"))]
    assert plan[0].argv() == ["restore", "101", "--dumpfile", "/vz/dump/Dump.101"]


def test_boot_order_is_higher_bootorder_first_unset_last() -> None:
    facts = [
        CtFacts("101", onboot=True),
        CtFacts("102", onboot=True, bootorder=5),
        CtFacts("103", onboot=True, bootorder=50),
        CtFacts("104", onboot=True),
        CtFacts("105", onboot=True, bootorder=5),
    ]
    assert [ctid for ctid, _ in _plan_boot(*facts)] == ["103", "102", "105", "101", "104"]


def test_boot_leaves_running_disabled_and_unreadable_cts_alone() -> None:
    said: list[str] = []
    facts = [
        CtFacts("101", onboot=True, stage=Stage.RUNNING),
        CtFacts("102", onboot=True, disabled=True, boot_dump=_dump("102")),
        CtFacts("103", boot_dump=_dump("103"), problem="bad line"),
    ]
    assert boot.boot_plan(facts, said.append) == []
    assert any("101" in s and "already running" in s for s in said)
    assert any("102" in s and "DISABLED" in s and "kept" in s for s in said)
    assert any("103" in s and "bad line" in s for s in said)


def test_shutdown_suspend_mode_checkpoints_running_and_stops_half_done_in_reverse_boot_order() -> None:
    facts = [
        CtFacts("101", stage=Stage.RUNNING, bootorder=10),
        CtFacts("102", stage=Stage.RUNNING),
        CtFacts("103", stage=Stage.STOPPED),
        CtFacts("104", stage=Stage.SUSPENDED, bootorder=20),
    ]
    plan = boot.shutdown_plan(facts, StopMode.SUSPEND, _dump)
    assert plan == [
        Task("102", Step.CHKPNT, _dump("102")),
        Task("101", Step.CHKPNT, _dump("101")),
        Task("104", Step.STOP),
    ]


def test_shutdown_stop_mode_stops_every_live_ct() -> None:
    facts = [CtFacts("101", stage=Stage.RUNNING), CtFacts("102", stage=Stage.DUMPED), CtFacts("103")]
    assert boot.shutdown_plan(facts, StopMode.STOP, _dump) == [Task("102", Step.STOP), Task("101", Step.STOP)]


def test_stop_mode_defaults_to_suspend_and_takes_garbage_as_suspend_with_a_warning(tmp_path: Path) -> None:
    def mode(**values: str) -> tuple[StopMode, list[str]]:
        warnings: list[str] = []
        gconf = GlobalConfig(path=tmp_path / "vz.conf", values={"LOCKDIR": str(tmp_path), **values}, exists=True)
        return boot.stop_mode(gconf, warnings.append), warnings

    assert mode() == (StopMode.SUSPEND, [])
    assert mode(VE_STOP_MODE="stop") == (StopMode.STOP, [])
    chosen, warnings = mode(VE_STOP_MODE="hibernate")
    assert chosen is StopMode.SUSPEND and "VE_STOP_MODE" in warnings[0] and "hibernate" in warnings[0]


class FakeCt:
    """What boot/shutdown read of a Container: its facts come from `facts`, its paths from a tmp root."""

    def __init__(self, gconf: GlobalConfig, ctid: str) -> None:
        self.gconf = gconf
        self.ctid = ctid
        self.default_dumpfile = gconf.dumpdir / f"Dump.{ctid}"

    def load_state(self) -> RunState:
        return RunState(updated=1234.5)


def test_shutdown_goes_on_after_a_failure_falls_back_to_stop_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gconf = GlobalConfig(
        path=tmp_path / "vz.conf",
        values={"LOCKDIR": str(tmp_path / "lock"), "DUMPDIR": str(tmp_path / "dump")},
        exists=True,
    )
    facts = {c: CtFacts(c, stage=Stage.RUNNING) for c in ("101", "102", "103")}
    monkeypatch.setattr(boot, "read_facts", lambda ct: facts[ct.ctid])
    ran: list[list[str]] = []

    def runner(task: Task) -> Outcome:
        ran.append(task.argv())
        return Outcome(task, 16 if (task.ctid, task.step) == ("102", Step.CHKPNT) else 0, "CRIU said no")

    cts = [FakeCt(gconf, c) for c in facts]
    outcomes = boot.shutdown(gconf, cts, StopMode.SUSPEND, runner, lambda _: None)  # type: ignore[arg-type]
    assert [a[:2] for a in ran] == [["chkpnt", "103"], ["chkpnt", "102"], ["stop", "102"], ["chkpnt", "101"]]
    assert [o.ok for o in outcomes] == [True, False, True]
    # the checkpointed ones are marked for the boot; the one stopped instead is not
    assert boot._read_marker(boot.marker_path(gconf, "103")) == boot.BootDump(gconf.dumpdir / "Dump.103", 1234.5)
    assert not boot.marker_path(gconf, "102").exists()
    with pytest.raises(CommandFailed, match=r"1 of 3 CTs failed: 102 \(chkpnt: exit 16\)"):
        boot.check_outcomes("boot stop", outcomes)


def test_boot_forgets_a_used_dump_keeps_a_failed_one_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gconf = GlobalConfig(
        path=tmp_path / "vz.conf",
        values={"LOCKDIR": str(tmp_path / "lock"), "DUMPDIR": str(tmp_path / "dump")},
        exists=True,
    )
    gconf.dumpdir.mkdir()
    for ctid in ("101", "102"):
        (gconf.dumpdir / f"Dump.{ctid}").write_text("dump")
        boot.write_marker(gconf, ctid, gconf.dumpdir / f"Dump.{ctid}", 1.0)
    facts = {c: CtFacts(c, boot_dump=gconf.dumpdir / f"Dump.{c}") for c in ("101", "102")}
    facts["103"] = CtFacts("103", onboot=True)
    monkeypatch.setattr(boot, "read_facts", lambda ct: facts[ct.ctid])

    def runner(task: Task) -> Outcome:
        return Outcome(task, 17 if task.ctid == "101" else 0)

    cts = [FakeCt(gconf, c) for c in facts]
    outcomes = boot.boot(gconf, cts, runner, lambda _: None)  # type: ignore[arg-type]
    assert [(o.task.ctid, o.task.step, o.ok) for o in outcomes] == [
        ("101", Step.RESTORE, False),
        ("102", Step.RESTORE, True),
        ("103", Step.START, True),
    ]
    assert (gconf.dumpdir / "Dump.101").exists() and boot.marker_path(gconf, "101").exists()
    assert not (gconf.dumpdir / "Dump.102").exists() and not boot.marker_path(gconf, "102").exists()


def test_dry_run_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gconf = GlobalConfig(
        path=tmp_path / "vz.conf", values={"LOCKDIR": str(tmp_path), "DUMPDIR": str(tmp_path)}, exists=True
    )
    monkeypatch.setattr(boot, "read_facts", lambda ct: CtFacts(ct.ctid, stage=Stage.RUNNING))
    said: list[str] = []

    def runner(task: Task) -> Outcome:
        raise AssertionError("a dry run ran something")

    assert boot.shutdown(gconf, [FakeCt(gconf, "101")], StopMode.SUSPEND, runner, said.append, dry_run=True) == []  # type: ignore[list-item]
    assert said == [f"would run: vzpy chkpnt 101 --dumpfile {tmp_path}/Dump.101"]


def test_a_marker_older_than_the_cts_last_change_is_stale(tmp_path: Path) -> None:
    """Started (or restored, stopped) by hand after the shutdown checkpoint: its dump is no longer its state."""
    gconf = GlobalConfig(
        path=tmp_path / "vz.conf",
        values={
            "LOCKDIR": str(tmp_path / "lock"),
            "DUMPDIR": str(tmp_path / "dump"),
            "CONFDIR": str(tmp_path / "conf"),
            "CGROUP_PARENT": "vzpy-unit-test-none",
            "VE_ROOT": str(tmp_path / "root/$VEID"),
            "VE_PRIVATE": str(tmp_path / "private/$VEID"),
        },
        exists=True,
    )
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "101.conf").write_text('ONBOOT="yes"\n')
    ct = Container("101", gconf)
    ct.save_state(RunState())
    dump = tmp_path / "dump" / "Dump.101"
    boot.write_marker(gconf, "101", dump, ct.load_state().updated)
    assert boot.read_facts(ct) == CtFacts("101", onboot=True, boot_dump=dump)
    ct.save_state(RunState())  # any later stage change (start, restore, stop) rewrites the state
    assert boot.read_facts(ct) == CtFacts("101", onboot=True, stale_dump=dump)
    said: list[str] = []
    tasks: list[Task] = []

    def runner(task: Task) -> Outcome:
        tasks.append(task)
        return Outcome(task, 0)

    boot.boot(gconf, [ct], runner, said.append)
    assert tasks == [Task("101", Step.START)]  # ONBOOT=yes still counts; the stale dump does not
    assert not boot.marker_path(gconf, "101").exists()
    assert any("not restored" in line for line in said)
