"""A CT's stage as an explicit machine: states, actions, the transitions between them, and the one way in.

The stage is persisted per CT so that staged checkpoint/restore steps compose across separate vzpy
invocations. `enter(ct, action)` is the only place a stage action begins: it loads the CT's state once,
works out the real stage, refuses what the table (or an unfinished migration) does not allow, persists the
target with the action marked pending, and hands the state to the executor, which `commit`s it when done.
A vzpy killed in between leaves the pending mark: `settled` then names the stage from which recovery is
allowed (the source stage, or what the processes show).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzpy.errors import AlreadyRunning, MigrationInDoubt, NotRunning, VzError, WrongStage

if TYPE_CHECKING:
    from vzpy.container import Container, RunState

# What an executor reports to the operator as it goes: one line of text.
Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


class Stage(StrEnum):
    STOPPED = "stopped"
    RUNNING = "running"
    SUSPENDED = "suspended"  # frozen, network locked (chkpnt --suspend)
    DUMPED = "dumped"  # suspended, and its state written to a dump file (chkpnt --dump)
    UNDUMPED = "undumped"  # restored from a dump, still frozen (restore --undump)


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    SUSPEND = "chkpnt --suspend"
    DUMP = "chkpnt --dump"
    KILL = "chkpnt --kill"
    RESUME = "chkpnt --resume"
    UNDUMP = "restore --undump"
    RESTORE_RESUME = "restore --resume"
    RESTORE_KILL = "restore --kill"


TRANSITIONS: dict[tuple[Stage, Action], Stage] = {
    (Stage.STOPPED, Action.START): Stage.RUNNING,
    (Stage.RUNNING, Action.STOP): Stage.STOPPED,
    # stop is the operator's way out of any live stage; it never leaves a CT frozen
    (Stage.SUSPENDED, Action.STOP): Stage.STOPPED,
    (Stage.DUMPED, Action.STOP): Stage.STOPPED,
    (Stage.UNDUMPED, Action.STOP): Stage.STOPPED,
    (Stage.RUNNING, Action.SUSPEND): Stage.SUSPENDED,
    (Stage.SUSPENDED, Action.DUMP): Stage.DUMPED,
    (Stage.DUMPED, Action.KILL): Stage.STOPPED,
    (Stage.SUSPENDED, Action.RESUME): Stage.RUNNING,
    (Stage.DUMPED, Action.RESUME): Stage.RUNNING,
    (Stage.STOPPED, Action.UNDUMP): Stage.UNDUMPED,
    (Stage.UNDUMPED, Action.RESTORE_RESUME): Stage.RUNNING,
    (Stage.UNDUMPED, Action.RESTORE_KILL): Stage.STOPPED,
}

LIVE_STAGES = frozenset({Stage.RUNNING, Stage.SUSPENDED, Stage.DUMPED, Stage.UNDUMPED})
# Actions that would let this host's copy of a CT run: refused while a migration's outcome is unknown,
# since the CT may already run on the destination.
RUNS_THIS_COPY = frozenset({Action.START, Action.RESUME, Action.UNDUMP, Action.RESTORE_RESUME})
# Written by `vzpy migrate` beside the CT's state file while the outcome of a migration is unknown.
MIGRATION_MARKER = "{ctid}.migration.json"
# State files of vzpy versions before `enter` marked a pending undump with this word.
_LEGACY_PENDING = {"undump": Action.UNDUMP}


def allowed_actions(stage: Stage) -> list[Action]:
    return [action for (source, action) in TRANSITIONS if source is stage]


def transition(ctid: str, stage: Stage, action: Action) -> Stage:
    """The stage after `action`, or a typed error naming the current stage and what is allowed."""
    target = TRANSITIONS.get((stage, action))
    if target is not None:
        return target
    raise _wrong_stage(ctid, stage, action)


def check_sequence(ctid: str, stage: Stage, actions: Sequence[Action]) -> Stage:
    """Check a whole sequence of actions from `stage` before doing any; the stage it ends in."""
    for action in actions:
        stage = transition(ctid, stage, action)
    return stage


def _wrong_stage(ctid: str, stage: Stage, action: Action) -> VzError:
    allowed = ", ".join(f"`vzpy {a.value.split()[0]} {ctid}{_flag(a)}`" for a in allowed_actions(stage))
    message = f"CT {ctid} is {stage.value}: `{action.value}` is not allowed now; allowed next: {allowed}"
    # vzctl: start of a live CT, or restore of a running one, is "already running" (VZ_VE_RUNNING)
    if (action is Action.START and stage in LIVE_STAGES) or (action is Action.UNDUMP and stage is Stage.RUNNING):
        return AlreadyRunning(
            f"CT {ctid} is already {stage.value}" + ("" if stage is Stage.RUNNING else f"; allowed next: {allowed}")
        )
    if stage is Stage.STOPPED and action in (Action.STOP, Action.SUSPEND):
        return NotRunning(f"CT {ctid} is not running; start it with `vzpy start {ctid}`")
    return WrongStage(message)


def _flag(action: Action) -> str:
    parts = action.value.split()
    return f" {parts[1]}" if len(parts) > 1 else ""


# --- the real stage of a persisted state


@dataclass(frozen=True)
class Facts:
    """What the host shows of a CT, beside its state file."""

    init_alive: bool  # the recorded init pid is that process, and not a zombie
    has_tasks: bool  # its cgroup holds processes
    frozen: bool  # its freezer is not THAWED


def pending_action(state: RunState) -> Action | None:
    if not state.pending:
        return None
    return _LEGACY_PENDING.get(state.pending) or Action(state.pending)


def settled(state: RunState, facts: Facts) -> Stage:
    """The real stage: the persisted one, checked against the processes and the freezer.

    A pending action (a vzpy killed half-way) settles to the stage recovery starts from: a half-done
    undump is undumped while it has processes; a half-done suspend is suspended (resume or stop it); any
    other is the stage it started from, as long as the CT lives.
    """
    action = pending_action(state)
    if action is Action.UNDUMP:
        return Stage.UNDUMPED if facts.has_tasks else Stage.STOPPED
    if not facts.init_alive:
        return Stage.STOPPED
    if action is Action.SUSPEND:
        return Stage.SUSPENDED
    stage = Stage(state.pending_from) if action is not None and state.pending_from else state.stage
    if stage is Stage.RUNNING and facts.frozen:
        return Stage.SUSPENDED
    return stage


# --- the one way in


@dataclass
class Entry:
    """A stage action under way: the CT, its state (loaded once), where it came from and goes to."""

    ct: Container
    state: RunState
    action: Action
    source: Stage
    target: Stage

    def note(self, **fields: Any) -> None:
        """Persist `fields` of the state while the action is still under way."""
        for name, value in fields.items():
            setattr(self.state, name, value)
        persist(self.ct, self.state, self.target, pending=True)

    def commit(self, **fields: Any) -> RunState:
        """The action is done: persist its target stage (and `fields` of the state)."""
        for name, value in fields.items():
            setattr(self.state, name, value)
        return persist(self.ct, self.state, self.target)


def current(ct: Container) -> tuple[RunState, Stage]:
    """The CT's state, loaded once, and its real stage."""
    state = ct.load_state()
    return state, settled(state, ct.facts(state))


