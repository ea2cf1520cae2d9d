"""The one way vzpy runs other programs: argv lists, never shell strings; failures carry stderr's tail.

`run` is for programs that finish; `spawn` for long-lived ones (a CRIU swrk, an ssh tunnel, an rsync whose
progress is read while it runs): each gets a deadline, its stderr kept in a file for the error's tail, and
is killed and reaped when its `Child` is closed, whatever happened meanwhile.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from vzpy.errors import CommandFailed, VzError

STDERR_TAIL_LINES = 8
STDERR_TAIL_BYTES = 16 << 10
READ_CHUNK = 1 << 16
REAP_TIMEOUT = 10.0  # a SIGKILLed child is gone at once; longer means it is stuck in the kernel (D state)

Argv = Sequence[str | os.PathLike[str]]
# Where a spawned child's stdout goes: nowhere, a pipe we read (Child.stdout, Child.lines), or stderr's file.
StdoutTo = Literal["null", "pipe", "stderr"]


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Argv,
    *,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    error: type[VzError] = CommandFailed,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture text output; on a non-zero exit raise `error` with the stderr tail."""
    args = [os.fspath(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise error(f"{what or args[0]}: {args[0]} is not installed (run `make setup`)") from e
    except subprocess.TimeoutExpired as e:
        raise error(f"{what or args[0]}: timed out after {timeout:g}s") from e
    if check and result.returncode != 0:
        raise error(
            f"{what or ' '.join(args[:3])} failed with exit code {result.returncode}",
            detail=tail(result.stderr or result.stdout),
        )
    return result


def _stdout_target(to: StdoutTo, stderr: IO[bytes]) -> int | IO[bytes]:
    """Where a spawned child's stdout goes: /dev/null, a pipe to us, or the file its stderr goes to."""
    if to == "stderr":
        return stderr
    return subprocess.PIPE if to == "pipe" else subprocess.DEVNULL


def spawn(
    argv: Argv,
    *,
    timeout: float | None,
    what: str | None = None,
    error: type[VzError] = CommandFailed,
    stdout: StdoutTo = "null",
    pass_fds: Iterable[int] = (),
    new_session: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Child:
    """Start argv as a long-lived child (stdin /dev/null, stderr to an anonymous file); `timeout` seconds
    from now is its deadline (None: the caller supervises it). Use it as a context manager, or close() it."""
    args = [os.fspath(a) for a in argv]
    name = what or args[0]
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the Child closes it
    try:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=_stdout_target(stdout, stderr),
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            # Out of our session: a ^C on the operator's terminal must not kill it halfway.
            start_new_session=new_session,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
        )
    except OSError as e:
        stderr.close()
        hint = " (run `make setup`)" if isinstance(e, FileNotFoundError) else ""
        raise error(f"{name}: cannot run {args[0]}: {e.strerror}{hint}") from e
    deadline = None if timeout is None else time.monotonic() + timeout
    return Child(process, stderr, what=name, error=error, timeout=timeout, deadline=deadline)


class Child:
    """A process started by `spawn`. Every wait is bounded by its deadline; close() always reaps it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr: IO[bytes],
        *,
        what: str,
        error: type[VzError],
        timeout: float | None,
        deadline: float | None,
    ) -> None:
        self.process = process
        self.what = what
        self.error = error
        self.timeout = timeout
        self.deadline = deadline
        self._stderr = stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> IO[bytes]:
        if self.process.stdout is None:
            raise ValueError(f"{self.what}: spawned without stdout='pipe'")
        return self.process.stdout

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        return self.process.poll()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative); None without one."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it exits within `timeout` seconds and before the deadline; None if it still runs."""
        limits = [t for t in (timeout, self.remaining()) if t is not None]
        try:
            return self.process.wait(min(limits) if limits else None)
        except subprocess.TimeoutExpired:
            return None

    def finish(self, *, check: bool = True) -> int:
        """Wait for its exit within the deadline (past it: kill it and raise `error`); with `check`, a non-zero
        exit raises `error` too. Both errors carry stderr's tail."""
        code = self.wait()
        if code is None:
            self.kill()
            raise self.timed_out()
        if check and code != 0:
            raise self.failed()
        return code

    def timed_out(self) -> VzError:
        after = f" after {self.timeout:g}s" if self.timeout is not None else ""
        return self.error(f"{self.what}: timed out{after}", detail=self.stderr_tail())

    def failed(self, message: str | None = None) -> VzError:
        """`error` for its exit: `message` or "WHAT failed with exit code N", with stderr's tail."""
        code = self.process.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"failed with exit code {code}"
        return self.error(message or f"{self.what} {how}", detail=self.stderr_tail())

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        """The last lines of what it wrote to stderr so far."""
        if self._stderr.closed:
            return ""
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(size - STDERR_TAIL_BYTES, 0))
        return tail(self._stderr.read().decode(errors="replace"), lines)

    def lines(self, separators: bytes = b"\n") -> Iterator[bytes]:
        """Its stdout (spawned with stdout='pipe') split at any byte of `separators`, until EOF; past the
        deadline it is killed and `error` raised. Nothing else reads stdout meanwhile."""
        fd = self.stdout.fileno()
        split = re.compile(b"[" + re.escape(separators) + b"]")
        pending = b""
        while True:
            chunk = self._read_some(fd)
            if chunk == b"":
                if pending:
                    yield pending
                return
            *complete, pending = split.split(pending + (chunk or b""))
            yield from complete

    def _read_some(self, fd: int) -> bytes | None:
        """Up to READ_CHUNK bytes; b"" at EOF; None if nothing came within a short wait."""
        if self.expired():
            self.kill()
            raise self.timed_out()
        wait = min(0.5, self.remaining() or 0.5)
        ready, _, _ = select.select([fd], [], [], wait)
        return os.read(fd, READ_CHUNK) if ready else None

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill(self, wait: float = REAP_TIMEOUT) -> bool:
        """SIGKILL it (if still running) and reap it; False if it is not dead after `wait` seconds.

        A process blocked in the kernel dies only once that call returns (CRIU's ptrace attach to a frozen task
        waits for the thaw): a caller that is the one to unblock it must not wait long. A later wait() or
        close(), or else the subprocess module, reaps such a straggler."""
        self.signal(signal.SIGKILL)
        return self._reaped(wait)

    def terminate(self, grace: float, wait: float = REAP_TIMEOUT) -> bool:
        """SIGTERM, up to `grace` seconds to exit, then SIGKILL (as kill)."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            if self._reaped(grace):
                return True
        return self.kill(wait)

    def _reaped(self, wait: float) -> bool:
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self, grace: float = 0.0, wait: float = REAP_TIMEOUT) -> None:
        """Stop it if it still runs (SIGTERM first when `grace` > 0), reap it (waiting at most `wait` seconds
        for a SIGKILLed one to die), close our files. Idempotent; never raises for a straggler."""
        try:
            if grace > 0:
                self.terminate(grace, wait)
            else:
                self.kill(wait)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._stderr.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
