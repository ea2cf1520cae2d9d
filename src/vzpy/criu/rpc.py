"""Talking to `criu swrk` over a SOCK_SEQPACKET socketpair: request, NOTIFY round trips, final response.

Each call starts its own swrk (as runc does): `criu swrk <fd>` gets one end of a socketpair, we keep the
other. CRIU answers a request with NOTIFY messages at each action-script point (when notify_scripts is set),
each of which we must answer with a NOTIFY request (notify_success false makes CRIU abort), and then with
one final response of the request's type.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from vzpy import proc
from vzpy.criu import diagnose
from vzpy.criu.binary import CriuBinary, CriuVersion, load_rpc
from vzpy.criu.options import IMAGE_ACTIONS, CriuAction, CriuOptions, build_request, open_dirs
from vzpy.errors import ChkpntError, CriuUnavailable, RestoreError, VzError

# notify(script, pid): script is CRIU's action name ("pre-dump", "post-dump", "network-lock",
# "network-unlock", "setup-namespaces", "post-setup-namespaces", "pre-resume", "post-resume",
# "post-restore", "orphan-pts-master", "status-ready", ...); pid is the restored root's host pid for
# "setup-namespaces" and "post-restore", else 0. Raising makes CRIU abort the dump/restore.
NotifyCallback = Callable[[str, int], None]
# on_fd(script, fd): an fd CRIU sent with a notification (the pty master with "orphan-pts-master").
# The callee owns the fd.
FdCallback = Callable[[str, int], None]
# Closes the connection a dump sends its pages through: CRIU's send or wait on it fails, and CRIU stops cleanly.
CutOff = Callable[[], None]

DEFAULT_TIMEOUT = 600.0
EXIT_GRACE = 10.0  # how long a swrk may take to exit after its final answer
KILL_GRACE = 10.0  # how long a SIGKILLed swrk may take to die (it finishes the syscall it is in first)
CUT_GRACE = 10.0  # how long a CRIU whose page-server connection we closed may take to fail cleanly
SEND_TIMEOUT = 10.0  # a request is a few hundred bytes: a full socket buffer means CRIU stopped reading
PAGE_SERVER_CONNECT_TIMEOUT = 10.0
RECV_BUFFER = 1 << 16
MAX_FDS_PER_MESSAGE = 8
LOG_TAIL_BYTES = 16 << 20
EXCERPT_LINES_BEFORE = 3
EXCERPT_MAX_ERRORS = 6
# Logged as errors on every run on hosts whose root lacks CAP_SYS_RESOURCE (like ours), without failing
# anything: leaving them in would make every message blame the wrong thing.
BENIGN_ERRORS = ("Can't setup RLIMIT_NOFILE",)

_ERROR_LINE = re.compile(r"^(?:\(\s*[\d.]+\)\s*)?(?:\d+:\s*)?Error\s+\([^)]*\):\s*(?P<message>.*)$")
# CRIU's warning for a task of the freezer cgroup outside the dumped tree: it is left out of the dump
_STRAY_TASK = re.compile(rb"Unexpected process (\d+) in the freezer cgroup")


# --- CRIU log reading ---------------------------------------------------------------------------


def _is_benign(line: str) -> bool:
    return any(benign in line for benign in BENIGN_ERRORS)


def _error_message(line: str) -> str | None:
    match = _ERROR_LINE.match(line.strip())
    if not match or _is_benign(line):
        return None
    return match.group("message").strip()


def first_error(log_text: str) -> str | None:
    """The message of CRIU's first (non-benign) Error line: usually the cause, later ones are fallout."""
    for line in log_text.splitlines():
        message = _error_message(line)
        if message:
            return message
    return None


def log_excerpt(log_text: str, *, before: int = EXCERPT_LINES_BEFORE, max_errors: int = EXCERPT_MAX_ERRORS) -> str:
    """CRIU's Error lines, each with a few lines before it; "..." marks skipped lines."""
    lines = [line for line in log_text.splitlines() if not _is_benign(line)]
    picked: list[str] = []
    last = -1
    errors = 0
    for index, line in enumerate(lines):
        if _error_message(line) is None:
            continue
        start = max(index - before, last + 1)
        if start > last + 1:
            picked.append("...")
        picked.extend(lines[start : index + 1])
        last = index
        errors += 1
        if errors == max_errors:
            break
    return "\n".join(picked)


