"""Running commands inside a live CT: exec (argv, or a line for the CT's shell; stdio and exit code pass through),
enter (a shell on a pty).

Nothing of the host reaches the CT, so whatever the command leaves running stays checkpointable:
- vzpy forks a *helper* that joins the CT's cgroups and namespaces (mount last: it changes what /proc and
  /sys mean) and forks the *command*, the first process in the CT's PID namespace, then only waits for
  it and forwards signals. vzpy moves the helper back out of the CT's cgroups once the command exists.
- the command starts a new session (inside the CT), puts its stdio on pipes vzpy made (exec) or on a pty
  it allocates inside the CT (enter), closes every other fd and execs with the CT's environment.
- vzpy relays between its own stdio and those pipes (or the pty master, which the command sends it), closes
  the command's stdin at EOF of its own, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT, and returns the command's
  exit code once the command exited and its output is drained; a daemon the command left holding the
  pipes is given a short grace, not waited for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vzpy.container import Container
from vzpy.dumpable import printable
from vzpy.errors import ExecFailed, NotRunning
from vzpy.runtime import caps, linux
from vzpy.runtime.cgroups import CGROUP_ROOT, CONTROLLERS
from vzpy.runtime.launcher import CT_ENV
from vzpy.stage import Stage

# time: a restored CT runs in the time namespace CRIU made for it (its clocks go on from the dump); a command
# left in the host's would see other clocks, and CRIU could not restore it ("Can't restore sub-task in NS")
JOIN_ORDER = ("ipc", "uts", "net", "pid", "time", "mnt")
SHELLS = ("/bin/bash", "/bin/sh")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# After the command exits, output still arriving is relayed this long; a daemon it left holding the
# pipes does not keep vzpy waiting beyond that.
EXIT_GRACE = 0.5
START_TIMEOUT = 15.0  # for the helper to report the command forked, and for enter's pty master
CHUNK = 1 << 16
MAX_BUFFERED = 1 << 20  # stdin read ahead of a command that does not read it
MAX_FD = (1 << 31) - 1
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int): the pty number, answered by pty masters only


def _require_running(ct: Container) -> int:
    stage = ct.stage()
    if stage is not Stage.RUNNING:
        raise NotRunning(f"CT {ct.ctid} is {stage.value}, not running; start it with `vzpy start {ct.ctid}`")
    return ct.load_state().init_pid


def exec_in(ct: Container, argv: Sequence[str]) -> int:
    """Run argv in the CT with stdio relayed through pipes; returns its exit code (128+N if killed by N)."""
    return _exec_piped(ct, lambda: _execvp(argv))


def exec_shell(ct: Container, line: str | None) -> int:
    """Run a command line with the CT's shell (its /bin/bash, else /bin/sh) as vzctl exec does; with None the
    shell reads its commands from stdin. Stdio relayed through pipes; returns the shell's exit code."""
    return _exec_piped(ct, lambda: _exec_shell(() if line is None else ("-c", line)))


def _exec_piped(ct: Container, run: Callable[[], None]) -> int:
    init_pid = _require_running(ct)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)

    def command() -> None:
        _become_ct_process((stdin_r, stdout_w, stderr_w))
        run()

    try:
        helper = _start(ct, init_pid, command)
    except BaseException:
        _close(stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w)
        raise
    _close(stdin_r, stdout_w, stderr_w)
    os.set_blocking(stdin_w, False)
    flows = [
        _Flow(source=0, sink=stdin_w, to_command=True),
        _Flow(source=stdout_r, sink=1),
        _Flow(source=stderr_r, sink=2),
    ]
    return _Relay(helper, flows, owned={stdin_w, stdout_r, stderr_r}).run()


def enter(ct: Container) -> int:
    """An interactive login shell in the CT on a pty allocated inside the CT; returns its exit code."""
    init_pid = _require_running(ct)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def shell() -> None:
        os.closerange(0, theirs.fileno())
        os.closerange(theirs.fileno() + 1, MAX_FD)
        _run_shell(theirs)

    try:
        try:
            helper = _start(ct, init_pid, shell)
        finally:
            theirs.close()
        try:
            master = _receive_master(ours)
        except BaseException:
            helper.kill(signal.SIGKILL)
            helper.wait()
            raise
    finally:
        ours.close()
    with _raw_terminal(master):
        flows = [_Flow(source=0, sink=master, to_command=True), _Flow(source=master, sink=1)]
        return _Relay(helper, flows, owned=set(), on_winch=lambda: _copy_window_size(master)).run()


