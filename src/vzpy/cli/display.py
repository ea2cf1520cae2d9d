"""What vzpy's command line shows: the one place for its message formats, tables and reports.

Commands compute data and hand it here; errors and warnings go to stderr as one `vzpy: ...` line each.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

import click

PROG = "vzpy"


def out(line: str = "") -> None:
    click.echo(line)


def progress(message: str, *, to_stderr: bool = False) -> None:
    click.echo(message, err=to_stderr)


def json_out(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def warning(message: str) -> None:
    click.echo(f"{PROG}: warning: {message}", err=True)


def error(message: str, detail: str = "") -> None:
    click.echo(f"{PROG}: error: {printable(message)}", err=True)
    if detail:
        click.echo("\n".join(printable(line) for line in detail.split("\n")), err=True)


def printable(text: str) -> str:
    """One line without control characters: messages carry names a CT chose (files, processes), and an
    escape sequence or a newline in one must not reach the operator's terminal as such."""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text)


def usage_error(message: str, command_path: str | None) -> None:
    error(f"{message} (see `{command_path or PROG} --help`)")


def internal_error(exc: BaseException) -> None:
    click.echo(f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)


def aborted() -> None:
    click.echo(f"{PROG}: aborted", err=True)


# --- lifecycle -------------------------------------------------------------------------------------


def status_line(ctid: str, *, exists: bool, mounted: bool, running: bool, suspended: bool) -> str:
    """vzctl's `CTID 101 exist mounted running`; the sixth word `suspended` when a stopped CT's dump waits."""
    words = ["exist" if exists else "deleted", "mounted" if mounted else "unmounted", "running" if running else "down"]
    return f"CTID {ctid} {' '.join(words + ['suspended'] * suspended)}"


# --- check -----------------------------------------------------------------------------------------


def feature_line(ok: bool, feature: str, note: str) -> str:
    return f"  {'yes' if ok else 'no ':<4} {feature:<22} {note}"


# --- migrate ---------------------------------------------------------------------------------------


def phase_times(phases: Iterable[tuple[str, float]], frozen_seconds: float | None, host: str) -> list[str]:
    """`vzpy migrate -t`: each phase's duration, then how long the CT was frozen."""
    lines = [f"  {name:<45} {seconds:8.2f}s" for name, seconds in phases]
    if frozen_seconds is not None:
        lines.append(f"  {'frozen (suspend to resume on ' + host + ')':<45} {frozen_seconds:8.2f}s")
    return lines
