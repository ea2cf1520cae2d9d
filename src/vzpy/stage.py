"""A CT's stage as an explicit machine: states, actions and the transitions between them.

The stage is persisted per CT so that staged checkpoint/restore steps compose across separate vzpy
invocations. An illegal transition raises WrongStage before anything is touched.
"""

from __future__ import annotations

from enum import StrEnum

from vzpy.errors import AlreadyRunning, NotRunning, VzError, WrongStage


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


def allowed_actions(stage: Stage) -> list[Action]:
    return [action for (source, action) in TRANSITIONS if source is stage]


def transition(ctid: str, stage: Stage, action: Action) -> Stage:
    """The stage after `action`, or a typed error naming the current stage and what is allowed."""
    target = TRANSITIONS.get((stage, action))
    if target is not None:
        return target
    raise _wrong_stage(ctid, stage, action)


def _wrong_stage(ctid: str, stage: Stage, action: Action) -> VzError:
    allowed = ", ".join(f"`vzpy {a.value.split()[0]} {ctid}{_flag(a)}`" for a in allowed_actions(stage))
    message = f"CT {ctid} is {stage.value}: `{action.value}` is not allowed now; allowed next: {allowed}"
    if action is Action.START and stage in LIVE_STAGES:
        return AlreadyRunning(
            f"CT {ctid} is already {stage.value}" + ("" if stage is Stage.RUNNING else f"; allowed next: {allowed}")
        )
    if stage is Stage.STOPPED and action in (Action.STOP, Action.SUSPEND):
        return NotRunning(f"CT {ctid} is not running; start it with `vzpy start {ctid}`")
    return WrongStage(message)


def _flag(action: Action) -> str:
    parts = action.value.split()
    return f" {parts[1]}" if len(parts) > 1 else ""