def read_log(path: Path | None) -> str:
    """The log's text (its tail if huge); "" when missing."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def freezer_strays(log_path: Path | None) -> list[int]:
    """Pids a dump with freeze_cgroup found in the cgroup but not in the tree, and so left out (CRIU only
    warns: "Unexpected process N in the freezer cgroup")."""
    try:
        # the whole log, not read_log's tail: CRIU writes this while it seizes, near the start
        text = log_path.read_bytes() if log_path is not None else b""
    except OSError:
        return []
    if b"Unexpected process" not in text:
        return []
    return [int(match.group(1)) for match in _STRAY_TASK.finditer(text)]


def _detail(log_path: Path | None, *extra: str) -> str:
    parts = [part for part in (*extra, log_excerpt(read_log(log_path))) if part]
    if log_path is not None:
        parts.append(f"CRIU log: {log_path}")
    return "\n".join(parts)


# --- the swrk process ---------------------------------------------------------------------------


class _Swrk:
    """One `criu swrk` process and our end of its socket."""

    def __init__(self, binary: Path, pass_fds: Iterable[int] = ()) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            # Its output goes to spawn's file: nobody has to drain it while CRIU works, and it survives CRIU's
            # exit. Out of our session: a ^C on our terminal must not kill CRIU halfway through a dump. No
            # deadline here: each conversation has its own budget.
            self.process = proc.spawn(
                [binary, "swrk", str(theirs.fileno())],
                timeout=None,
                what="criu swrk",
                error=CriuUnavailable,
                stdout="stderr",
                pass_fds=(theirs.fileno(), *pass_fds),
                new_session=True,
            )
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()

    def send(self, message: Any) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        self.sock.send(message.SerializeToString())

    def receive(self, timeout: float) -> tuple[Any, list[int]] | None:
        """The next response and any fds sent with it; None when CRIU closed the socket (it died)."""
        self.sock.settimeout(max(timeout, 0.001))
        data, fds, flags, _ = socket.recv_fds(self.sock, RECV_BUFFER, MAX_FDS_PER_MESSAGE)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise OSError("CRIU response truncated")
        if not data:
            return None
        resp = load_rpc().criu_resp()
        resp.ParseFromString(data)
        return resp, fds

    def stderr_tail(self) -> str:
        return self.process.stderr_tail()

    def exit_status(self, timeout: float) -> int | None:
        return self.process.wait(timeout)

    def kill(self) -> bool:
        """SIGKILL the swrk and reap it; False if it is still not dead after KILL_GRACE.

        A CRIU blocked in the kernel dies only when that call returns (e.g. a ptrace attach to a task that is
        both stopped and frozen waits until the freezer is thawed): the caller must not wait for that, as it
        is the one who thaws. The subprocess module reaps such a straggler later."""
        return self.process.kill(KILL_GRACE)

    def close_files(self) -> None:
        """Close our end and CRIU's output file (after kill(): a straggler is not waited for again)."""
        self.sock.close()
        self.process.close(wait=0)

    def finish(self) -> None:
        """Close our end and reap the swrk (killing it if it does not exit on its own)."""
        self.sock.close()
        if self.exit_status(EXIT_GRACE) is None:
            self.kill()
        self.process.close(wait=0)


# --- a dump's connection to its page server -----------------------------------------------------


@contextlib.contextmanager
def _page_server_connection(
    opts: CriuOptions, notify: NotifyCallback | None, what: str
) -> Iterator[tuple[CriuOptions, NotifyCallback | None, CutOff | None]]:
    """For a dump that sends its pages to a page server: the options and notify callback to use, with a
    connection to the page server that we open and CRIU uses (ps.fd), and what closes that connection;
    unchanged for any other dump (and no cut-off).

    CRIU corks that socket (TCP_CORK) when it connects and never uncorks it, so its last message, the close
    whose answer it waits for, stays in the socket until the kernel sends a corked partial frame anyway:
    200 ms later, with the CT frozen. Holding the same socket, we take the cork off at each notification
    after CRIU connected (from network-lock on, before any page is sent); the bytes sent do not change.

    A page server that stops reading or answering (a link gone silent) blocks CRIU in the middle of the
    dump, its parasite code still in the tasks, where no notification comes to abort at: shutting the same
    socket down makes that send or wait fail, and CRIU cures the tasks and fails the dump."""
    if opts.page_server is None or opts.lazy_pages or opts.page_server_fd is not None:
        yield opts, notify, None
        return
    address, port = opts.page_server
    try:
        connection = socket.create_connection((address, port), timeout=PAGE_SERVER_CONNECT_TIMEOUT)
    except OSError as e:
        raise ChkpntError(f"{what}: cannot connect to the page server at {address}:{port}: {e}") from e
    with connection:
        connection.setblocking(True)  # CRIU uses the same file: a timeout would make it non-blocking for CRIU too
        yield replace(opts, page_server_fd=connection.fileno()), _uncorking(connection, notify), _cut_off(connection)


