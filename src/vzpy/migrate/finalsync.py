"""The frozen final sync: rsync runs started before the freeze, so that their SSH channel and the rsync
there are up by the time the CT is frozen, then given only the names that changed (vzpy.migrate.changes).

rsync reads its --files-from list from a pipe: it connects, starts its server there, then waits for the
names; the frozen part is only the transfer. Two runs, one after the other: the changes (directories one
level deep, with --delete there), then the changed files whose mtime rsync's quick check cannot trust
(--ignore-times).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Sequence
from pathlib import Path

from vzpy import proc
from vzpy.migrate import CopyFailed
from vzpy.migrate.changes import TreeChanges
from vzpy.migrate.rsync import BASE_OPTIONS, EXIT_MEANINGS, RsyncResult, parse_progress, parse_sent, rsync_argv
from vzpy.migrate.ssh import OpenSsh

CHANGES_OPTIONS = ("-d",)  # with "DIR/" in the list: DIR's entries, and --delete of what is gone there
FORCED_OPTIONS = ("--ignore-times",)


class PendingRsync:
    """An rsync of `source` to `dest_path` there, connected and waiting for its list of names."""

    def __init__(
        self, source: Path, dest_path: str, ssh: OpenSsh, extra: Sequence[str], rsync_opts: str | None = None
    ) -> None:
        self.what = f"rsync of the changes in {source} to {ssh.target.host}:{dest_path}"
        names_in, self.names_out = os.pipe()
        try:
            options = (*BASE_OPTIONS, *extra, "--from0", f"--files-from=/dev/fd/{names_in}")
            argv = rsync_argv(source, dest_path, ssh, rsync_opts, options=options)
            self.child: proc.Child | None = proc.spawn(
                argv, timeout=None, what=self.what, error=CopyFailed, stdout="pipe", pass_fds=(names_in,)
            )
        except BaseException:
            os.close(self.names_out)
            raise
        finally:
            os.close(names_in)
        os.set_blocking(self.names_out, False)

    def send(self, names: bytes, timeout: float) -> RsyncResult:
        """Give rsync its names and wait for it to finish within `timeout`. CopyFailed if it fails or runs out
        of time (it is killed then)."""
        child = self.child
        assert child is not None, "already closed"
        started = time.monotonic()
        child.deadline, child.timeout = started + timeout, timeout
        self._write(names, child)
        copied = sent = 0
        for line in child.lines(b"\r\n"):
            text = line.decode(errors="replace")
            progress = parse_progress(text)
            copied = progress.bytes if progress is not None else copied
            sent = parse_sent(text) or sent
        code = child.finish(check=False)
        if code != 0:
            meaning = EXIT_MEANINGS.get(code, "failed") if code > 0 else f"killed by signal {-code}"
            raise child.failed(f"{self.what} failed with exit code {code} ({meaning})")
        return RsyncResult(copied, time.monotonic() - started, code, sent)

    def _write(self, names: bytes, child: proc.Child) -> None:
        view = memoryview(names)
        try:
            while view:
                left = child.remaining()
                if left is not None and left <= 0:
                    child.kill()
                    raise child.timed_out()
                _, writable, _ = select.select([], [self.names_out], [], min(left or 0.5, 0.5))
                if writable:
                    view = view[os.write(self.names_out, view) :]
        except BrokenPipeError:
            pass  # rsync is gone: its exit code and stderr say why
        finally:
            self._close_names()

    def _close_names(self) -> None:
        if self.names_out >= 0:
            os.close(self.names_out)
            self.names_out = -1

    def close(self) -> None:
        """Stop it if it still waits or runs. Idempotent."""
        self._close_names()
        if self.child is not None:
            child, self.child = self.child, None
            child.close()


class FinalSync:
    """Both rsync runs of the final sync, started ahead (`start`), fed once the CT is frozen (`run`)."""

    def __init__(self) -> None:
        self.runs: list[PendingRsync] = []

    def start(self, source: Path, dest_path: str, ssh: OpenSsh, rsync_opts: str | None = None) -> None:
        self.close()
        try:
            for extra in (CHANGES_OPTIONS, FORCED_OPTIONS):
                self.runs.append(PendingRsync(source, dest_path, ssh, extra, rsync_opts))
        except BaseException:
            self.close()
            raise

    @property
    def started(self) -> bool:
        return bool(self.runs)

    def run(self, changes: TreeChanges, timeout: float) -> list[RsyncResult]:
        """Send `changes`: the results of the runs that had something to send. The runs are used up either way."""
        deadline = time.monotonic() + timeout
        try:
            results = []
            for pending, names in zip(self.runs, (changes.files_from(), changes.forced_from()), strict=True):
                if names:  # a run with nothing to send is stopped instead: no round trips
                    results.append(pending.send(names, max(deadline - time.monotonic(), 0.001)))
            return results
        finally:
            self.close()

    def close(self) -> None:
        runs, self.runs = self.runs, []
        for pending in runs:
            pending.close()