def set_hostname(init_pid: int, hostname: str) -> None:
    fd = os.open(f"/proc/{init_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:

            def enter_and_set() -> None:
                linux.setns(fd, linux.CLONE_NEWUTS)
                socket.sethostname(hostname)

            _child(enter_and_set)
        code = _exit_code(os.waitpid(child, 0)[1])
    finally:
        os.close(fd)
    if code:
        raise ExecFailed(f"cannot set hostname {hostname!r} in the CT")


# --- the helper: joins the CT, forks the command, waits for it


@dataclass
class _Helper:
    pid: int
    pidfd: int
    reaped: int | None = None  # exit code once reaped

    def kill(self, sig: int) -> None:
        if self.reaped is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self) -> int:
        if self.reaped is None:
            self.reaped = _exit_code(os.waitpid(self.pid, 0)[1])
            os.close(self.pidfd)
        return self.reaped


def _start(ct: Container, init_pid: int, command: Callable[[], None]) -> _Helper:
    """Fork the helper; returns once the command runs in the CT and the helper has left its cgroups."""
    ns_fds = [os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in JOIN_ORDER]
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            _child(lambda: _helper(ct, ns_fds, report_w, command))
    finally:
        _close(*ns_fds, report_w)
    helper = _Helper(pid, os.pidfd_open(pid))
    try:
        forked = _read_report(report_r)
    finally:
        os.close(report_r)
    if not forked:
        helper.kill(signal.SIGKILL)  # still running only when it hangs
        code = helper.wait()
        raise ExecFailed(f"cannot enter CT {ct.ctid} (exit code {code}); see the message above")
    _leave_ct_cgroups(pid)
    return helper


def _helper(ct: Container, ns_fds: list[int], report_w: int, command: Callable[[], None]) -> None:
    os.setpgid(0, 0)  # the terminal's ^C reaches vzpy alone, which forwards it once
    ct.cgroups.add(os.getpid())
    for fd in ns_fds:
        linux.setns(fd)
    os.chdir("/")
    caps.drop_from_bounding_set()  # as the CT's init did: nothing in the CT holds more
    # setns(pid) applies to children only: the command is forked, this process stays on the host side
    child = os.fork()
    if child == 0:
        _child(command)
    # keep nothing of the command's: its stdin must see EOF when vzpy closes the other end
    os.closerange(3, report_w)
    os.closerange(report_w + 1, MAX_FD)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _forward(child, signum))
    os.write(report_w, b"f")
    os.close(report_w)
    os._exit(_exit_code(os.waitpid(child, 0)[1]))


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _read_report(fd: int) -> bool:
    if not select.select([fd], [], [], START_TIMEOUT)[0]:
        return False
    return os.read(fd, 1) == b"f"


def _leave_ct_cgroups(pid: int) -> None:
    """Put the helper back into vzpy's own cgroups: only the command and its children belong to the CT."""
    own = _own_cgroups()
    for controller in CONTROLLERS:
        if controller in own:
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / controller / own[controller].lstrip("/") / "cgroup.procs").write_text(str(pid))


def _own_cgroups() -> dict[str, str]:
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


# --- the command: becomes a process of the CT only


def _become_ct_process(stdio: tuple[int, int, int]) -> None:
    """Own session in the CT, stdio on `stdio`, no other fd, default signal dispositions."""
    os.setsid()
    _install_stdio(stdio)
    _reset_signals()
    os.umask(0o022)


def _install_stdio(stdio: tuple[int, int, int]) -> None:
    # first above 2, so no target of dup2 is still needed as a source
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(3, MAX_FD)


def _reset_signals() -> None:
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def _run_shell(channel: socket.socket) -> None:
    """The enter command: a pty allocated in the CT, its master sent to vzpy, a login shell on its slave."""
    os.setsid()
    try:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        socket.send_fds(channel, [b"ok"], [master])
    except OSError as e:
        channel.send(f"cannot allocate a terminal in the CT: {e}".encode())
        os._exit(126)
    channel.close()
    os.close(master)
    _install_stdio((slave, slave, slave))
    _reset_signals()
    os.umask(0o022)
    path = next((s for s in SHELLS if os.path.exists(s)), "/bin/sh")
    os.execve(path, [path, "-l"], CT_ENV)


def _receive_master(channel: socket.socket) -> int:
    channel.settimeout(START_TIMEOUT)
    try:
        data, fds, _, _ = socket.recv_fds(channel, 4096, 1)
    except TimeoutError:
        raise ExecFailed(f"the shell in the CT sent no terminal within {START_TIMEOUT:g}s") from None
    if data != b"ok" or len(fds) != 1:
        _close(*fds)
        raise ExecFailed(printable(data.decode(errors="replace"), limit=300) or "the shell in the CT exited early")
    master = fds[0]
    try:
        fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0")
    except OSError:
        os.close(master)
        raise ExecFailed("the CT's /dev/ptmx is not a pty multiplexer; a terminal cannot be opened there") from None
    os.set_blocking(master, False)
    return master


@contextlib.contextmanager
def _raw_terminal(master: int) -> Iterator[None]:
    """Our terminal (if stdin is one) in raw mode while relaying: the CT's pty does the line editing."""
    try:
        if not os.isatty(0):
            yield
            return
        saved = termios.tcgetattr(0)
        _copy_window_size(master)
        tty.setraw(0)
        try:
            yield
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    finally:
        os.close(master)


