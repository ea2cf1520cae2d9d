"""The one way into a stage action and the way back after a vzpy killed half-way: `enter` persists the target
with the action pending before anything happens, `note`/`commit`/`remember`/`persist` write what they say,
`plan` checks a whole sequence first, a CT whose migration is in doubt cannot be run here, and `settled`
turns a persisted state and what the host shows into the stage recovery starts from. State files are real
(a temporary LOCKDIR); only what the host shows of the CT's processes and freezer is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vzpy import stage
from vzpy.config import GLOBAL_DEFAULTS, GlobalConfig
from vzpy.container import Container, RunState
from vzpy.errors import MigrationInDoubt, WrongStage
from vzpy.stage import Action, Facts, Stage, settled

ALIVE = Facts(init_alive=True, has_tasks=True, frozen=False)
ALIVE_FROZEN = Facts(init_alive=True, has_tasks=True, frozen=True)
GONE = Facts(init_alive=False, has_tasks=False, frozen=False)
TASKS_WITHOUT_INIT = Facts(init_alive=False, has_tasks=True, frozen=True)


class ShownContainer(Container):
    """A CT whose processes and freezer are as given (no cgroups are looked at); its state file is real.
    Records which states the host was asked about."""

    def __init__(self, gconf: GlobalConfig, shown: Facts) -> None:
        super().__init__("101", gconf)
        self.shown = shown
        self.asked: list[RunState] = []

    def facts(self, state: RunState) -> Facts:
        self.asked.append(state)
        return self.shown


@pytest.fixture
def gconf(tmp_path: Path) -> GlobalConfig:
    values = {**GLOBAL_DEFAULTS, "LOCKDIR": str(tmp_path / "lock"), "CONFDIR": str(tmp_path / "conf")}
    return GlobalConfig(path=tmp_path / "vz.conf", values=values, exists=True)


def ct_at(gconf: GlobalConfig, stage_now: Stage, shown: Facts = ALIVE, **fields: Any) -> ShownContainer:
    ct = ShownContainer(gconf, shown)
    if stage_now is not Stage.STOPPED or fields:
        ct.save_state(RunState(stage=stage_now, **fields))
    return ct


def on_disk(ct: Container) -> dict[str, object]:
    return dict(json.loads(ct.state_path.read_text()))


# --- enter, note, commit ------------------------------------------------------------------------------------------


def test_enter_persists_the_target_with_the_action_pending_before_anything_happens(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.RUNNING, init_pid=7)
    entry = stage.enter(ct, Action.SUSPEND)
    assert (entry.action, entry.source, entry.target) == (Action.SUSPEND, Stage.RUNNING, Stage.SUSPENDED)
    assert entry.ct is ct and entry.state.init_pid == 7
    saved = on_disk(ct)
    assert (saved["stage"], saved["pending"], saved["pending_from"]) == ("suspended", "chkpnt --suspend", "running")
    assert saved["init_pid"] == 7


def test_note_persists_fields_and_keeps_the_action_pending(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.SUSPENDED)
    entry = stage.enter(ct, Action.DUMP)
    entry.note(dumpfile="/vz/dump/Dump.101", link_remaps=["a"])
    saved = on_disk(ct)
    assert (saved["stage"], saved["pending"], saved["pending_from"]) == ("dumped", "chkpnt --dump", "suspended")
    assert (saved["dumpfile"], saved["link_remaps"]) == ("/vz/dump/Dump.101", ["a"])


def test_commit_persists_the_target_and_fields_and_clears_the_pending_mark(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.SUSPENDED)
    entry = stage.enter(ct, Action.DUMP)
    state = entry.commit(dumpfile="/vz/dump/Dump.101")
    assert state is entry.state
    assert (state.stage, state.pending, state.pending_from) == (Stage.DUMPED, "", "")
    saved = on_disk(ct)
    assert (saved["stage"], saved["pending"], saved["pending_from"]) == ("dumped", "", "")
    assert saved["dumpfile"] == "/vz/dump/Dump.101"


def test_committing_a_stop_removes_the_state_file(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.DUMPED, ALIVE_FROZEN)
    entry = stage.enter(ct, Action.KILL)
    assert on_disk(ct)["pending"] == "chkpnt --kill"
    entry.commit()
    assert not ct.state_path.exists()


def test_a_stop_that_keeps_a_dump_replaces_the_state_in_one_step(
    gconf: GlobalConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of the dump that waits for `start` is renamed over the old state, never written after the
    file was removed: a crash in between would forget the dump (and the removal cost a directory sync)."""
    ct = ct_at(gconf, Stage.DUMPED, ALIVE_FROZEN, dumpfile="/vz/dump/Dump.101", init_pid=7, veth="veth101.0")
    entry = stage.enter(ct, Action.KILL)
    removed: list[bool] = []
    monkeypatch.setattr(ct, "clear_state", lambda: removed.append(True))
    entry.commit()
    assert removed == []
    saved = on_disk(ct)
    assert (saved["stage"], saved["pending"], saved["dumpfile"]) == ("stopped", "", "/vz/dump/Dump.101")
    assert (saved["init_pid"], saved["veth"]) == (0, "")  # only the dump is kept