def _cut_off(connection: socket.socket) -> CutOff:
    def cut() -> None:
        with contextlib.suppress(OSError):  # already closed by the other end: CRIU sees that as well
            connection.shutdown(socket.SHUT_RDWR)

    return cut


def _uncorking(connection: socket.socket, notify: NotifyCallback | None) -> NotifyCallback:
    def uncork_then_notify(script: str, pid: int) -> None:
        if script != "pre-dump":  # the only notification before CRIU corks the socket
            with contextlib.suppress(OSError):  # only a delay is at stake, never the bytes
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        if notify is not None:
            notify(script, pid)

    return uncork_then_notify


# --- one conversation ---------------------------------------------------------------------------


class _Conversation:
    """Drives one request to its final response, answering NOTIFY messages on the way."""

    def __init__(
        self,
        swrk: _Swrk,
        *,
        error: type[VzError],
        what: str,
        log_path: Path | None,
        timeout: float,
        notify: NotifyCallback | None = None,
        on_fd: FdCallback | None = None,
        abort_after: float | None = None,
        cut_off: CutOff | None = None,
    ) -> None:
        self.swrk = swrk
        self.error = error
        self.what = what
        self.log_path = log_path
        self.timeout = timeout
        self.budget = timeout  # seconds CRIU may still take; time spent in callbacks does not count
        self.notify = notify
        self.on_fd = on_fd
        self.callback_failure: tuple[str, Exception] | None = None
        self.abort_after = abort_after
        self.abort_at = None if abort_after is None else time.monotonic() + abort_after
        self.aborted_at: str | None = None  # the notification at which CRIU was told to abort
        self.cut_off = cut_off
        self.cut_because: str | None = None  # why the page-server connection was closed, once it was

    def run(self, request: Any) -> Any:
        try:
            self.swrk.send(request)
        except OSError:
            raise self._died() from None
        while True:
            resp, fds = self._receive()
            if resp.type != load_rpc().NOTIFY:
                return self._final(request, resp)
            self._answer_notify(resp.notify.script, resp.notify.pid, fds)

    def _receive(self) -> tuple[Any, list[int]]:
        while True:
            abort_due = self._abort_due()
            wait = self.budget if abort_due is not False else min(self.budget, self._until_abort())
            try:
                return self._receive_within(wait)
            except TimeoutError:
                if self._cut_at_deadline():
                    continue
                if self.budget <= 0 or self._abort_due() is not True or abort_due:
                    raise self._killed() from None
                # past abort_after: CRIU is told to abort at its next notification, a clean stop (killing it
                # while its parasite code runs inside a task would kill that task)

    def _cut_at_deadline(self) -> bool:
        """Past abort_after or out of budget, a dump with a page-server connection is stopped by closing it
        (CRIU may be blocked on it, where no notification comes); CUT_GRACE more for CRIU to fail cleanly."""
        if self.cut_off is None or self.cut_because is not None:
            return False
        if self.budget <= 0:
            self.cut_because = f"timed out after {self.timeout:g}s"
        elif self._abort_due():
            self.cut_because = f"ran past its {self.abort_after:g}s"
        else:
            return False
        self.cut_off()
        self.budget = max(self.budget, CUT_GRACE)
        return True

    def _abort_due(self) -> bool | None:
        """None without abort_after; else whether it has passed."""
        return None if self.abort_at is None else time.monotonic() >= self.abort_at

    def _until_abort(self) -> float:
        return 0.0 if self.abort_at is None else max(self.abort_at - time.monotonic(), 0.0)

    def _killed(self) -> VzError:
        how = "CRIU killed" if self.swrk.kill() else f"CRIU pid {self.swrk.process.pid} killed, not dead yet"
        return self.error(f"{self.what} timed out after {self.timeout:g}s ({how})", detail=_detail(self.log_path))

    def _receive_within(self, wait: float) -> tuple[Any, list[int]]:
        started = time.monotonic()
        try:
            received = self.swrk.receive(wait)
        except ConnectionResetError:
            # CRIU exited with our request still unread in its socket.
            raise self._died() from None
        except TimeoutError:
            self.budget -= time.monotonic() - started
            raise
        except OSError as e:
            raise self.error(f"{self.what}: lost CRIU's RPC socket: {e}", detail=_detail(self.log_path)) from e
        self.budget -= time.monotonic() - started
        if received is None:
            raise self._died()
        return received

    def _answer_notify(self, script: str, pid: int, fds: list[int]) -> None:
        success = True
        try:
            self._hand_over(script, fds)
            if self.notify is not None:
                self.notify(script, pid)
        except Exception as e:
            # CRIU aborts the operation when told the "script" failed; its final answer follows.
            self.callback_failure = (script, e)
            success = False
        if success and self._abort_due() and self.aborted_at is None:
            self.aborted_at = script
            success = False
        answer = load_rpc().criu_req(type=load_rpc().NOTIFY, notify_success=success)
        try:
            self.swrk.send(answer)
        except OSError:
            raise self._died() from None

    def _hand_over(self, script: str, fds: list[int]) -> None:
        for index, fd in enumerate(fds):
            if self.on_fd is None:
                os.close(fd)
                continue
            try:
                self.on_fd(script, fd)
            except BaseException:
                for rest in fds[index + 1 :]:
                    os.close(rest)
                raise

    def _final(self, request: Any, resp: Any) -> Any:
        if self.cut_because is not None:
            outcome = "CRIU finished anyway" if resp.success else "CRIU stopped cleanly"
            raise self.error(
                f"{self.what} {self.cut_because}; its page-server connection was closed to stop it ({outcome})",
                detail=_detail(self.log_path),
            )
        if self.aborted_at is not None:
            outcome = "CRIU finished anyway" if resp.success else "CRIU stopped cleanly"
            raise self.error(
                f"{self.what} ran past its {self.abort_after:g}s and was aborted at {self.aborted_at} ({outcome})",
                detail=_detail(self.log_path),
            )
        if self.callback_failure is not None:
            script, cause = self.callback_failure
            outcome = "CRIU finished anyway" if resp.success else "CRIU aborted"
            raise self.error(
                f"{self.what}: {script} callback failed: {cause} ({outcome})", detail=_detail(self.log_path)
            ) from cause
        if resp.type != _expected_response_type(request.type) or not resp.success:
            raise self.error(f"{self.what} failed: {self._reason(resp)}", detail=_detail(self.log_path))
        return resp

    def _reason(self, resp: Any) -> str:
        log = read_log(self.log_path)
        reason = diagnose.explain(log) or first_error(log) or resp.cr_errmsg
        if not reason and resp.cr_errno:
            reason = os.strerror(resp.cr_errno)
        if resp.type == load_rpc().EMPTY:
            reason = f"CRIU refused the request ({reason or 'invalid request'})"
        return reason or "no reason given"

    def _died(self) -> VzError:
        status = self.swrk.exit_status(5.0)
        how = "did not exit" if status is None else _describe_exit(status)
        stderr = self.swrk.stderr_tail()
        return self.error(f"{self.what}: criu swrk {how} before answering", detail=_detail(self.log_path, stderr))


