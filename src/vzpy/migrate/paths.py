"""Which path an online migration takes between two hosts, and why, from both hosts' kernel and CRIU facts
(HostCapabilities.migration_facts: the source's own, the destination's from the agent's hello).

    pre-copy       memory copied while the CT runs (iterative pre-dumps to the destination's page server),
                   then only what changed since, while frozen. Needs soft-dirty tracking on the source.
    post-copy      the CT is dumped without its memory and runs on the destination at once; its pages
                   follow on demand and in the background from the source (lazy pages). Needs a lazy-pages
                   round trip that worked on both hosts. A failure once it runs there loses the CT, so it is
                   taken only when asked for (--postcopy) or allowed by vz.conf VZPY_MIGRATE_POSTCOPY=yes.
    stop-and-copy  frozen, then all memory streamed to the destination's page server. Always possible.

By default: post-copy if allowed and possible, else pre-copy if possible, else stop-and-copy. A path asked
for that the hosts cannot do is refused (PathUnavailable) before anything is copied or frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vzpy.migrate import MigrateUsage

PRE_COPY = "pre-copy"
POST_COPY = "post-copy"
STOP_AND_COPY = "stop-and-copy"
OFFLINE = "offline"
PATHS = (PRE_COPY, POST_COPY, STOP_AND_COPY)
OPTIONS = {PRE_COPY: "--precopy", POST_COPY: "--postcopy", STOP_AND_COPY: "--stop-and-copy"}  # vzpy migrate's
POLICY_KEY = "VZPY_MIGRATE_POSTCOPY"  # VZPY_: vz.conf takes it without an "unknown" warning
# CRIU 4.2.1's lazy-pages daemon gets an fd and a copy of the missing-pages list for every child a restored
# task forks, and lets go of them only when a copy to the child fails: in the lab a CT forking ~100 times a
# second ran it out of fds within a minute ("Can't read uffd message: Too many open files") and lost the CT.
# Raising its fd limit only moved the failure: the copies filled the destination's memory.
POSTCOPY_MAX_FORKS_PER_SECOND = 20


class PathUnavailable(MigrateUsage):
    """The migration path asked for cannot be taken between these two hosts."""


@dataclass(frozen=True)
class PathChoice:
    path: str
    # one sentence per path: why it can or cannot be taken here, and the choice's reason last
    reasons: list[str] = field(default_factory=list)
    # path -> None when both hosts can take it, else why not
    blocked: dict[str, str | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reasons": self.reasons, "possible": [p for p in PATHS if not self.blocked.get(p)]}


def _host(facts: Mapping[str, Any], role: str) -> str:
    return f"the {role}'s kernel {facts.get('kernel') or '?'} (CRIU {facts.get('criu_version') or '?'})"


def precopy_blocker(source: Mapping[str, Any], dest: Mapping[str, Any]) -> str | None:
    if not source.get("mem_dirty_track"):
        return f"{_host(source, 'source')} lacks soft-dirty memory tracking (mem_dirty_track)"
    if not source.get("page_server") or not dest.get("page_server", True):
        return "a CRIU page server is missing on one of the hosts"
    return None


def postcopy_blocker(source: Mapping[str, Any], dest: Mapping[str, Any]) -> str | None:
    for facts, role in ((source, "source"), (dest, "destination")):
        lazy = facts.get("lazy_pages")
        if lazy is not True:
            note = facts.get("lazy_pages_note") or ("not probed" if lazy is None else "no lazy pages")
            return f"lazy pages do not work on {_host(facts, role)}: {note}"
    return None


def fork_rate_blocker(ctid: str, forks_per_second: float) -> str | None:
    """Post-copy of a CT that forks this often: see POSTCOPY_MAX_FORKS_PER_SECOND."""
    if forks_per_second < POSTCOPY_MAX_FORKS_PER_SECOND:
        return None
    return (
        f"CT {ctid} starts about {forks_per_second:.0f} processes a second, and CRIU's lazy-pages daemon keeps an "
        "fd and a copy of the missing memory for every forked child until it runs out"
    )


def choose(
    source: Mapping[str, Any],
    dest: Mapping[str, Any],
    requested: str | None = None,
    *,
    postcopy_allowed: bool = False,
    ct_postcopy_blocker: str | None = None,
) -> PathChoice:
    """The path between hosts with these facts; PathUnavailable when `requested` cannot be taken.
    `ct_postcopy_blocker`: why the CT itself cannot take post-copy (fork_rate_blocker), if it cannot."""
    blocked: dict[str, str | None] = {
        PRE_COPY: precopy_blocker(source, dest),
        POST_COPY: postcopy_blocker(source, dest) or ct_postcopy_blocker,
        STOP_AND_COPY: None,
    }
    reasons = [f"{path}: {'possible' if why is None else 'impossible, ' + why}" for path, why in blocked.items()]
    if requested is not None:
        why = blocked[requested]
        if why is not None:
            other = PRE_COPY if requested != PRE_COPY and blocked[PRE_COPY] is None else STOP_AND_COPY
            raise PathUnavailable(f"{OPTIONS[requested]} is impossible here: {why}; use {OPTIONS[other]}")
        return PathChoice(requested, [*reasons, f"{requested}: asked for"], blocked)
    if blocked[POST_COPY] is None and postcopy_allowed:
        path, why = POST_COPY, f"{POST_COPY}: allowed by vz.conf {POLICY_KEY}=yes"
    elif blocked[PRE_COPY] is None:
        path, why = PRE_COPY, f"{PRE_COPY}: the source tracks dirty memory"
        if blocked[POST_COPY] is None:
            why += " (post-copy is possible too but loses the CT if a host fails: --postcopy to use it)"
    else:
        path, why = STOP_AND_COPY, f"{STOP_AND_COPY}: the only path these hosts can take"
    return PathChoice(path, [*reasons, why], blocked)


def postcopy_policy(value: str | None) -> bool:
    """vz.conf VZPY_MIGRATE_POSTCOPY: yes lets a plain --online migration take post-copy where it works."""
    return (value or "").strip().lower() in ("yes", "1", "true")
