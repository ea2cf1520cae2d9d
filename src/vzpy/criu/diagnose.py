"""Which process made a CRIU dump fail, read from the dump log, and what to do about it.

CRIU names the CT's init in its summary; the cause is usually one task deeper in the tree. Its pid comes
from the first error itself ("A session leader of 2179(7) ...", "Unseizable non-zombie 2968 ..."), from a
later error line ("Dump core (pid: 6123) failed"), or from the task section the error appeared in
("Dumping task (pid: N comm: X)" ... "Dumping task cwd id"). The pid is then looked up in the host's /proc
(the CT is still frozen when this runs) for its comm and its pid inside the CT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vzpy.dumpable import printable, read_status

PID_IN_ERROR = (
    re.compile(r"session leader of (\d+)\("),
    re.compile(r"non-zombie (\d+)"),
    re.compile(r"\(pid: (\d+)\)"),
    re.compile(r"\bpid[ =:]+(\d+)"),
)
PID_IN_LATER_ERROR = re.compile(r"Error \([^)]*\):.*\(pid: (\d+)\)")
TASK_START = re.compile(r"Dumping task \(pid: (\d+) comm: (.*)\)\s*$")
TASK_END = re.compile(r"Dumping task cwd id")
FD_IN_ERROR = re.compile(r"\bfd[= ](\d+)")
FD_IN_CONTEXT = re.compile(r"Dumping path for (\d+) fd ")
DUMP_LOG_MARK = "Dumping processes (pid:"  # only dump logs: a restore's pids are not the host's tasks
ERROR_LINE = re.compile(r"Error \([^)]*\):\s*(.*)$")

# (pattern in CRIU's error, what to do) — the first match wins
ADVICE = (
    (
        "Can't get rlimit",
        "it runs as another uid and this host's root lacks CAP_SYS_RESOURCE: stop it or run it as root",
    ),
    ("Can't lookup mount", "that fd is a file outside the CT (inherited from the host): restart it from inside the CT"),
    ("session leader", "its session began outside the CT: restart it from inside the CT, e.g. with `vzpy exec`"),
    ("Unseizable", "it runs in the CT but not in its cgroups (nsenter?): end it and start it with `vzpy exec`"),
    ("ghost file", "it holds a large deleted file open: close that file or restart the process"),
    ("xternal", "it is connected to something outside the CT: end that connection or restart the process"),
)
MAX_MESSAGE = 300
DEFAULT_ADVICE = "stop or restart that process, then checkpoint again"


@dataclass(frozen=True)
class Culprit:
    pid: int
    comm: str  # from the log when known, else ""
    fd: int | None


def find_culprit(log_text: str) -> tuple[str, Culprit] | None:
    """The first error's message and the task it concerns; None if the log names none."""
    lines = log_text.splitlines()
    index, message = _first_error(lines)
    if message is None:
        return None
    fd_match = FD_IN_ERROR.search(message)
    fd = int(fd_match.group(1)) if fd_match else _fd_in_context(lines[:index])
    for pattern in PID_IN_ERROR:
        match = pattern.search(message)
        if match:
            return message, Culprit(int(match.group(1)), _comm_in_log(lines, int(match.group(1))), fd)
    for line in lines[index + 1 :]:
        match = PID_IN_LATER_ERROR.search(line)
        if match:
            return message, Culprit(int(match.group(1)), _comm_in_log(lines, int(match.group(1))), fd)
    for line in reversed(lines[:index]):
        if TASK_END.search(line):
            return None  # between tasks: not one task's fault
        match = TASK_START.search(line)
        if match:
            return message, Culprit(int(match.group(1)), printable(match.group(2)), fd)
    return None


def explain(log_text: str, proc: Path = Path("/proc")) -> str | None:
    """One line: CRIU's first error, the task that caused it (pid, comm, pid in the CT, fd), what to do."""
    found = find_culprit(log_text) if DUMP_LOG_MARK in log_text else None
    if found is None:
        return None
    message, culprit = found
    who = _describe(culprit, proc)
    fd = f", fd {culprit.fd}" if culprit.fd is not None else ""
    advice = next((text for key, text in ADVICE if key in message), DEFAULT_ADVICE)
    return f"{message}; caused by {who}{fd}: {advice}"


def _first_error(lines: list[str]) -> tuple[int, str | None]:
    for index, line in enumerate(lines):
        match = ERROR_LINE.search(line)
        # logged on every run on hosts lacking CAP_SYS_RESOURCE, without failing anything
        if match and "RLIMIT_NOFILE" not in line:
            return index, printable(match.group(1).strip(), limit=MAX_MESSAGE)
    return -1, None


def _fd_in_context(before: list[str]) -> int | None:
    """The fd CRIU was dumping when the error came, within the current task's section."""
    for line in reversed(before):
        if TASK_START.search(line) or TASK_END.search(line):
            return None
        match = FD_IN_CONTEXT.search(line)
        if match:
            return int(match.group(1))
    return None


def _comm_in_log(lines: list[str], pid: int) -> str:
    for line in lines:
        match = TASK_START.search(line)
        if match and int(match.group(1)) == pid:
            return printable(match.group(2))
    return ""


def _describe(culprit: Culprit, proc: Path) -> str:
    try:
        status = read_status(proc, culprit.pid)
    except OSError:
        return f"pid {culprit.pid}" + (f" ({culprit.comm})" if culprit.comm else "")
    inner = status.ns_pids[-1] if len(status.ns_pids) > 1 else None
    inside = f", pid {inner} in the CT" if inner is not None else ""
    return f"pid {culprit.pid} ({status.comm}{inside})"