def _expected_response_type(request_type: int) -> int:
    rpc = load_rpc()
    # CRIU answers a PAGE_SERVER_CHLD request with a PAGE_SERVER response.
    return rpc.PAGE_SERVER if request_type == rpc.PAGE_SERVER_CHLD else request_type


def _describe_exit(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with code {status}"


# --- public API ---------------------------------------------------------------------------------


class PageServer:
    """A running `criu page-server` (a child of its own swrk, which can report its exit status)."""

    def __init__(self, swrk: _Swrk, pid: int, port: int, what: str, timeout: float) -> None:
        self._swrk = swrk
        self.pid = pid
        self.port = port
        self._what = what
        self._timeout = timeout
        self.exit_code: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the page server exits (it does once the dump side is done); its exit code.

        On timeout the page server is killed and ChkpntError raised.
        """
        if self.exit_code is not None:
            return self.exit_code
        rpc = load_rpc()
        conversation = _Conversation(
            self._swrk,
            error=ChkpntError,
            what=f"{self._what} (waiting for pid {self.pid})",
            log_path=None,
            timeout=self._timeout if timeout is None else timeout,
        )
        try:
            resp = conversation.run(rpc.criu_req(type=rpc.WAIT_PID, pid=self.pid))
        except VzError:
            # The swrk is gone (timed out and killed, or died): the page server has no one to stop it.
            self._kill_page_server()
            self.exit_code = -signal.SIGKILL
            raise
        finally:
            self._swrk.finish()
        self.exit_code = os.waitstatus_to_exitcode(resp.status)
        return self.exit_code

    def stop(self) -> None:
        """Kill the page server if it still runs, and reap it and its swrk."""
        if self.exit_code is None:
            self._kill_page_server()
            self.wait(EXIT_GRACE)

    def _kill_page_server(self) -> None:
        # Safe from pid reuse while the swrk lives: until it answers WAIT_PID, the page server is its
        # unreaped child.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> PageServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Criu:
    """CRIU through its RPC. Each method runs one `criu swrk`; failures raise the action's VzError
    with CRIU's Error lines (and the log's path) in `detail`.

    `timeout` bounds the time CRIU itself takes per call (not the time spent in notify callbacks). When it
    runs out, CRIU is killed: ptrace-seized tasks resume, but a freeze_cgroup stays FROZEN until the
    caller thaws it.
    """

    def __init__(self, binary: CriuBinary | str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.binary = binary.path if isinstance(binary, CriuBinary) else Path(binary)
        self.timeout = timeout

    def dump(
        self, opts: CriuOptions, *, notify: NotifyCallback | None = None, abort_after: float | None = None
    ) -> None:
        """Checkpoint the tree rooted at opts.pid into opts.images_dir (ChkpntError on failure).

        abort_after: seconds after which CRIU is told to abort at its next notification (network-lock,
        post-dump, ...): it then releases the tree intact and fails. Killing it instead (the `timeout`, for a
        CRIU that hangs) kills any task its parasite code is running in at that moment. A dump to a page server
        is stopped at either deadline by closing its connection first (CUT_GRACE before a kill)."""
        what = f"criu dump of pid {opts.pid}"
        with _page_server_connection(opts, notify, what) as (opts, notify, cut_off):
            self.call(
                CriuAction.DUMP,
                _with_notify(opts, notify is not None or abort_after is not None),
                error=ChkpntError,
                what=what,
                notify=notify,
                abort_after=abort_after,
                cut_off=cut_off,
            )
        strays = freezer_strays(opts.log_path(CriuAction.DUMP)) if opts.freeze_cgroup else []
        if strays:
            raise ChkpntError(
                f"{what}: task {', '.join(map(str, strays))} of {opts.freeze_cgroup} is outside the dumped tree, "
                "so CRIU left it out (it joined while the dump ran: a `vzpy exec` started meanwhile?); retry",
                detail=f"CRIU log: {opts.log_path(CriuAction.DUMP)}",
            )

    def pre_dump(self, opts: CriuOptions, *, notify: NotifyCallback | None = None) -> None:
        """Copy the tree's memory while it keeps running (needs mem_dirty_track)."""
        what = f"criu pre-dump of pid {opts.pid}"
        self.call(
            CriuAction.PRE_DUMP, _with_notify(opts, notify is not None), error=ChkpntError, what=what, notify=notify
        )

    def restore(
        self,
        opts: CriuOptions,
        *,
        notify: NotifyCallback | None = None,
        on_pty_master: Callable[[int], None] | None = None,
    ) -> int:
        """Restore the tree from opts.images_dir; the restored root's host pid (RestoreError on failure)."""

        def pty_master(script: str, fd: int) -> None:
            if on_pty_master is not None and script == "orphan-pts-master":
                on_pty_master(fd)
            else:
                os.close(fd)

        # CRIU sends fds only to an RPC client that asked for notifications.
        wants_notify = notify is not None or on_pty_master is not None
        resp = self.call(
            CriuAction.RESTORE,
            _with_notify(opts, wants_notify),
            error=RestoreError,
            what=f"criu restore from {opts.images_dir}",
            notify=notify,
            on_fd=pty_master,
        )
        return int(resp.restore.pid)

    def page_server(self, opts: CriuOptions) -> PageServer:
        """Start a page server writing into opts.images_dir, listening on opts.page_server."""
        what = f"criu page-server on {opts.page_server}"
        try:
            with open_dirs(CriuAction.PAGE_SERVER, opts) as dirs:
                request = build_request(CriuAction.PAGE_SERVER, opts, dirs)
                # keep_open: the swrk stays to wait for its page-server child and report how it ended.
                request.keep_open = True
                swrk = self._start(opts)
                try:
                    resp = self._converse(swrk, CriuAction.PAGE_SERVER, opts, request, error=ChkpntError, what=what)
                except BaseException:
                    swrk.kill()
                    swrk.close_files()
                    raise
        except OSError as e:
            raise ChkpntError(f"{what}: {e}") from e
        return PageServer(swrk, int(resp.ps.pid), int(resp.ps.port), what, self.timeout)

    def check(self) -> None:
        """CRIU's own kernel check (CriuUnavailable on failure)."""
        self.call(CriuAction.CHECK, CriuOptions(), error=CriuUnavailable, what=f"{self.binary} check")

    def check_feature(self, name: str) -> bool:
        """`criu check --feature NAME` (any feature of `criu --help`; ValueError for an unknown name)."""
        result = proc.run([self.binary, "check", "--feature", name], check=False, timeout=60)
        if "Unknown feature" in result.stderr + result.stdout:
            raise ValueError(f"CRIU {self.binary} knows no feature {name!r}")
        return result.returncode == 0

    def feature_check(self) -> dict[str, bool]:
        """The RPC feature check: mem_track, lazy_pages, pidfd_store (as CRIU's kerndat sees them)."""
        resp = self.call(
            CriuAction.FEATURE_CHECK, CriuOptions(), error=CriuUnavailable, what=f"{self.binary} feature check"
        )
        return {name: bool(getattr(resp.features, name)) for name in CriuOptions().features}

    def version(self) -> CriuVersion:
        resp = self.call(CriuAction.VERSION, CriuOptions(), error=CriuUnavailable, what=f"{self.binary} version")
        v = resp.version
        return CriuVersion(v.major_number, v.minor_number, v.sublevel if v.HasField("sublevel") else 0)

    def call(
        self,
        action: CriuAction,
        opts: CriuOptions,
        *,
        error: type[VzError],
        what: str | None = None,
        notify: NotifyCallback | None = None,
        on_fd: FdCallback | None = None,
        abort_after: float | None = None,
        cut_off: CutOff | None = None,
    ) -> Any:
        """Run one request in its own swrk; the final criu_resp. Failures raise `error`."""
        what = what or f"criu {action}"
        try:
            with open_dirs(action, opts) as dirs:
                request = build_request(action, opts, dirs)
                swrk = self._start(opts)
                try:
                    return self._converse(
                        swrk,
                        action,
                        opts,
                        request,
                        error=error,
                        what=what,
                        notify=notify,
                        on_fd=on_fd,
                        abort_after=abort_after,
                        cut_off=cut_off,
                    )
                finally:
                    swrk.finish()
        except OSError as e:
            raise error(f"{what}: {e}") from e

    def _start(self, opts: CriuOptions) -> _Swrk:
        try:
            # inherit_fd entries and the page server's socket name fds that must exist in CRIU at the same numbers.
            page_server = () if opts.page_server_fd is None else (opts.page_server_fd,)
            return _Swrk(self.binary, pass_fds=(*opts.inherit_fd.values(), *page_server))
        except OSError as e:
            raise CriuUnavailable(f"cannot start {self.binary} swrk: {e}; run `make setup`") from e

    def _converse(
        self,
        swrk: _Swrk,
        action: CriuAction,
        opts: CriuOptions,
        request: Any,
        *,
        error: type[VzError],
        what: str,
        notify: NotifyCallback | None = None,
        on_fd: FdCallback | None = None,
        abort_after: float | None = None,
        cut_off: CutOff | None = None,
    ) -> Any:
        conversation = _Conversation(
            swrk,
            error=error,
            what=what,
            log_path=opts.log_path(action) if action in IMAGE_ACTIONS else None,
            timeout=self.timeout,
            notify=notify,
            on_fd=on_fd,
            abort_after=abort_after,
            cut_off=cut_off,
        )
        return conversation.run(request)


def _with_notify(opts: CriuOptions, wanted: bool) -> CriuOptions:
    return replace(opts, notify_scripts=True) if wanted else opts
