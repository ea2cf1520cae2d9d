"""The host's boot and shutdown of its CTs (what vzctl's `vz` service does), run by packaging/vzpy.service.

At shutdown (`vzpy boot stop`), with vz.conf VE_STOP_MODE=suspend (vzctl's default) every running CT is
checkpointed to its dump file (`vzpy chkpnt CTID`, DUMPDIR/Dump.CTID) and a marker `LOCKDIR/CTID.boot-dump`
records it; a CT that cannot be checkpointed is stopped instead. With VE_STOP_MODE=stop every CT is stopped.
At boot (`vzpy boot start`) the CTs checkpointed that way are restored (their processes and connections
come back; the dump file and marker are removed once it is running) and the CTs with ONBOOT=yes that are not
running are started (`vzpy start CTID`), higher BOOTORDER first, CTs without one last (vzctl's order);
shutdown goes in the reverse order. DISABLED=yes CTs are left alone.

Every CT is handled by its own `vzpy` process, as vzctl's script ran vzctl: one CT's failure (or crash) never
stops the others, each command takes the CT's lock and writes the operation log, and the plan's outcome is
summed up at the end (non-zero when any CT failed).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vzpy import fileio, proc
from vzpy.config import GlobalConfig
from vzpy.container import Container
from vzpy.errors import CommandFailed, VzError
from vzpy.stage import Stage

MARKER_SUFFIX = ".boot-dump"
# One CT's command at boot or shutdown: a checkpoint is bounded by CRIU_TIMEOUT (600 s by default) twice over
# (dump, then packing); this bounds a stuck vzpy, not a slow one.
COMMAND_TIMEOUT = 1800.0
YES = ("yes", "1", "on", "true")

Say = Callable[[str], None]


class StopMode(StrEnum):
    SUSPEND = "suspend"
    STOP = "stop"


class Step(StrEnum):
    START = "start"
    RESTORE = "restore"
    CHKPNT = "chkpnt"
    STOP = "stop"


@dataclass(frozen=True)
class CtFacts:
    """What the plans need to know of one CT."""

    ctid: str
    stage: Stage = Stage.STOPPED
    onboot: bool = False
    bootorder: int | None = None
    disabled: bool = False
    boot_dump: Path | None = None  # the dump file `boot stop` made for it, if its marker is there
    # a marker left by a shutdown after which the CT was started, restored or stopped by hand: its dump is stale
    stale_dump: Path | None = None
    problem: str = ""  # why its config could not be read


@dataclass(frozen=True)
class Task:
    ctid: str
    step: Step
    dumpfile: Path | None = None

    def argv(self) -> list[str]:
        """The vzpy command line doing it."""
        dump = ["--dumpfile", str(self.dumpfile)] if self.dumpfile else []
        return [str(self.step), self.ctid, *dump]


@dataclass(frozen=True)
class Outcome:
    task: Task
    exit_code: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# --- reading the host's CTs


def stop_mode(gconf: GlobalConfig, warn: Say) -> StopMode:
    """vz.conf VE_STOP_MODE: stop, else suspend (vzctl's default). An unknown value is warned about and taken
    as suspend, as vzctl's script does: at shutdown, refusing would leave every CT to be killed."""
    # TODO(config helper): use GlobalConfig's typed VE_STOP_MODE accessor once it exists
    raw = (gconf.values.get("VE_STOP_MODE") or StopMode.SUSPEND).strip().lower()
    try:
        return StopMode(raw)
    except ValueError:
        warn(f"{gconf.path}: unknown VE_STOP_MODE value {raw!r} (use suspend or stop); suspending")
        return StopMode.SUSPEND


def marker_path(gconf: GlobalConfig, ctid: str) -> Path:
    return gconf.lockdir / f"{ctid}{MARKER_SUFFIX}"


@dataclass(frozen=True)
class BootDump:
    """The marker `boot stop` leaves: the dump file, and when the CT's state was last changed (its chkpnt)."""

    dumpfile: Path
    state_updated: float


def read_facts(ct: Container) -> CtFacts:
    """A CT's boot-relevant settings and stage; a CT whose config cannot be read gets `problem`."""
    found = _read_marker(marker_path(ct.gconf, ct.ctid))
    try:
        stage = ct.stage()  # the state file and cgroups: a broken CTID.conf does not hide a running CT
        fresh = found is not None and ct.load_state().updated == found.state_updated
    except (VzError, OSError) as e:
        return CtFacts(ctid=ct.ctid, boot_dump=found.dumpfile if found else None, problem=_reason(e))
    marker = found.dumpfile if found and fresh else None
    stale = found.dumpfile if found and not fresh else None
    try:
        conf = ct.conf
    except (VzError, OSError) as e:
        return CtFacts(ctid=ct.ctid, stage=stage, boot_dump=marker, stale_dump=stale, problem=_reason(e))
    # TODO(config helper): use the typed ONBOOT/BOOTORDER/DISABLED accessors once they exist
    return CtFacts(
        ctid=ct.ctid,
        stage=stage,
        onboot=_yes(conf.get("ONBOOT")),
        bootorder=_bootorder(conf.get("BOOTORDER")),
        disabled=_yes(conf.get("DISABLED")),
        boot_dump=marker,
        stale_dump=stale,
    )


def _reason(error: BaseException) -> str:
    return error.message if isinstance(error, VzError) else str(error)


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in YES


def _bootorder(value: str | None) -> int | None:
    text = (value or "").strip()
    return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None


def _read_marker(path: Path) -> BootDump | None:
    try:
        data = json.loads(path.read_text())
        dump = BootDump(Path(data["dumpfile"]), float(data["state_updated"]))
    except (OSError, ValueError, TypeError, KeyError):  # none (the usual case) or unreadable: nothing to restore
        return None
    return dump if dump.dumpfile.is_absolute() else None


def write_marker(gconf: GlobalConfig, ctid: str, dumpfile: Path, state_updated: float) -> None:
    """Durably: the host powers off right after."""
    path = marker_path(gconf, ctid)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps({"dumpfile": str(dumpfile), "state_updated": state_updated})
    fileio.write_atomic(path, text + "\n", mode=0o600)


def remove_marker(gconf: GlobalConfig, ctid: str) -> None:
    marker_path(gconf, ctid).unlink(missing_ok=True)


# --- the plans (pure: facts in, tasks out)


def boot_order(facts: Sequence[CtFacts]) -> list[CtFacts]:
    """Higher BOOTORDER first, CTs without one last; the listing order (CTID) within equal ones."""
    return sorted(facts, key=lambda f: (f.bootorder is None, -(f.bootorder or 0)))


def boot_plan(facts: Sequence[CtFacts], say: Say) -> list[Task]:
    tasks = []
    for ct in boot_order(facts):
        task = _boot_task(ct, say)
        if task:
            tasks.append(task)
    return tasks


def _boot_task(ct: CtFacts, say: Say) -> Task | None:
    if ct.problem:
        if ct.boot_dump:
            say(f"CT {ct.ctid}: not restored, its config cannot be read: {ct.problem}")
        return None
    if ct.disabled:
        if ct.onboot or ct.boot_dump:
            say(
                f"CT {ct.ctid}: DISABLED=yes, not started"
                + (f" (its dump {ct.boot_dump} is kept)" if ct.boot_dump else "")
            )
        return None
    if ct.boot_dump and ct.stage is Stage.STOPPED:
        return Task(ct.ctid, Step.RESTORE, ct.boot_dump)
    if ct.onboot and ct.stage is Stage.STOPPED:
        return Task(ct.ctid, Step.START)
    if ct.onboot or ct.boot_dump:
        say(f"CT {ct.ctid}: already {ct.stage.value}, left as it is")
    return None


def shutdown_plan(facts: Sequence[CtFacts], mode: StopMode, dumpfile: Callable[[str], Path]) -> list[Task]:
    """Every live CT, last booted first: running ones checkpointed (suspend mode) or stopped; CTs half-way
    through a checkpoint or restore of an operator's are stopped (stop is the way out of every stage)."""
    tasks = []
    for ct in reversed(boot_order(facts)):
        if ct.stage is Stage.STOPPED:
            continue
        if ct.stage is Stage.RUNNING and mode is StopMode.SUSPEND:
            tasks.append(Task(ct.ctid, Step.CHKPNT, dumpfile(ct.ctid)))
        else:
            tasks.append(Task(ct.ctid, Step.STOP))
    return tasks


# --- running them

Runner = Callable[[Task], Outcome]


def vzpy_runner(say: Say, env: dict[str, str] | None = None) -> Runner:
    """Run a task as its own `vzpy` process (this interpreter's), relaying what it printed."""

    def run(task: Task) -> Outcome:
        argv = [sys.executable, "-m", "vzpy", *task.argv()]
        try:
            result = proc.run(argv, check=False, env=env, timeout=COMMAND_TIMEOUT, what=f"vzpy {task.step} {task.ctid}")
        except VzError as e:  # it ran past its deadline (proc.run killed it) or could not start
            return Outcome(task, e.exit_code, e.message)
        for line in (result.stdout + result.stderr).splitlines():
            say(f"  {line}")
        return Outcome(task, result.returncode, proc.tail(result.stderr, 1))

    return run


def boot(
    gconf: GlobalConfig, cts: Sequence[Container], run: Runner, say: Say, *, dry_run: bool = False
) -> list[Outcome]:
    """Restore the CTs `shutdown` checkpointed, start the ONBOOT=yes ones."""
    facts = [read_facts(ct) for ct in cts]
    for ct in facts:
        if ct.stale_dump:
            say(f"CT {ct.ctid}: changed since it was checkpointed at shutdown; {ct.stale_dump} is not restored")
            if not dry_run:
                remove_marker(gconf, ct.ctid)
        if ct.boot_dump and not ct.boot_dump.exists() and not ct.problem:
            say(f"CT {ct.ctid}: its boot dump {ct.boot_dump} is gone; it is started only if ONBOOT=yes")
            if not dry_run:
                remove_marker(gconf, ct.ctid)
    tasks = boot_plan([_without_missing_dump(ct) for ct in facts], say)
    if dry_run:
        return _show(tasks, say)
    outcomes = []
    for task in tasks:
        say(f"CT {task.ctid}: {'restoring from ' + str(task.dumpfile) if task.dumpfile else 'starting'}")
        outcome = run(task)
        if outcome.ok and task.step is Step.RESTORE:
            _forget_dump(gconf, task, say)
        outcomes.append(_reported(outcome, say))
    return outcomes


def _without_missing_dump(ct: CtFacts) -> CtFacts:
    if ct.boot_dump and not ct.boot_dump.exists():
        return dataclasses.replace(ct, boot_dump=None)
    return ct


def _forget_dump(gconf: GlobalConfig, task: Task, say: Say) -> None:
    """The CT runs again: its dump is stale, and must not be restored by a later start."""
    remove_marker(gconf, task.ctid)
    try:
        if task.dumpfile:
            task.dumpfile.unlink(missing_ok=True)
    except OSError as e:
        say(f"CT {task.ctid}: cannot remove its used dump file {task.dumpfile}: {e.strerror}")


def shutdown(
    gconf: GlobalConfig, cts: Sequence[Container], mode: StopMode, run: Runner, say: Say, *, dry_run: bool = False
) -> list[Outcome]:
    """Checkpoint (or stop) every running CT; one that cannot be checkpointed is stopped."""
    by_id = {ct.ctid: ct for ct in cts}
    tasks = shutdown_plan([read_facts(ct) for ct in cts], mode, lambda ctid: by_id[ctid].default_dumpfile)
    if dry_run:
        return _show(tasks, say)
    if any(task.step is Step.CHKPNT for task in tasks):
        gconf.dumpdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    outcomes = []
    for task in tasks:
        say(f"CT {task.ctid}: {'checkpointing to ' + str(task.dumpfile) if task.dumpfile else 'stopping'}")
        outcome = run(task)
        if task.step is Step.CHKPNT:
            outcome = _after_chkpnt(by_id[task.ctid], outcome, run, say)
        outcomes.append(_reported(outcome, say))
    return outcomes


def _after_chkpnt(ct: Container, outcome: Outcome, run: Runner, say: Say) -> Outcome:
    task = outcome.task
    if outcome.ok:
        assert task.dumpfile is not None
        try:
            write_marker(ct.gconf, task.ctid, task.dumpfile, ct.load_state().updated)
            return outcome
        except (VzError, OSError) as e:
            message = f"checkpointed, but the boot marker cannot be written ({_reason(e)}): `vzpy restore {ct.ctid}`"
            return Outcome(task, 3, message)
    say(f"CT {task.ctid}: checkpoint failed (exit {outcome.exit_code}); stopping it instead")
    stopped = run(Task(task.ctid, Step.STOP))
    suffix = "stopped instead" if stopped.ok else f"and stop failed too (exit {stopped.exit_code})"
    return Outcome(task, outcome.exit_code, f"{outcome.message}; {suffix}")


def _show(tasks: Sequence[Task], say: Say) -> list[Outcome]:
    for task in tasks:
        say(f"would run: vzpy {' '.join(task.argv())}")
    if not tasks:
        say("nothing to do")
    return []


def _reported(outcome: Outcome, say: Say) -> Outcome:
    task = outcome.task
    if outcome.ok:
        say(f"CT {task.ctid}: {task.step} done")
    else:
        say(
            f"CT {task.ctid}: {task.step} failed (exit {outcome.exit_code})"
            + (f": {outcome.message}" if outcome.message else "")
        )
    return outcome


def check_outcomes(what: str, outcomes: Sequence[Outcome]) -> str:
    """The summary line; CommandFailed (exit 3) naming the failed CTs when any failed."""
    failed = [o for o in outcomes if not o.ok]
    done = len(outcomes) - len(failed)
    if failed:
        names = ", ".join(f"{o.task.ctid} ({o.task.step}: exit {o.exit_code})" for o in failed)
        raise CommandFailed(
            f"{what}: {len(failed)} of {len(outcomes)} CTs failed: {names}; see the messages above and the log"
        )
    return f"{what}: {done} CT{'s' if done != 1 else ''} handled, none failed"
