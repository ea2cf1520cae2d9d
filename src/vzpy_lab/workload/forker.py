"""Client for the forker workload (forker.c beside this module): one line per TCP connection, its counters."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vzpy_lab.workload.client import Connector, FidelityError, ask_line, default_connect

COUNTERS: tuple[str, ...] = (
    "forks",
    "ok",
    "fail",
    "lazy_ok",
    "lazy_fail",
    "grandchildren",
    "fork_errors",
    "missing",
    "last_fail",
)


class ForkerError(FidelityError):
    """The forker did not answer, or answered something malformed."""


@dataclass(frozen=True)
class ForkerStatus:
    """What the forker said: whether every page of the parent's memory held its pattern, and its counters."""

    intact: bool
    head: str  # "OK" or "BAD page N"
    counters: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    @property
    def failures(self) -> int:
        return self.counters["fail"] + self.counters["lazy_fail"]

    @property
    def reaped(self) -> int:
        return self.counters["ok"] + self.counters["lazy_ok"] + self.failures


def parse_status(line: str) -> ForkerStatus:
    words = line.split()
    pairs = [word.split("=", 1) for word in words if "=" in word]
    head = " ".join(word for word in words if "=" not in word)
    try:
        counters = {name: int(value) for name, value in pairs}
    except ValueError as exc:
        raise ForkerError(f"malformed forker line: {line!r}") from exc
    well_formed_head = head == "OK" or head.startswith("BAD page ")
    if not well_formed_head or set(COUNTERS) - set(counters):
        raise ForkerError(f"malformed forker line: {line!r}")
    return ForkerStatus(intact=head == "OK", head=head, counters=counters)


def forker_status(host: str, port: int, connect: Connector = default_connect, timeout: float = 120.0) -> ForkerStatus:
    """Ask the forker for its counters (it checks every page of its memory first)."""
    return parse_status(ask_line(host, port, connect, timeout).decode(errors="replace"))


def wait_for_forker(
    host: str, port: int, connect: Connector = default_connect, timeout: float = 120.0, reaped: int = 1
) -> ForkerStatus:
    """forker_status once the forker listens and has reaped at least `reaped` children."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = forker_status(host, port, connect)
            if status.reaped >= reaped:
                return status
        except OSError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise ForkerError(f"the forker at {host}:{port} reaped fewer than {reaped} children in {timeout:g} s")
        time.sleep(1)
