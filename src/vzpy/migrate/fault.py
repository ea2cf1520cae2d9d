"""Fault injection for the migration's tests, as CRIU's CRIU_FAULT: VZPY_MIGRATE_FAULT=SIDE:WHEN:POINT[,...]

    source:before:STEP   `vzpy migrate` SIGKILLs itself just before step STEP (a Step.id of flow.Migration)
    source:after:STEP    ... just after STEP succeeded
    source:fail:STEP     STEP fails (an injected MigrateError) instead of running: the rollback path
    agent:before:OP      the destination's agent SIGKILLs itself on receiving request OP
    agent:after:OP       ... after OP was done, before its reply is sent (the reply is lost)

The source reads the variable; it passes the agent's part to the agent in its hello. Unset: no effect.
"""

from __future__ import annotations

import os
import signal

from vzpy.migrate import MigrateError

ENV = "VZPY_MIGRATE_FAULT"
SIDES = ("source", "agent")
WHENS = ("before", "after", "fail")


class InjectedFault(MigrateError):
    exit_code = 6


def parse(text: str) -> set[tuple[str, str, str]]:
    """The (side, when, point) triples of a spec; malformed entries are ignored (a test hook, not an interface)."""
    found = set()
    for entry in text.split(","):
        side, _, rest = entry.strip().partition(":")
        when, _, point = rest.partition(":")
        if side in SIDES and when in WHENS and point:
            found.add((side, when, point))
    return found


def from_env() -> str:
    return os.environ.get(ENV, "")


def agent_part(text: str) -> str:
    """The entries meant for the agent, to pass on in hello."""
    return ",".join(f"{side}:{when}:{point}" for side, when, point in sorted(parse(text)) if side == "agent")


def hit(text: str, side: str, when: str, point: str) -> None:
    """Act on the fault `text` names for this point, if any: die at once (as SIGKILL would), or fail."""
    if not text or (side, when, point) not in parse(text):
        return
    if when == "fail":
        raise InjectedFault(f"injected fault: {point} fails ({ENV})")
    os.kill(os.getpid(), signal.SIGKILL)
