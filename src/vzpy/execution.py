"""Running commands inside a live CT: exec (argv, exit code passes through), enter (a shell on a pty).

The command joins the CT's cgroups and namespaces of its init (mount last, since it changes what
/proc and /sys mean), then a fork puts it into the CT's PID namespace.
"""

from __future__ import annotations

import os
import pty
import socket
from collections.abc import Callable, Sequence

from vzpy.container import Container
from vzpy.errors import ExecFailed, NotRunning
from vzpy.runtime import linux
from vzpy.runtime.launcher import CT_ENV
from vzpy.stage import Stage

JOIN_ORDER = ("ipc", "uts", "net", "pid", "mnt")
SHELLS = ("/bin/bash", "/bin/sh")


def _require_running(ct: Container) -> int:
    stage = ct.stage()
    if stage is not Stage.RUNNING:
        raise NotRunning(f"CT {ct.ctid} is {stage.value}, not running; start it with `vzpy start {ct.ctid}`")
    return ct.load_state().init_pid


def exec_in(ct: Container, argv: Sequence[str]) -> int:
    """Run argv in the CT with this process's stdio; returns its exit code (128+N if killed by N)."""
    init_pid = _require_running(ct)
    return _in_ct(ct, init_pid, lambda: _execvp(argv))


def enter(ct: Container) -> int:
    """An interactive login shell in the CT on a pty allocated inside the CT."""
    init_pid = _require_running(ct)

    def shell() -> None:
        path = next((s for s in SHELLS if os.path.exists(s)), "/bin/sh")
        os.environ.clear()
        os.environ.update(CT_ENV)
        status = pty.spawn([path, "-l"])
        os._exit(_exit_code(status))

    return _in_ct(ct, init_pid, shell)


def set_hostname(init_pid: int, hostname: str) -> None:
    fd = os.open(f"/proc/{init_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:
            _child(lambda: (linux.setns(fd, linux.CLONE_NEWUTS), socket.sethostname(hostname)))
        code = _exit_code(os.waitpid(child, 0)[1])
    finally:
        os.close(fd)
    if code:
        raise ExecFailed(f"cannot set hostname {hostname!r} in the CT")


def _in_ct(ct: Container, init_pid: int, body: Callable[[], None]) -> int:
    fds = [os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in JOIN_ORDER]
    try:
        child = os.fork()
        if child == 0:
            _child(lambda: _join_and_run(ct, fds, body))
        return _exit_code(os.waitpid(child, 0)[1])
    finally:
        for fd in fds:
            os.close(fd)


def _join_and_run(ct: Container, fds: list[int], body: Callable[[], None]) -> None:
    ct.cgroups.add(os.getpid())
    for fd in fds:
        linux.setns(fd)
    os.chdir("/")
    # setns(pid) applies to children only: the command runs in a child, this process relays its status.
    child = os.fork()
    if child == 0:
        _child(body)
    os._exit(_exit_code(os.waitpid(child, 0)[1]))


def _execvp(argv: Sequence[str]) -> None:
    try:
        os.execvpe(argv[0], list(argv), CT_ENV)
    except FileNotFoundError:
        os.write(2, f"vzpy: {argv[0]}: command not found in the CT\n".encode())
        os._exit(127)
    except PermissionError:
        os.write(2, f"vzpy: {argv[0]}: permission denied in the CT\n".encode())
        os._exit(126)


def _child(body: Callable[[], object]) -> None:
    try:
        body()
        os._exit(0)
    except BaseException as e:
        os.write(2, f"vzpy: {e}\n".encode())
        os._exit(126)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
