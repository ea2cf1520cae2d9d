"""Pre-copy's stop rule: after each pre-dump, whether to pre-dump again or freeze the CT now.

Like P.Haul's (checkpoint-restore/p.haul, iters.py): at most 8 iterations, and stop once an iteration sent
few pages (the dirty set is small: what is left takes little time while frozen). P.Haul also stops when an
iteration sent more than 10% more pages than the one before; this rule stops earlier, as soon as the dirty set
stops shrinking: when an iteration sent more than 90% of the pages of the one before (shrank by less than
10%). Going on then sends the same pages again without making the frozen part smaller: in the lab a CT that
rewrites a few pages kept a constant 520-page dirty set for 7 iterations under P.Haul's rule. LXD/Incus stop
on a share of memory already in sync (70%, 10 iterations) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vzpy.migrate import MigrateUsage

DEFAULT_MAX_ITERATIONS = 8
DEFAULT_SMALL_PAGES = 64  # P.Haul's phaul_iter_min_size
DEFAULT_MIN_SHRINK = 10.0  # percent


@dataclass(frozen=True)
class StopRule:
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    small_pages: int = DEFAULT_SMALL_PAGES
    min_shrink: float = DEFAULT_MIN_SHRINK  # percent an iteration must send fewer pages than the one before

    def __post_init__(self) -> None:
        if self.max_iterations < 1 or self.small_pages < 0 or not 0 <= self.min_shrink < 100:
            raise MigrateUsage(
                "pre-copy stop rule: at least 1 iteration, at least 0 pages, a shrink percent from 0 to under 100"
            )

    def why_stop(self, written: list[int]) -> str | None:
        """Why to freeze after iterations that wrote these pages each (None: pre-dump again)."""
        last = written[-1]
        if last <= self.small_pages:
            return f"the dirty set is small ({last} pages, at most {self.small_pages})"
        if len(written) >= 2 and last > written[-2] * (1 - self.min_shrink / 100):
            return (
                f"the dirty set stopped shrinking ({written[-2]} then {last} pages, less than "
                f"{self.min_shrink:g}% fewer)"
            )
        if len(written) >= self.max_iterations:
            return f"{self.max_iterations} iterations done"
        return None


@dataclass
class Iteration:
    pages: int  # pages sent to the destination
    skipped: int  # pages not sent: unchanged since the previous iteration
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"pages": self.pages, "pages_skipped": self.skipped, "seconds": round(self.seconds, 3)}


def subdir(index: int) -> str:
    """The images subdir of pre-dump iteration `index` (1-based), on both hosts."""
    return f"pre-{index}"