def plan(ct: Container, actions: Sequence[Action]) -> Stage:
    """Check a sequence of actions against the CT's real stage before any of them changes anything."""
    _, stage = current(ct)
    for action in actions:
        _refuse_if_migrating(ct, action)
    return check_sequence(ct.ctid, stage, actions)


def enter(ct: Container, action: Action) -> Entry:
    """Begin `action` on the CT: validated, its target persisted as pending, the state handed over."""
    state, source = current(ct)
    _refuse_if_migrating(ct, action)
    target = transition(ct.ctid, source, action)
    state.pending = action.value
    state.pending_from = source.value
    persist(ct, state, target, pending=True)
    return Entry(ct=ct, state=state, action=action, source=source, target=target)


def persist(ct: Container, state: RunState, stage: Stage, *, pending: bool = False) -> RunState:
    """Write `stage` as the CT's stage; a settled stage clears the pending mark. STOPPED clears the file, unless
    it records the dump the CT was checkpointed to: that dump waits for `start` (vzctl's `suspended`)."""
    state.stage = stage
    if not pending:
        state.pending = ""
        state.pending_from = ""
    if stage is Stage.STOPPED and not pending:
        if state.dumpfile:  # replaced in one rename: never a moment without the record of the dump
            ct.save_state(_waiting(state.dumpfile))
        else:
            ct.clear_state()
    else:
        ct.save_state(state)
    return state


def _waiting(dumpfile: str) -> RunState:
    from vzpy.container import RunState

    return RunState(stage=Stage.STOPPED, dumpfile=dumpfile)


def remember(ct: Container, state: RunState, **fields: Any) -> None:
    """Persist facts of the state (not its stage) during an action, e.g. files a dump left for its restore."""
    for name, value in fields.items():
        setattr(state, name, value)
    ct.save_state(state)


def migration_marker(ct: Container) -> Path:
    return ct.gconf.lockdir / MIGRATION_MARKER.format(ctid=ct.ctid)


def _refuse_if_migrating(ct: Container, action: Action) -> None:
    if action not in RUNS_THIS_COPY:
        return
    marker = migration_marker(ct)
    try:
        host = str(json.loads(marker.read_text()).get("host") or "the destination")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        host = "HOST"
    raise MigrationInDoubt(
        f"CT {ct.ctid} may already run on {host}: its migration's outcome is unknown ({marker}); "
        f"run `vzpy migrate --recover {host} {ct.ctid}` first"
    )
