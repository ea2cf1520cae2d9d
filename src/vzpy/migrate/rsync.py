"""rsync of a local directory to the destination over OpenSSH, with progress.

The argv is built, never a shell string: rsync's -e value is one argv element made of validated words
(ssh.OpenSsh.rsh), the operator's --rsync-opts are shlex-split into separate elements that must all be
options (`--opt=value` for options taking a value) and may not replace the transport (-e/--rsh), and the
paths come after `--`. rsync is run with subprocess.Popen rather than proc.run because its progress is
read while it runs.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzpy.migrate import CopyFailed, MigrateUsage
from vzpy.migrate.ssh import OpenSsh

RSYNC = "rsync"
# --modify-window=-1: compare mtimes to the nanosecond. rsync's default quick check compares whole seconds,
# so a file rewritten at the same size within the second of the previous pass would be skipped (seen here:
# the frozen final pass missed a counter file, and the restore's fingerprint check refused it).
BASE_OPTIONS = ("-aHAXS", "--numeric-ids", "--delete", "--modify-window=-1", "--info=progress2")
EXIT_VANISHED = 24  # "some files vanished before they could be transferred": normal while the CT runs
FORBIDDEN_LONG = ("--rsh", "--server", "--sender", "--daemon", "--config", "--files-from", "--old-args")
STDERR_TAIL = 16384
EXIT_MEANINGS = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files or dirs",
    5: "error starting client-server protocol",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in the rsync protocol data stream",
    20: "interrupted",
    23: "partial transfer due to error",
    24: "some source files vanished",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    255: "ssh failed",
}
# --info=progress2: "  1,234,567  45%   12.34MB/s    0:00:01 (xfr#3, to-chk=10/20)"
PROGRESS_RE = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+)\s+(\d+:\d\d:\d\d)")


@dataclass(frozen=True)
class Progress:
    bytes: int
    percent: int
    rate: str
    eta: str


@dataclass(frozen=True)
class RsyncResult:
    bytes: int
    seconds: float
    exit_code: int


ProgressCallback = Callable[[Progress], None]


def parse_rsync_opts(text: str | None) -> list[str]:
    """The operator's --rsync-opts as argv elements (MigrateUsage if one could change the transport or
    add a path)."""
    try:
        words = shlex.split(text or "")
    except ValueError as e:
        raise MigrateUsage(f"--rsync-opts {text!r}: {e}") from e
    for word in words:
        _check_rsync_opt(word)
    return words


def _check_rsync_opt(word: str) -> None:
    if not word.startswith("-") or word in ("-", "--"):
        raise MigrateUsage(f"--rsync-opts: {word!r} is not an option; write options that take a value as --opt=value")
    if word.startswith("--"):
        name = word.split("=", 1)[0]
        if any(name == bad or (len(name) > 3 and bad.startswith(name)) for bad in FORBIDDEN_LONG):
            raise MigrateUsage(f"--rsync-opts: {name} is not allowed: vzpy runs rsync over its own verified SSH")
        return
    letters = re.match(r"-([A-Za-z]*)", word)
    if letters and "e" in letters.group(1):
        raise MigrateUsage(f"--rsync-opts: {word!r} sets rsync's -e (remote shell): vzpy uses its own SSH")


def rsync_argv(
    source: Path,
    dest_path: str,
    ssh: OpenSsh,
    rsync_opts: str | None = None,
    *,
    options: Sequence[str] = BASE_OPTIONS,
) -> list[str]:
    """rsync argv copying the contents of `source` into `dest_path` on ssh.target (both trees as
    directories: trailing slashes added)."""
    if not dest_path.startswith("/") or "\n" in dest_path:
        raise CopyFailed(f"refusing to sync into {dest_path!r}: not an absolute path")
    src = f"{os.path.abspath(source)}/"
    dest = ssh.target.rsync_spec(dest_path.rstrip("/") + "/")
    return [RSYNC, *options, "-e", ssh.rsh(), *parse_rsync_opts(rsync_opts), "--", src, dest]


def parse_progress(line: str) -> Progress | None:
    match = PROGRESS_RE.match(line)
    if not match:
        return None
    amount, percent, rate, eta = match.groups()
    return Progress(int(amount.replace(",", "")), int(percent), rate, eta)


def run_rsync(
    argv: Sequence[str],
    *,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
    allow_vanished: bool = False,
    what: str = "rsync",
) -> RsyncResult:
    """Run rsync, feeding --info=progress2 updates to on_progress; CopyFailed (exit 6) with stderr's
    tail if it fails, times out or is interrupted (rsync is killed then)."""
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True
        )
    except OSError as e:
        raise CopyFailed(f"{what}: cannot run {argv[0]}: {e.strerror} (install rsync)") from e
    stderr = _StderrTail(process)
    try:
        last = _read_progress(process, on_progress, None if timeout is None else started + timeout, what)
        code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.join()
        process.stdout.close()  # type: ignore[union-attr]
    if code != 0 and not (allow_vanished and code == EXIT_VANISHED):
        meaning = EXIT_MEANINGS.get(code, "failed") if code > 0 else f"killed by signal {-code}"
        raise CopyFailed(f"{what} failed with exit code {code} ({meaning})", detail=stderr.text())
    return RsyncResult(last.bytes if last else 0, time.monotonic() - started, code)


def _read_progress(
    process: subprocess.Popen[bytes], on_progress: ProgressCallback | None, deadline: float | None, what: str
) -> Progress | None:
    """Read rsync's stdout to its end ("\\r"-separated progress updates), enforcing the deadline."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    pending, last = b"", None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise CopyFailed(f"{what} timed out")
        chunk = _read_some(fd, deadline)
        if chunk == b"":
            return last
        pending += chunk or b""
        *lines, pending = re.split(rb"[\r\n]", pending)
        for line in lines:
            progress = parse_progress(line.decode(errors="replace"))
            if progress is not None:
                last = progress
                if on_progress is not None:
                    on_progress(progress)


