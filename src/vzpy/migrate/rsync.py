"""rsync of a local directory to the destination over OpenSSH, with progress.

The argv is built, never a shell string: rsync's -e value is one argv element made of validated words
(ssh.OpenSsh.rsh), the operator's --rsync-opts are shlex-split into separate elements that must all be
options (`--opt=value` for options taking a value) and may not replace the transport (-e/--rsh), and the
paths come after `--`. rsync is run with proc.spawn rather than proc.run because its progress is read
while it runs.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzpy import proc
from vzpy.migrate import CopyFailed, MigrateUsage
from vzpy.migrate.ssh import OpenSsh

RSYNC = "rsync"
# --modify-window=-1: compare mtimes to the nanosecond. rsync's default quick check compares whole seconds,
# so a file rewritten at the same size within the second of the previous pass would be skipped (seen here:
# the frozen final pass missed a counter file, and the restore's fingerprint check refused it).
BASE_OPTIONS = ("-aHAXS", "--numeric-ids", "--delete", "--modify-window=-1", "--info=progress2", "--stats")
# With a basis (--copy-dest: the CT's old area the destination kept), a file is taken from it only when its whole
# content's checksum equals the source file's, never on rsync's size+mtime quick check: the old area's files are
# the CT's (or another CT's of the same CTID), so their sizes and mtimes may have been chosen to match.
BASIS_OPTIONS = ("--checksum",)
EXIT_VANISHED = 24  # "some files vanished before they could be transferred": normal while the CT runs
FORBIDDEN_LONG = ("--rsh", "--server", "--sender", "--daemon", "--config", "--files-from", "--old-args")
# Options that follow symlinks, which the CT controls: on the source they would copy the host files a CT's
# link names into the CT; on the destination write through a link out of the CT's area.
LINK_FOLLOWING_LONG = ("--copy-links", "--copy-unsafe-links", "--copy-dirlinks", "--keep-dirlinks")
LINK_FOLLOWING_SHORT = "LkK"
# Basis dirs match files by size and mtime, which a CT's files can fake: vzpy picks its own basis, checked
BASIS_LONG = ("--copy-dest", "--link-dest", "--compare-dest")
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
SENT_RE = re.compile(r"^Total bytes sent: ([\d,]+)")  # --stats


@dataclass(frozen=True)
class Transfer:
    """How far one rsync run has got (its --info=progress2 line)."""

    bytes: int
    percent: int
    rate: str
    eta: str


@dataclass(frozen=True)
class RsyncResult:
    bytes: int
    seconds: float
    exit_code: int
    sent: int = 0  # what went over the link (--stats' "Total bytes sent"), protocol included


TransferCallback = Callable[[Transfer], None]


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
        if any(name == bad or (len(name) > 3 and bad.startswith(name)) for bad in LINK_FOLLOWING_LONG):
            raise _link_following(name)
        if any(name == bad or (len(name) > 6 and bad.startswith(name)) for bad in BASIS_LONG):
            raise MigrateUsage(
                f"--rsync-opts: {name} is not allowed: a basis dir's files are taken by size and mtime, which a "
                "CT can fake; vzpy uses the destination's PRIVATE.migrated itself, compared by checksum"
            )
        return
    letters = re.match(r"-([A-Za-z]*)", word)
    if letters and "e" in letters.group(1):
        raise MigrateUsage(f"--rsync-opts: {word!r} sets rsync's -e (remote shell): vzpy uses its own SSH")
    if letters and set(letters.group(1)) & set(LINK_FOLLOWING_SHORT):
        raise _link_following(word)


def _link_following(option: str) -> MigrateUsage:
    return MigrateUsage(
        f"--rsync-opts: {option!r} makes rsync follow symlinks, which the CT controls (they may name host files); "
        "vzpy copies links as links: leave it out"
    )


def rsync_argv(
    source: Path,
    dest_path: str,
    ssh: OpenSsh,
    rsync_opts: str | None = None,
    *,
    options: Sequence[str] = BASE_OPTIONS,
    basis: str | None = None,
) -> list[str]:
    """rsync argv copying the contents of `source` into `dest_path` on ssh.target (both trees as
    directories: trailing slashes added). `basis`: a directory there (named by the destination's agent) whose
    files equal to the source's, by content, are copied there instead of sent."""
    _check_remote_path(dest_path, "sync into")
    src = f"{os.path.abspath(source)}/"
    dest = ssh.target.rsync_spec(dest_path.rstrip("/") + "/")
    return [RSYNC, *options, *basis_options(basis), "-e", ssh.rsh(), *parse_rsync_opts(rsync_opts), "--", src, dest]


def basis_options(basis: str | None) -> list[str]:
    if basis is None:
        return []
    _check_remote_path(basis, "use as a basis")
    return [*BASIS_OPTIONS, f"--copy-dest={basis}"]


def _check_remote_path(path: str, use: str) -> None:
    if not path.startswith("/") or "\n" in path:
        raise CopyFailed(f"refusing to {use} {path!r}: not an absolute path")


def parse_progress(line: str) -> Transfer | None:
    match = PROGRESS_RE.match(line)
    if not match:
        return None
    amount, percent, rate, eta = match.groups()
    return Transfer(int(amount.replace(",", "")), int(percent), rate, eta)


def parse_sent(line: str) -> int | None:
    match = SENT_RE.match(line)
    return int(match.group(1).replace(",", "")) if match else None


def run_rsync(
    argv: Sequence[str],
    *,
    on_progress: TransferCallback | None = None,
    timeout: float | None = None,
    allow_vanished: bool = False,
    what: str = "rsync",
) -> RsyncResult:
    """Run rsync, feeding --info=progress2 updates to on_progress; CopyFailed (exit 6) with stderr's
    tail if it fails, times out or is interrupted (rsync is killed then)."""
    started = time.monotonic()
    last: Transfer | None = None
    sent = 0
    with proc.spawn(argv, timeout=timeout, what=what, error=CopyFailed, stdout="pipe") as child:
        for line in child.lines(b"\r\n"):  # progress2 updates end in "\r"
            text = line.decode(errors="replace")
            sent = parse_sent(text) or sent
            progress = parse_progress(text)
            if progress is not None:
                last = progress
                if on_progress is not None:
                    on_progress(progress)
        code = child.finish(check=False)
        if code != 0 and not (allow_vanished and code == EXIT_VANISHED):
            meaning = EXIT_MEANINGS.get(code, "failed") if code > 0 else f"killed by signal {-code}"
            raise child.failed(f"{what} failed with exit code {code} ({meaning})")
    return RsyncResult(last.bytes if last else 0, time.monotonic() - started, code, sent)


def sync_tree(
    source: Path,
    dest_path: str,
    ssh: OpenSsh,
    *,
    rsync_opts: str | None = None,
    on_progress: TransferCallback | None = None,
    allow_vanished: bool = False,
    timeout: float | None = None,
    delete: bool = True,
    basis: str | None = None,
) -> RsyncResult:
    """Copy the tree under `source` to `dest_path` on the destination; with `delete` (a mirror), also delete
    what the source lacks (without: add to what is there, e.g. images next to the page server's). `basis`:
    see rsync_argv."""
    options = BASE_OPTIONS if delete else tuple(o for o in BASE_OPTIONS if o != "--delete")
    argv = rsync_argv(source, dest_path, ssh, rsync_opts, options=options, basis=basis)
    what = f"rsync of {source} to {ssh.target.host}:{dest_path}"
    return run_rsync(argv, on_progress=on_progress, timeout=timeout, allow_vanished=allow_vanished, what=what)
