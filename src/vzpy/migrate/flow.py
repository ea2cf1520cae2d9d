"""`vzpy migrate`: the source side, as ordered steps each with `run` and `rollback`.

Until the destination runs the CT, any failure rolls back the steps done, last first: the CT keeps
running here and the destination is cleaned (unless --keep-dst). The step that resumes the CT on the
destination is the point of no return: once it succeeds the source copy is never resumed, and
Migration.resume_source refuses to (P.Haul's rule, enforced here rather than remembered).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzpy import checkpoint, lifecycle
from vzpy.container import Container
from vzpy.errors import VzError
from vzpy.migrate import CheckpointFailed, CtStopped, MigrateError
from vzpy.migrate.agent import RemoteAgent, agent_argv, connect_agent
from vzpy.migrate.preflight import SourceFacts, check, disk_usage, raise_blocking, read_cpu_flags
from vzpy.migrate.rsync import Progress as RsyncProgress
from vzpy.migrate.rsync import sync_tree
from vzpy.migrate.ssh import OpenSsh, SshSession, Target
from vzpy.migrate.tunnel import OpenSshTunnel
from vzpy.stage import Stage

Progress = Callable[[str], None]
PAGE_SERVER_WAIT = 600.0
INLINE_IMAGES_MAX = 2 << 20  # base64 of this stays well under the protocol's 4 MiB line


class SourceResumeRefused(MigrateError):
    """A programming error: something tried to resume the source after the point of no return."""

    exit_code = 7


@dataclass
class MigrateOptions:
    target: Target
    online: bool = False
    remove_area: bool = True  # vzmigrate's default: the source's private area goes after success
    keep_dst: bool = False  # keep the destination's synced private area after a failure, for a retry
    check_only: bool = False
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    rsync_opts: str | None = None
    remote_vzpy: str = "vzpy"
    nodeps: frozenset[str] = frozenset()
    verbose: bool = False  # rsync's progress while files are copied


@dataclass
class Step:
    name: str
    run: Callable[[], None]
    rollback: Callable[[], None] | None = None
    point_of_no_return: bool = False


@dataclass
class Summary:
    ctid: str
    destination: str
    path: str  # stop-and-copy (page-server streaming) | offline
    phases: list[tuple[str, float]] = field(default_factory=list)
    frozen_seconds: float | None = None
    bytes_moved: int = 0
    problems_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ctid": self.ctid,
            "destination": self.destination,
            "path": self.path,
            "phases": [{"name": n, "seconds": round(s, 3)} for n, s in self.phases],
            "frozen_seconds": None if self.frozen_seconds is None else round(self.frozen_seconds, 3),
            "bytes_moved": self.bytes_moved,
            "preflight_skipped": self.problems_skipped,
        }


class Migration:
    def __init__(self, ct: Container, options: MigrateOptions, progress: Progress) -> None:
        self.ct = ct
        self.opts = options
        self.progress = progress
        self.session: SshSession | None = None
        self.agent: RemoteAgent | None = None
        self.dest: dict[str, Any] = {}
        self.work: Path | None = None
        self.control_path: Path | None = None
        self.tunnel: OpenSshTunnel | None = None
        self.past_no_return = False
        self.was_running = ct.stage() is Stage.RUNNING
        self.summary = Summary(ct.ctid, str(options.target), "offline")
        self._frozen_at = 0.0
        self._last_progress = 0.0

    # --- the plan

    def steps(self) -> list[Step]:
        """The plan, in order. Online: everything that can be done before the freeze is done before it."""
        checks = [Step("connect", self._connect), Step("preflight", self._preflight)]
        if self.opts.check_only:
            return checks
        prepare = Step("prepare destination", self._prepare, self._cleanup_destination)
        cleanup = Step("clean up source", self._finish_source)
        if self.opts.online:
            return [
                *checks,
                prepare,
                Step("page server and tunnel", self._open_tunnel, self._close_tunnel),
                Step("sync files", self._sync_files),
                Step("suspend", self._suspend, self.resume_source),
                Step("final sync (frozen)", self._sync_files),
                Step("dump (pages streamed to the destination)", self._dump),
                Step("copy images", self._copy_images),
                Step("restore on destination", self._restore_remote),
                Step("resume on destination", self._resume_remote, point_of_no_return=True),
                cleanup,
            ]
        start = "start on destination" if self.was_running else "register on destination"
        return [
            *checks,
            prepare,
            Step("sync files", self._sync_files),
            *([Step("stop", self._stop_source, self._start_source)] if self.was_running else []),
            Step("final sync", self._sync_files),
            Step(start, self._start_remote, point_of_no_return=True),
            cleanup,
        ]

    def run(self) -> Summary:
        if self.opts.online and not self.was_running:
            raise CtStopped(
                f"CT {self.ct.ctid} is not running: an online migration needs a running CT "
                "(drop --online to move it stopped)"
            )
        if self.opts.online:
            self.summary.path = "stop-and-copy (page-server streaming)"
        done: list[Step] = []
        try:
            for step in self.steps():
                self._run_step(step)
                done.append(step)
                self.past_no_return = self.past_no_return or step.point_of_no_return
        except BaseException:
            if not self.past_no_return:
                self._roll_back(done)
            raise
        finally:
            self._close()
        return self.summary

    def _run_step(self, step: Step) -> None:
        self.progress(f"{step.name} ...")
        started = time.monotonic()
        step.run()
        seconds = time.monotonic() - started
        self.summary.phases.append((step.name, seconds))
        self.progress(f"{step.name}: done in {seconds:.2f}s")

    def _roll_back(self, done: list[Step]) -> None:
        for step in reversed(done):
            if step.rollback is None:
                continue
            self.progress(f"rolling back: {step.name}")
            try:
                step.rollback()
            except (VzError, OSError) as e:
                self.progress(f"rolling back {step.name} failed: {e}")

    # --- connect and check

    def _connect(self) -> None:
        self.session = SshSession.connect(self.opts.target, key=self.opts.ssh_key, known_hosts=self.opts.known_hosts)
        self.agent = connect_agent(self.session, agent_argv(self.opts.remote_vzpy))

    def _preflight(self) -> None:
        ct, agent = self.ct, self._agent()
        facts = SourceFacts(
            ctid=ct.ctid,
            private_bytes=disk_usage(ct.private),
            memory_bytes=checkpoint.memory_usage(ct) if self.was_running else 0,
            cpu_flags=read_cpu_flags(),
            ips=tuple(ct.ips),
            online=self.opts.online,
        )
        problems = check(
            agent.hello, agent.ct_exists(ct.ctid, ct.ips), facts, skip=self.opts.nodeps, host=self.opts.target.host
        )
        self.summary.problems_skipped = [p.message for p in problems if p.skipped]
        raise_blocking(problems)

    # --- files

    def _prepare(self) -> None:
        token = uuid.uuid4().hex
        self.dest = dict(
            self._agent().prepare(self.ct.ctid, self.ct.conf.text(), token=token, keep_dst=self.opts.keep_dst)
        )

    def _cleanup_destination(self) -> None:
        self._agent().cleanup(self.ct.ctid, keep_dst=self.opts.keep_dst)

    def _openssh(self) -> OpenSsh:
        """OpenSSH options for rsync and the tunnel. Online, they share one connection (the tunnel's ssh
        is the ControlMaster): nothing opens a new SSH connection while the CT is frozen."""
        if self.control_path is None:
            return self._session().openssh()
        sharing = (("ControlMaster", "auto"), ("ControlPath", str(self.control_path)), ("ControlPersist", "no"))
        return self._session().openssh(extra_options=sharing)

    def _sync_files(self) -> None:
        result = sync_tree(
            self.ct.private,
            self.dest["private"],
            self._openssh(),
            rsync_opts=self.opts.rsync_opts,
            allow_vanished=not self._frozen_at,
            on_progress=self._rsync_progress if self.opts.verbose else None,
        )
        self.summary.bytes_moved += result.bytes

    def _rsync_progress(self, update: RsyncProgress) -> None:
        now = time.monotonic()
        if update.percent == 100 or now - self._last_progress >= 1.0:
            self._last_progress = now
            self.progress(f"  {update.bytes >> 20} MiB copied ({update.percent}%, {update.rate}, eta {update.eta})")

    # --- online: freeze, dump, restore there

    def _suspend(self) -> None:
        checkpoint.suspend(self.ct, self.progress)
        self._frozen_at = time.monotonic()

    def resume_source(self) -> None:
        if self.past_no_return:
            raise SourceResumeRefused(
                f"CT {self.ct.ctid} runs on {self.opts.target.host}: the source copy is never resumed"
            )
        if self.ct.stage() is not Stage.STOPPED:
            checkpoint.wake(self.ct)

    def _open_tunnel(self) -> None:
        """Before the freeze: a page server on the destination, and an SSH tunnel to it from here."""
        self.work = Path(tempfile.mkdtemp(prefix=f".vzpy-migrate-{self.ct.ctid}-", dir=self._dumpdir()))
        self.control_path = self.work / "ssh.sock"
        port = self._agent().page_server_start(self.ct.ctid)
        self.tunnel = OpenSshTunnel(self._openssh(), port).start()

    def _close_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        self.control_path = None
        with contextlib.suppress(VzError):
            self._agent().page_server_stop(self.ct.ctid)
        self._remove_work()

    def _dump(self) -> None:
        agent, ctid = self._agent(), self.ct.ctid
        assert self.tunnel is not None, "open the tunnel first"
        images = self._work() / "images"
        images.mkdir(mode=0o700, exist_ok=True)
        try:
            checkpoint.dump_images(self.ct, images, page_server=("127.0.0.1", self.tunnel.local_port))
        except VzError as e:
            agent.page_server_stop(ctid)
            raise CheckpointFailed(f"dump of CT {ctid} for the migration failed: {e.message}", detail=e.detail) from e
        self.summary.bytes_moved += agent.page_server_wait(ctid, timeout=PAGE_SERVER_WAIT)

    def _copy_images(self) -> None:
        """The images CRIU wrote here (all but the pages, which went to the page server): small ones inline
        over the agent's channel, a big set (e.g. large tmpfs contents) with rsync."""
        images = self._work() / "images"
        files = sorted(p for p in images.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        if size <= INLINE_IMAGES_MAX:
            encoded = {p.name: base64.b64encode(p.read_bytes()).decode() for p in files}
            self._agent().client.call("put_images", ctid=self.ct.ctid, files=encoded)
            self.summary.bytes_moved += size
            return
        # not a mirror: the page server's pagemap/pages images are already there
        result = sync_tree(
            images, self.dest["images_dir"], self._openssh(), rsync_opts=self.opts.rsync_opts, delete=False
        )
        self.summary.bytes_moved += result.bytes

    def _restore_remote(self) -> None:
        fingerprint = checkpoint.fs_fingerprint(self.ct)
        self._agent().client.call("restore", ctid=self.ct.ctid, fs_fingerprint=fingerprint, timeout=600.0)

    def _resume_remote(self) -> None:
        reply = self._agent().client.call("resume", ctid=self.ct.ctid, timeout=120.0)
        self.summary.frozen_seconds = time.monotonic() - self._frozen_at
        self.progress(
            f"CT {self.ct.ctid} runs on {self.opts.target.host}; it was frozen for "
            f"{self.summary.frozen_seconds:.2f}s (announced on {', '.join(reply.get('announced', [])) or '-'})"
        )

    # --- offline

    def _stop_source(self) -> None:
        lifecycle.stop(self.ct, progress=self.progress)

    def _start_source(self) -> None:
        if self.past_no_return:
            raise SourceResumeRefused(f"CT {self.ct.ctid} runs on {self.opts.target.host}: not starting it here")
        lifecycle.start(self.ct, self.progress)

    def _start_remote(self) -> None:
        self._agent().client.call("start", ctid=self.ct.ctid, start=self.was_running, timeout=120.0)

    # --- after success

    def _finish_source(self) -> None:
        """The CT lives on the destination now: stop the copy here, remove what is left of it."""
        ct = self.ct
        lifecycle.kill(ct)
        self._close_tunnel()
        conf, private = ct.conf_path, ct.private
        if self.opts.remove_area:
            shutil.rmtree(private, ignore_errors=True)
        elif private.exists():
            private.rename(private.with_name(private.name + ".migrated"))
        conf.rename(conf.with_name(conf.name + ".migrated"))
        with contextlib.suppress(OSError):
            ct.root.rmdir()

    def _remove_work(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    # --- plumbing

    def _dumpdir(self) -> Path:
        path = self.ct.gconf.dumpdir
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def _agent(self) -> RemoteAgent:
        assert self.agent is not None, "connect first"
        return self.agent

    def _session(self) -> SshSession:
        assert self.session is not None, "connect first"
        return self.session

    def _work(self) -> Path:
        assert self.work is not None, "dump first"
        return self.work

    def _close(self) -> None:
        if self.tunnel is not None:  # a failure after the point of no return: the tunnel is not needed either
            self.tunnel.close()
        if self.agent is not None:
            self.agent.close()
        if self.session is not None:
            self.session.close()


def recover(ct: Container, options: MigrateOptions, progress: Progress) -> str:
    """After a migration was interrupted: ask the destination whether the CT was committed there.
    Committed: the source copy is stopped and removed. Not committed: the destination is cleaned and the
    source copy resumed. Returns what was done."""
    session = SshSession.connect(options.target, key=options.ssh_key, known_hosts=options.known_hosts)
    try:
        with connect_agent(session, agent_argv(options.remote_vzpy)) as agent:
            if agent.ct_exists(ct.ctid)["exists"]:
                migration = Migration(ct, options, progress)
                migration.past_no_return = True
                migration._finish_source()
                return f"CT {ct.ctid} runs on {options.target.host}: the source copy was stopped and removed"
            agent.cleanup(ct.ctid, keep_dst=options.keep_dst)
    finally:
        session.close()
    if ct.stage() is not Stage.STOPPED:
        checkpoint.wake(ct)
    return f"CT {ct.ctid} was not committed on {options.target.host}: it was cleaned there and runs here"
