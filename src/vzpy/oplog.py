"""The operation log (vz.conf LOGFILE, default /var/log/vzpy.log; LOGGING=no turns it off), as vzctl keeps one.

One line per state-changing command on a CT: when, which CT, what was run and how it ended (the exit code,
and the error's first line when it failed). Each line is one write(2) on an O_APPEND descriptor, so lines
of concurrent vzpy processes never interleave. Logging never fails a command: if the file cannot be
written, vzpy warns once (per process) and goes on.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from vzpy.config import GlobalConfig
from vzpy.errors import VzError

DEFAULT_LOGFILE = Path("/var/log/vzpy.log")
LOG_MODE = 0o640
MAX_MESSAGE = 300  # an error's text in the log: its first line, cut short

_warned = False


def logfile(gconf: GlobalConfig) -> Path | None:
    """Where the log goes, or None when LOGGING=no."""
    # TODO(config helper): use GlobalConfig's typed LOGGING/LOGFILE accessors once they exist
    if (gconf.values.get("LOGGING") or "yes").strip().lower() in ("no", "false", "0", "off"):
        return None
    return Path(gconf.values.get("LOGFILE") or DEFAULT_LOGFILE)


def format_line(
    ctid: str,
    operation: str,
    exit_code: int,
    argv: Sequence[str],
    message: str = "",
    *,
    now: datetime | None = None,
    pid: int | None = None,
) -> str:
    """`TIME vzpy[PID]: CT CTID: OPERATION: exit CODE[: MESSAGE] (COMMAND LINE)`, one line, no control characters."""
    when = (now or datetime.now(UTC)).isoformat(timespec="milliseconds")
    result = f"exit {exit_code}"
    if message:
        first = message.strip().splitlines()[0] if message.strip() else ""
        result += f": {first[:MAX_MESSAGE]}" if first else ""
    command = shlex.join(argv)
    return _one_line(f"{when} vzpy[{pid or os.getpid()}]: CT {ctid}: {operation}: {result} ({command})") + "\n"


def _one_line(text: str) -> str:
    """Names a CT chose (processes, files) reach error messages: no newline or escape of theirs reaches the log."""
    return "".join(c if c.isprintable() else "?" for c in text)


def append(path: Path, line: str, warn: Callable[[str], None]) -> bool:
    """Append one line with a single O_APPEND write; on failure warn (once per process) and return False."""
    global _warned
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, LOG_MODE)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        return True
    except OSError as e:
        if not _warned:
            _warned = True
            reason = e.strerror or str(e)
            warn(f"cannot write the operation log {path}: {reason}; set LOGFILE or LOGGING=no in vz.conf")
        return False


def record(
    gconf: GlobalConfig,
    ctid: str,
    operation: str,
    exit_code: int,
    message: str,
    warn: Callable[[str], None],
    argv: Sequence[str] | None = None,
) -> None:
    """Log one finished operation on a CT (nothing when LOGGING=no)."""
    path = logfile(gconf)
    if path is None:
        return
    shown_argv = [_program(), *sys.argv[1:]] if argv is None else argv
    append(path, format_line(ctid, operation, exit_code, shown_argv, message), warn)


def _program() -> str:
    """The name vzpy was called by (vzctl, vzpy, ...); `python -m vzpy` shows as vzpy."""
    name = os.path.basename(sys.argv[0])
    return "vzpy" if not name or name == "__main__.py" else name


def exit_code_of(error: BaseException) -> int:
    """The exit code vzpy's main gives for an error escaping a command (vzpy.cli.main's mapping)."""
    if isinstance(error, VzError):
        return error.exit_code
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 3


def message_of(error: BaseException) -> str:
    if isinstance(error, VzError):
        return error.message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"
