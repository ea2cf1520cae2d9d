"""The stage machine: every (stage, action) pair, the typed errors and their messages, reachability."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from vzpy.errors import AlreadyRunning, NotRunning, VzError, WrongStage
from vzpy.stage import (
    LIVE_STAGES,
    RUNS_THIS_COPY,
    TRANSITIONS,
    Action,
    Stage,
    allowed_actions,
    check_sequence,
    transition,
)

S, A = Stage, Action

# The table as specified (vzctl's staged chkpnt/restore plus start/stop), written out independently of TRANSITIONS.
EXPECTED: dict[tuple[Stage, Action], Stage] = {
    (S.STOPPED, A.START): S.RUNNING,
    (S.STOPPED, A.UNDUMP): S.UNDUMPED,
    (S.RUNNING, A.STOP): S.STOPPED,
    (S.RUNNING, A.SUSPEND): S.SUSPENDED,
    (S.SUSPENDED, A.STOP): S.STOPPED,
    (S.SUSPENDED, A.DUMP): S.DUMPED,
    (S.SUSPENDED, A.RESUME): S.RUNNING,
    (S.DUMPED, A.STOP): S.STOPPED,
    (S.DUMPED, A.KILL): S.STOPPED,
    (S.DUMPED, A.RESUME): S.RUNNING,
    (S.UNDUMPED, A.STOP): S.STOPPED,
    (S.UNDUMPED, A.RESTORE_RESUME): S.RUNNING,
    (S.UNDUMPED, A.RESTORE_KILL): S.STOPPED,
}

# What the error messages list as the way on, per stage (in TRANSITIONS order), for CT 101.
ALLOWED_NEXT: dict[Stage, str] = {
    S.STOPPED: "`vzpy start 101`, `vzpy restore 101 --undump`",
    S.RUNNING: "`vzpy stop 101`, `vzpy chkpnt 101 --suspend`",
    S.SUSPENDED: "`vzpy stop 101`, `vzpy chkpnt 101 --dump`, `vzpy chkpnt 101 --resume`",
    S.DUMPED: "`vzpy stop 101`, `vzpy chkpnt 101 --kill`, `vzpy chkpnt 101 --resume`",
    S.UNDUMPED: "`vzpy stop 101`, `vzpy restore 101 --resume`, `vzpy restore 101 --kill`",
}

ALL_PAIRS = list(itertools.product(Stage, Action))
ALLOWED_PAIRS = [pair for pair in ALL_PAIRS if pair in EXPECTED]
DISALLOWED_PAIRS = [pair for pair in ALL_PAIRS if pair not in EXPECTED]


def _id(pair: tuple[Stage, Action]) -> str:
    return f"{pair[0].value}:{pair[1].value}"


def test_enums_have_the_vzctl_spellings() -> None:
    assert [s.value for s in Stage] == ["stopped", "running", "suspended", "dumped", "undumped"]
    assert [a.value for a in Action] == [
        "start",
        "stop",
        "chkpnt --suspend",
        "chkpnt --dump",
        "chkpnt --kill",
        "chkpnt --resume",
        "restore --undump",
        "restore --resume",
        "restore --kill",
    ]


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_live_stages() -> None:
    assert frozenset({S.RUNNING, S.SUSPENDED, S.DUMPED, S.UNDUMPED}) == LIVE_STAGES


@pytest.mark.parametrize("pair", ALLOWED_PAIRS, ids=_id)
def test_allowed_pairs_give_the_target(pair: tuple[Stage, Action]) -> None:
    stage, action = pair
    assert transition("101", stage, action) is EXPECTED[pair]


@pytest.mark.parametrize("pair", DISALLOWED_PAIRS, ids=_id)
def test_disallowed_pairs_raise_a_typed_error(pair: tuple[Stage, Action]) -> None:
    stage, action = pair
    with pytest.raises(VzError) as info:
        transition("101", stage, action)
    error = info.value
    if action is A.START or (action is A.UNDUMP and stage is S.RUNNING):
        assert type(error) is AlreadyRunning
        assert error.exit_code == 32
        expected = (
            "CT 101 is already running"
            if stage is S.RUNNING
            else f"CT 101 is already {stage.value}; allowed next: {ALLOWED_NEXT[stage]}"
        )
    elif stage is S.STOPPED and action in (A.STOP, A.SUSPEND):
        assert type(error) is NotRunning
        assert error.exit_code == 31
        expected = "CT 101 is not running; start it with `vzpy start 101`"
    else:
        assert type(error) is WrongStage
        assert error.exit_code == 16
        expected = f"CT 101 is {stage.value}: `{action.value}` is not allowed now; allowed next: {ALLOWED_NEXT[stage]}"
    assert error.message == expected
    assert str(error) == expected


def test_start_of_a_running_ct_is_already_running() -> None:
    with pytest.raises(AlreadyRunning) as info:
        transition("101", S.RUNNING, A.START)
    assert info.value.exit_code == 32
    assert info.value.message == "CT 101 is already running"


@pytest.mark.parametrize("action", [A.STOP, A.SUSPEND])
def test_stop_or_suspend_of_a_stopped_ct_is_not_running(action: Action) -> None:
    with pytest.raises(NotRunning) as info:
        transition("101", S.STOPPED, action)
    assert info.value.exit_code == 31


def test_dump_out_of_order_names_stage_and_next_step() -> None:
    with pytest.raises(WrongStage) as info:
        transition("101", S.RUNNING, A.DUMP)
    assert info.value.exit_code == 16
    assert "CT 101 is running" in info.value.message
    assert "allowed next: `vzpy stop 101`, `vzpy chkpnt 101 --suspend`" in info.value.message


def test_suspended_ct_suggests_dump() -> None:
    with pytest.raises(WrongStage) as info:
        transition("101", S.SUSPENDED, A.KILL)
    assert "allowed next: `vzpy stop 101`, `vzpy chkpnt 101 --dump`, `vzpy chkpnt 101 --resume`" in info.value.message


def test_message_uses_the_given_ctid() -> None:
    with pytest.raises(WrongStage) as info:
        transition("web-1", S.UNDUMPED, A.SUSPEND)
    assert info.value.message == (
        "CT web-1 is undumped: `chkpnt --suspend` is not allowed now; allowed next: "
        "`vzpy stop web-1`, `vzpy restore web-1 --resume`, `vzpy restore web-1 --kill`"
    )


@pytest.mark.parametrize("stage", sorted(LIVE_STAGES), ids=str)
def test_every_live_stage_can_be_stopped(stage: Stage) -> None:
    assert transition("101", stage, A.STOP) is S.STOPPED
    assert A.STOP in allowed_actions(stage)


def _reachable(start: Stage) -> set[Stage]:
    seen = {start}
    todo = deque([start])
    while todo:
        stage = todo.popleft()
        for action in allowed_actions(stage):
            target = transition("101", stage, action)
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("stage", list(Stage), ids=str)
def test_no_stage_is_a_dead_end(stage: Stage) -> None:
    assert allowed_actions(stage), f"{stage} has no way out"
    assert S.STOPPED in _reachable(stage)


def test_every_stage_is_reachable_from_stopped() -> None:
    assert _reachable(S.STOPPED) == set(Stage)


@pytest.mark.parametrize(
    ("stage", "actions"),
    [
        (S.STOPPED, [A.START, A.UNDUMP]),
        (S.RUNNING, [A.STOP, A.SUSPEND]),
        (S.SUSPENDED, [A.STOP, A.DUMP, A.RESUME]),
        (S.DUMPED, [A.STOP, A.KILL, A.RESUME]),
        (S.UNDUMPED, [A.STOP, A.RESTORE_RESUME, A.RESTORE_KILL]),
    ],
    ids=lambda v: str(v) if isinstance(v, Stage) else "",
)
def test_allowed_actions(stage: Stage, actions: list[Action]) -> None:
    assert allowed_actions(stage) == actions


def test_allowed_actions_agree_with_transition() -> None:
    for stage, action in ALL_PAIRS:
        if action in allowed_actions(stage):
            transition("101", stage, action)
        else:
            with pytest.raises(VzError):
                transition("101", stage, action)


def test_transition_accepts_plain_string_values() -> None:
    # Stages come back from JSON as Stage(value); StrEnum members compare equal to their values.
    assert transition("101", Stage("suspended"), Action("chkpnt --dump")) is S.DUMPED


def test_check_sequence_walks_the_table_and_names_the_first_refusal() -> None:
    assert check_sequence("101", S.RUNNING, [A.SUSPEND, A.DUMP, A.KILL]) is S.STOPPED
    assert check_sequence("101", S.RUNNING, [A.SUSPEND, A.DUMP, A.RESUME]) is S.RUNNING
    with pytest.raises(WrongStage) as info:
        check_sequence("101", S.RUNNING, [A.SUSPEND, A.KILL])
    assert info.value.message.startswith("CT 101 is suspended: `chkpnt --kill` is not allowed now")


def test_what_an_unfinished_migration_refuses_is_what_runs_this_copy() -> None:
    # every action whose target is a running or runnable copy, and nothing that only stops or freezes it
    assert frozenset({A.START, A.RESUME, A.UNDUMP, A.RESTORE_RESUME}) == RUNS_THIS_COPY