def _read_some(fd: int, deadline: float | None) -> bytes | None:
    """Up to 64 KiB; b"" at EOF, None if nothing came within a short wait."""
    wait = 0.5 if deadline is None else max(min(0.5, deadline - time.monotonic()), 0)
    ready, _, _ = select.select([fd], [], [], wait)
    if not ready:
        return None
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


class _StderrTail:
    """Drains a process's stderr in a thread (so it never blocks on a full pipe), keeping the tail."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._pipe = process.stderr
        self._data = bytearray()
        self._thread = threading.Thread(target=self._drain, name="rsync-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self._pipe is not None
        for chunk in iter(lambda: self._pipe.read1(65536), b""):  # type: ignore[union-attr]
            self._data += chunk
            del self._data[:-STDERR_TAIL]

    def join(self) -> None:
        self._thread.join(5)
        if self._pipe is not None:
            self._pipe.close()

    def text(self) -> str:
        lines = self._data.decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-8:])


def sync_tree(
    source: Path,
    dest_path: str,
    ssh: OpenSsh,
    *,
    rsync_opts: str | None = None,
    on_progress: ProgressCallback | None = None,
    allow_vanished: bool = False,
    timeout: float | None = None,
    delete: bool = True,
) -> RsyncResult:
    """Copy the tree under `source` to `dest_path` on the destination; with `delete` (a mirror), also delete
    what the source lacks (without: add to what is there, e.g. images next to the page server's)."""
    options = BASE_OPTIONS if delete else tuple(o for o in BASE_OPTIONS if o != "--delete")
    argv = rsync_argv(source, dest_path, ssh, rsync_opts, options=options)
    what = f"rsync of {source} to {ssh.target.host}:{dest_path}"
    return run_rsync(argv, on_progress=on_progress, timeout=timeout, allow_vanished=allow_vanished, what=what)