def test_a_pending_stop_is_kept_on_disk_until_it_is_done(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.RUNNING)
    state = ct.load_state()
    stage.persist(ct, state, Stage.STOPPED, pending=True)
    assert on_disk(ct)["stage"] == "stopped"
    stage.persist(ct, state, Stage.STOPPED)
    assert not ct.state_path.exists()


def test_an_action_out_of_order_is_refused_and_changes_nothing(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.RUNNING)
    before = ct.state_path.read_text()
    with pytest.raises(WrongStage, match="CT 101 is running: `chkpnt --dump` is not allowed now"):
        stage.enter(ct, Action.DUMP)
    assert ct.state_path.read_text() == before


def test_remember_persists_facts_but_not_the_stage(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.DUMPED, ALIVE_FROZEN)
    state = ct.load_state()
    stage.remember(ct, state, link_remaps=["x", "y"], dumpfile="/d")
    saved = on_disk(ct)
    assert (saved["stage"], saved["link_remaps"], saved["dumpfile"]) == ("dumped", ["x", "y"], "/d")


def test_current_gives_the_state_and_its_real_stage(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.RUNNING, ALIVE_FROZEN, init_pid=9)
    state, real = stage.current(ct)
    assert (state.init_pid, real) == (9, Stage.SUSPENDED)
    assert ct.asked == [state], "the host is asked about the state just loaded"


# --- plan ---------------------------------------------------------------------------------------------------------


def test_plan_checks_the_whole_sequence_from_the_real_stage(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.RUNNING)
    before = ct.state_path.read_text()
    assert stage.plan(ct, [Action.SUSPEND, Action.DUMP, Action.KILL]) is Stage.STOPPED
    with pytest.raises(WrongStage, match="CT 101 is dumped: `chkpnt --suspend` is not allowed now"):
        stage.plan(ct, [Action.SUSPEND, Action.DUMP, Action.SUSPEND])
    assert ct.state_path.read_text() == before


def test_check_sequence_ends_where_the_actions_lead() -> None:
    assert stage.check_sequence("101", Stage.STOPPED, []) is Stage.STOPPED
    assert stage.check_sequence("101", Stage.STOPPED, [Action.UNDUMP, Action.RESTORE_RESUME]) is Stage.RUNNING
    with pytest.raises(WrongStage, match="CT 7 is undumped: `restore --undump` is not allowed now"):
        stage.check_sequence("7", Stage.STOPPED, [Action.UNDUMP, Action.UNDUMP])


# --- a migration in doubt -----------------------------------------------------------------------------------------