def _copy_window_size(master: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)


# --- the relay between vzpy's stdio and the command's


@dataclass
class _Flow:
    source: int
    sink: int
    to_command: bool = False  # vzpy's stdin -> the command: ends when the command does
    buffer: bytearray = field(default_factory=bytearray)
    open: bool = True

    @property
    def done(self) -> bool:
        return not self.open and not self.buffer


class _Relay:
    """Copies data along `flows` until the command has exited and its output is drained (or EXIT_GRACE
    passed). `owned` fds are closed when their flow ends: the command's stdin sees EOF, its output EPIPE."""

    def __init__(
        self,
        helper: _Helper,
        flows: list[_Flow],
        owned: set[int],
        on_winch: Callable[[], None] | None = None,
    ) -> None:
        self.helper = helper
        self.flows = flows
        self.owned = owned
        self.on_winch = on_winch
        self.exited_at: float | None = None

    def run(self) -> int:
        handlers: dict[int, Callable[[int, object], None]] = dict.fromkeys(FORWARDED_SIGNALS, self._forward)
        if self.on_winch is not None:
            handlers[signal.SIGWINCH] = self._winch
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            while not self._finished():
                self._step()
            return self.helper.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _close(*self.owned)
            self.helper.kill(signal.SIGKILL)  # only if vzpy itself failed before the command ended
            self.helper.wait()

    def _forward(self, signum: int, _frame: object) -> None:
        self.helper.kill(signum)

    def _winch(self, _signum: int, _frame: object) -> None:
        if self.on_winch is not None:
            self.on_winch()

    def _finished(self) -> bool:
        if self.exited_at is None:
            return False
        outputs = [flow for flow in self.flows if not flow.to_command]
        return all(flow.done for flow in outputs) or time.monotonic() > self.exited_at + EXIT_GRACE

    def _step(self) -> None:
        events: dict[int, int] = {}
        for flow in self.flows:
            if flow.open and len(flow.buffer) < MAX_BUFFERED:
                events[flow.source] = events.get(flow.source, 0) | select.POLLIN
            if flow.buffer:
                events[flow.sink] = events.get(flow.sink, 0) | select.POLLOUT
        if self.exited_at is None:
            events[self.helper.pidfd] = select.POLLIN
        poller = select.poll()
        for fd, mask in events.items():
            poller.register(fd, mask)
        timeout = None if self.exited_at is None else max(0.0, self.exited_at + EXIT_GRACE - time.monotonic())
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        if self.exited_at is None and self.helper.pidfd in ready:
            self._command_exited()
        for flow in self.flows:
            if flow.open and flow.source in ready:
                self._read(flow)
            if flow.buffer and flow.sink in ready:
                self._write(flow)

    def _command_exited(self) -> None:
        self.exited_at = time.monotonic()
        self.helper.wait()
        for flow in self.flows:
            if flow.to_command:
                self._end(flow)

    def _read(self, flow: _Flow) -> None:
        try:
            data = os.read(flow.source, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO from a pty master once no slave is open; EBADF for a closed stdin
            data = b""
        if data:
            flow.buffer += data
        elif flow.buffer:
            flow.open = False
        else:
            self._end(flow)

    def _write(self, flow: _Flow) -> None:
        try:
            written = os.write(flow.sink, flow.buffer)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                raise
            self._end(flow)  # nobody reads any more
            return
        del flow.buffer[:written]
        if not flow.buffer and not flow.open:
            self._end(flow)

    def _end(self, flow: _Flow) -> None:
        flow.open = False
        flow.buffer.clear()
        ours = flow.sink if flow.to_command else flow.source
        if ours in self.owned and not any(f.open and ours in (f.source, f.sink) for f in self.flows):
            self.owned.discard(ours)
            _close(ours)


# --- small things


def _execvp(argv: Sequence[str]) -> None:
    try:
        os.execvpe(argv[0], list(argv), CT_ENV)
    except FileNotFoundError:
        os.write(2, f"vzpy: {argv[0]}: command not found in the CT\n".encode())
        os._exit(127)
    except PermissionError:
        os.write(2, f"vzpy: {argv[0]}: permission denied in the CT\n".encode())
        os._exit(126)


def _exec_shell(args: Sequence[str]) -> None:
    """The CT's own shell, looked up inside the CT (the command runs in its mount namespace)."""
    for path in SHELLS:
        try:
            os.execve(path, [path, *args], CT_ENV)
        except FileNotFoundError:
            continue
        except PermissionError:
            os.write(2, f"vzpy: {path}: permission denied in the CT\n".encode())
            os._exit(126)
    os.write(2, f"vzpy: no shell ({', '.join(SHELLS)}) in the CT\n".encode())
    os._exit(127)


def _child(body: Callable[[], object]) -> None:
    try:
        body()
        os._exit(0)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"vzpy: {e}\n".encode())
        os._exit(126)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