def write_marker(ct: Container, text: str) -> Path:
    marker = stage.migration_marker(ct)
    assert marker == ct.gconf.lockdir / "101.migration.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(text)
    return marker


@pytest.mark.parametrize(
    ("text", "host"),
    [('{"host": "dst.example"}', "dst.example"), ("{}", "the destination"), ("not json", "HOST"), ("[1]", "HOST")],
)
def test_a_ct_whose_migration_is_in_doubt_cannot_run_here(gconf: GlobalConfig, text: str, host: str) -> None:
    ct = ct_at(gconf, Stage.STOPPED, GONE)
    marker = write_marker(ct, text)
    with pytest.raises(MigrationInDoubt) as info:
        stage.enter(ct, Action.START)
    assert info.value.message == (
        f"CT 101 may already run on {host}: its migration's outcome is unknown ({marker}); "
        f"run `vzpy migrate --recover {host} 101` first"
    )
    assert not ct.state_path.exists()
    with pytest.raises(MigrationInDoubt):
        stage.plan(ct, [Action.UNDUMP, Action.RESTORE_RESUME])


def test_a_migration_in_doubt_still_lets_the_ct_here_be_stopped(gconf: GlobalConfig) -> None:
    ct = ct_at(gconf, Stage.SUSPENDED, ALIVE_FROZEN)
    write_marker(ct, '{"host": "dst.example"}')
    assert stage.plan(ct, [Action.STOP]) is Stage.STOPPED
    assert stage.enter(ct, Action.STOP).target is Stage.STOPPED
    with pytest.raises(MigrationInDoubt):
        stage.enter(ct, Action.RESUME)


# --- settled: the stage recovery starts from ----------------------------------------------------------------------


def state_of(stage_now: Stage, pending: str = "", pending_from: str = "") -> RunState:
    return RunState(stage=stage_now, pending=pending, pending_from=pending_from)


@pytest.mark.parametrize("pending", ["restore --undump", "undump"])  # "undump": state files of older vzpy
def test_a_half_done_undump_is_undumped_while_it_has_processes(pending: str) -> None:
    state = state_of(Stage.UNDUMPED, pending, "stopped")
    assert settled(state, TASKS_WITHOUT_INIT) is Stage.UNDUMPED
    assert settled(state, GONE) is Stage.STOPPED


def test_a_half_done_action_settles_to_the_stage_it_started_from_while_the_ct_lives() -> None:
    state = state_of(Stage.DUMPED, "chkpnt --dump", "suspended")
    assert settled(state, ALIVE_FROZEN) is Stage.SUSPENDED
    assert settled(state, GONE) is Stage.STOPPED


def test_a_half_done_suspend_is_suspended() -> None:
    assert settled(state_of(Stage.SUSPENDED, "chkpnt --suspend", "running"), ALIVE) is Stage.SUSPENDED


def test_a_pending_from_without_a_pending_action_is_ignored() -> None:
    assert settled(state_of(Stage.DUMPED, "", "running"), ALIVE_FROZEN) is Stage.DUMPED


def test_only_a_running_ct_found_frozen_is_suspended() -> None:
    assert settled(state_of(Stage.RUNNING), ALIVE_FROZEN) is Stage.SUSPENDED
    assert settled(state_of(Stage.RUNNING), ALIVE) is Stage.RUNNING
    assert settled(state_of(Stage.DUMPED), ALIVE_FROZEN) is Stage.DUMPED
    assert settled(state_of(Stage.UNDUMPED), ALIVE_FROZEN) is Stage.UNDUMPED


def test_a_pending_action_of_an_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="'chkpnt --teleport' is not a valid Action"):
        stage.pending_action(state_of(Stage.RUNNING, "chkpnt --teleport"))
    assert stage.pending_action(state_of(Stage.RUNNING)) is None
    assert stage.pending_action(state_of(Stage.DUMPED, "chkpnt --dump")) is Action.DUMP
