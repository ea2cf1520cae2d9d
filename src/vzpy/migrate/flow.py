"""`vzpy migrate`: the source side, as ordered steps each with `run` and `rollback`.

Until the destination is asked to commit the CT (resume or start there), any failure rolls back the
steps done, last first: the CT keeps running here and the destination is cleaned (unless --keep-dst).

The commit is two-phase. Before the request that commits the CT there is sent, the migration enters
the point of no return: LOCKDIR/CTID.migration.json (vzpy.migrate.marker) is written, and from then on
the source copy is never resumed unless the destination answers that it did not commit. An ambiguous
outcome (connection lost, no reply in time) ends with OutcomeInDoubt: the source copy stays suspended
(or stopped) and `vzpy migrate --recover HOST CTID` finishes or undoes the migration, whichever the
destination's state says. After a commit, a failure to clean up the source is a warning.

While the CT is frozen every step gets what is left of --max-frozen as its deadline; when it runs out
the migration is rolled back and the CT resumed here (FrozenTooLong).

Online, the preflight picks the path (vzpy.migrate.paths) and the steps follow it:
    stop-and-copy  freeze, dump with every page streamed to the destination's page server, restore there.
    pre-copy       before the freeze, pre-dumps while the CT runs, each sending only the pages changed since
                   the one before (vzpy.migrate.precopy's stop rule says when to stop); the frozen dump then
                   sends what changed last. Rolled back like the rest: the destination's images go, the CT
                   runs on here.
    post-copy      freeze, dump without the pages (CRIU keeps serving them here), restore there with lazy
                   pages, resume there; the pages follow on demand and in the background. The point of no
                   return is the lazy restore's request: from then on the copy here is never resumed unless
                   the destination says it has no CT, and once the CT runs there a failure of the page
                   transfer loses it.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzpy import checkpoint, lifecycle, linkremap
from vzpy.background import InThread
from vzpy.container import Container
from vzpy.criu import detect_capabilities, require_criu
from vzpy.criu import images as criu_images
from vzpy.criu import lazy as lazy_pages
from vzpy.criu.features import DEFAULT_CACHE_DIR
from vzpy.errors import VzError
from vzpy.lifecycle import refuse_mounts_in_areas
from vzpy.migrate import (
    OLD_AREA_SUFFIX,
    CheckpointFailed,
    ConnectionBroken,
    ConnectionTimeout,
    CtStopped,
    MigrateError,
    MigrateUsage,
    MigrationLocked,
    ProtocolError,
    changes,
    fault,
    marker,
    paths,
    precopy,
)
from vzpy.migrate.finalsync import FinalSync
from vzpy.migrate.preflight import (
    SourceFacts,
    check,
    disk_usage,
    dump_blockers,
    fork_rate,
    old_area_in_way,
    raise_blocking,
    read_cpu_flags,
)
from vzpy.migrate.remote import RemoteAgent, agent_argv, connect_agent
from vzpy.migrate.rsync import Transfer, sync_tree
from vzpy.migrate.ssh import OpenSsh, SshSession, Target
from vzpy.migrate.tunnel import LOOPBACK, OpenSshTunnel, ReverseSshTunnel, free_port, listening
from vzpy.runtime import tcpkick
from vzpy.stage import Progress, Stage
from vzpy.units import human_size

DEFAULT_MAX_FROZEN = 30.0
RESUME_MIN_TIMEOUT = 15.0  # the commit's reply is worth waiting for: a timeout there leaves the outcome in doubt
OFFLINE_START_TIMEOUT = 300.0
LIVE_SYNC_TIMEOUT = 24 * 3600.0  # rsync's own --timeout catches a stalled link long before
PAGE_TRANSFER_TIMEOUT = 3600.0  # pre-dump iterations' and post-copy's page transfers, the CT running
ANY_ADDRESS = "0.0.0.0"
LAZY_STOP_WAIT = 30.0  # a lazy dump told to stop (its page server's client hung up) ends within this
QUERY_TIMEOUT = 30.0
RECOVER_LOCK_WAIT = 60.0
INLINE_IMAGES_MAX = 2 << 20  # base64 of this stays well under the protocol's 4 MiB line
SCRATCH_PREFIX = ".vzpy-migrate-"
AMBIGUOUS = (ConnectionBroken, ConnectionTimeout, ProtocolError)
FROZEN_STAGES = (Stage.SUSPENDED, Stage.DUMPED, Stage.UNDUMPED)


class SourceResumeRefused(MigrateError):
    """A programming error: something tried to resume the source after the point of no return."""

    exit_code = 7


class OutcomeInDoubt(MigrateError):
    """The commit request was sent and its outcome is unknown: neither copy is touched any more."""

    exit_code = ConnectionBroken.exit_code


class FrozenTooLong(MigrateError):
    """The CT would stay frozen longer than --max-frozen: the migration is rolled back."""

    exit_code = ConnectionTimeout.exit_code


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
    max_frozen: float = DEFAULT_MAX_FROZEN
    path: str | None = None  # online: the path asked for (vzpy.migrate.paths.PATHS); None: chosen
    postcopy_allowed: bool | None = None  # None: vz.conf VZPY_MIGRATE_POSTCOPY says
    stop_rule: precopy.StopRule = field(default_factory=precopy.StopRule)


@dataclass
class Step:
    id: str  # for fault injection (vzpy.migrate.fault)
    name: str
    run: Callable[[], None]
    rollback: Callable[[], None] | None = None
    frozen: bool = False  # runs while the CT is frozen: bounded by --max-frozen
    undo_if_failed: bool = False  # its rollback also runs when it failed half-way (a restore there)


@dataclass
class Summary:
    ctid: str
    destination: str
    path: str  # pre-copy | post-copy | stop-and-copy | offline
    phases: list[tuple[str, float]] = field(default_factory=list)
    frozen_seconds: float | None = None
    bytes_moved: int = 0
    files_sent: list[int] = field(default_factory=list)  # rsync's "Total bytes sent" of each sync of the files
    path_reasons: list[str] = field(default_factory=list)
    iterations: list[precopy.Iteration] = field(default_factory=list)
    stop_reason: str | None = None  # pre-copy: why the iterations stopped
    pages_while_frozen: int | None = None
    pages_lazy: int | None = None  # post-copy: pages that went after the CT ran on the destination
    problems_skipped: list[str] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ctid": self.ctid,
            "destination": self.destination,
            "path": self.path,
            "phases": [{"name": n, "seconds": round(s, 3)} for n, s in self.phases],
            "path_reasons": self.path_reasons,
            "iterations": [iteration.as_dict() for iteration in self.iterations],
            "stop_reason": self.stop_reason,
            "pages_while_frozen": self.pages_while_frozen,
            "pages_total": self.pages_total,
            "frozen_seconds": None if self.frozen_seconds is None else round(self.frozen_seconds, 3),
            "bytes_moved": self.bytes_moved,
            "files_sent": self.files_sent,
            "preflight_skipped": self.problems_skipped,
            "announced": self.announced,
            "warnings": self.warnings,
        }

    @property
    def pages_total(self) -> int | None:
        if self.pages_while_frozen is None:
            return None
        return sum(i.pages for i in self.iterations) + self.pages_while_frozen + (self.pages_lazy or 0)


class FrozenBudget:
    """What is left of --max-frozen since the CT was frozen."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.since: float | None = None

    def start(self) -> None:
        self.since = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def stop(self) -> float:
        frozen, self.since = self.elapsed(), None
        return frozen

    @property
    def expired(self) -> bool:
        return self.since is not None and self.elapsed() >= self.limit

    def left(self, what: str, ctid: str) -> float | None:
        """Seconds left for `what` (None when the CT is not frozen); FrozenTooLong when none are."""
        if self.since is None:
            return None
        left = self.limit - self.elapsed()
        if left <= 0:
            raise FrozenTooLong(self.message(what, ctid, "was not reached"))
        return left

    def message(self, what: str, ctid: str, how: str) -> str:
        return (
            f"migration aborted: CT {ctid} was frozen for {self.elapsed():.1f}s and {what} {how} within "
            f"--max-frozen {self.limit:g}s; it is resumed here (raise --max-frozen for a bigger CT)"
        )


@dataclass
class Link:
    """The connection to the destination: the SSH session and the agent on it."""

    session: SshSession
    agent: RemoteAgent

    def close(self) -> None:
        try:
            self.agent.close()
        finally:
            self.session.close()


def connect(options: MigrateOptions) -> Link:
    session = SshSession.connect(options.target, key=options.ssh_key, known_hosts=options.known_hosts)
    try:
        agent = connect_agent(session, agent_argv(options.remote_vzpy), fault=fault.agent_part(fault.from_env()))
    except BaseException:
        session.close()
        raise
    return Link(session, agent)


class Migration:
    def __init__(self, ct: Container, options: MigrateOptions, progress: Progress) -> None:
        self.ct = ct
        self.opts = options
        self.progress = progress
        self.link: Link | None = None
        self.dest: dict[str, Any] = {}
        self.work: Path | None = None
        self.control_path: Path | None = None
        self.tunnel: OpenSshTunnel | None = None
        self.phase = "before"  # before | in doubt | committed
        self.was_running = ct.stage() is Stage.RUNNING
        self.budget = FrozenBudget(options.max_frozen)
        self.fault = fault.from_env()
        self.summary = Summary(ct.ctid, str(options.target), paths.OFFLINE)
        self.path = paths.OFFLINE
        self.precopy_parent: str | None = None  # the last pre-dump's images subdir
        self.predump_subdir: str | None = None  # the pre-dump under way (its page server there)
        self.lazy: LazyDump | None = None
        self.lazy_ports: tuple[int, int] | None = None  # post-copy: (here, there)
        self.lazy_remaps: list[str] = []  # post-copy: the link-remap files the lazy dump put back in the tree
        self._last_progress = 0.0
        self.tree_snapshot: changes.TreeSnapshot | None = None  # taken as the live sync began
        self.final_sync = FinalSync()
        self.fingerprint: InThread[dict[str, object]] | None = None  # taken while the final sync runs
        self.images_for_restore: dict[str, str] | None = None  # the small images, sent with the restore request

    @property
    def past_no_return(self) -> bool:
        return self.phase != "before"

    # --- the plan

    def checks(self) -> list[Step]:
        return [Step("connect", "connect", self._connect), Step("preflight", "preflight", self._preflight)]

    def steps(self) -> list[Step]:
        """The plan after the checks, in order, for the path the preflight chose. Online: everything that can
        be done before the freeze is done before it."""
        if self.opts.check_only:
            return []
        prepare = Step("prepare", "prepare destination", self._prepare, self._cleanup_destination)
        cleanup = Step("finish", "clean up source", self._finish_source)
        if self.path == paths.POST_COPY:
            return [prepare, *self._postcopy_steps(), cleanup]
        if self.path in (paths.PRE_COPY, paths.STOP_AND_COPY):
            return [prepare, *self._streaming_steps(self.path == paths.PRE_COPY), cleanup]
        return [prepare, *self._offline_steps(), cleanup]

    def _streaming_steps(self, precopy_first: bool) -> list[Step]:
        tunnel = Step("tunnel", "page server and tunnel", self._open_tunnel, self._close_tunnel)
        sync = Step("sync", "sync files", self._live_sync)
        # pre-copy: the files first, so that the memory copied last is the freshest; its iterations use
        # connections of their own, the tunnel's (shared with the frozen final sync) comes after them
        before_freeze = (
            [
                sync,
                Step(
                    "precopy",
                    "pre-copy memory (CT running)",
                    self._precopy,
                    self._stop_precopy,
                    undo_if_failed=True,
                ),
                tunnel,
            ]
            if precopy_first
            else [tunnel, sync]
        )
        dump = (
            "dump (changed pages to the destination)" if precopy_first else "dump (pages streamed to the destination)"
        )
        return [
            *before_freeze,
            Step("suspend", "suspend", self._suspend, self.resume_source),
            Step("dump", dump, self._dump, frozen=True),
            # after the dump: the link-remap files it put in the tree (see vzpy.linkremap) go along
            Step("final-sync", "final sync (frozen)", self._final_sync, frozen=True),
            Step("copy-images", "copy images", self._copy_images, frozen=True),
            Step(
                "restore",
                "restore on destination",
                self._restore_remote,
                self._cleanup_destination,
                frozen=True,
                undo_if_failed=True,
            ),
            Step("resume", "resume on destination", self._resume_remote, frozen=True),
        ]

    def _postcopy_steps(self) -> list[Step]:
        return [
            Step("tunnel", "tunnel for the lazy pages", self._open_reverse_tunnel, self._close_tunnel),
            Step("sync", "sync files", self._live_sync),
            Step("suspend", "suspend", self._suspend, self.resume_source),
            Step(
                "lazy-dump",
                "dump (pages kept here for lazy transfer)",
                self._lazy_dump,
                self._stop_lazy_dump,
                frozen=True,
                undo_if_failed=True,  # a lazy dump that did not get ready must be stopped before the CT wakes
            ),
            Step("final-sync", "final sync (frozen)", self._final_sync, frozen=True),
            Step("copy-images", "copy images", self._copy_images, frozen=True),
            Step(
                "lazy-restore",
                "restore on destination with lazy pages (point of no return)",
                self._lazy_restore_remote,
                self._cleanup_destination,
                frozen=True,
                undo_if_failed=True,
            ),
            Step("resume", "resume on destination", self._resume_remote, frozen=True),
            Step("pages", "serve the pages until all arrived", self._serve_lazy_pages),
        ]

    def _offline_steps(self) -> list[Step]:
        start = "start on destination" if self.was_running else "register on destination"
        return [
            Step("sync", "sync files", self._live_sync),
            *(
                [Step("stop", "stop", self._stop_source, self._start_source, undo_if_failed=True)]
                if self.was_running
                else []
            ),
            Step("final-sync", "final sync", self._final_sync),
            Step("start", start, self._start_remote),
        ]

    def run(self) -> Summary:
        pending = marker.read(self.ct.gconf, self.ct.ctid)
        if pending is not None:
            raise MigrationLocked(
                f"CT {self.ct.ctid} has a migration to {pending.host} whose outcome is unknown: "
                f"run `{pending.recover_command}` first"
            )
        if self.opts.online and not self.was_running:
            raise CtStopped(
                f"CT {self.ct.ctid} is not running: an online migration needs a running CT "
                "(drop --online to move it stopped)"
            )
        if self.opts.path is not None and not self.opts.online:
            raise MigrateUsage(f"--{self.opts.path.replace('-', '')} is a path of live migration: add --online")
        remove_stale_scratch(self.ct)
        done: list[Step] = []
        try:
            for step in self.checks():
                self._run_step(step)
                done.append(step)
            for step in self.steps():
                if step.undo_if_failed:
                    done.append(step)
                self._run_step(step)
                if not step.undo_if_failed:
                    done.append(step)
        except BaseException as e:
            if self.phase == "in doubt":
                raise self._in_doubt(e) from e
            if self.phase == "before":
                self._roll_back(done)
            raise
        finally:
            self._close()
        return self.summary

    def _run_step(self, step: Step) -> None:
        fault.hit(self.fault, "source", "before", step.id)
        self.progress(f"{step.name} ...")
        started = time.monotonic()
        fault.hit(self.fault, "source", "fail", step.id)
        try:
            step.run()
        except VzError as e:
            if step.frozen and self.budget.expired and self.phase == "before":
                raise FrozenTooLong(self.budget.message(step.name, self.ct.ctid, "did not finish")) from e
            raise
        seconds = time.monotonic() - started
        self.summary.phases.append((step.name, seconds))
        self.progress(f"{step.name}: done in {seconds:.2f}s")
        fault.hit(self.fault, "source", "after", step.id)

    def _roll_back(self, done: list[Step]) -> None:
        for step in reversed(done):
            if step.rollback is None:
                continue
            self.progress(f"rolling back: {step.name}")
            try:
                step.rollback()
            except (VzError, OSError) as e:
                self.progress(f"rolling back {step.name} failed: {e}")

    def _frozen_left(self, what: str) -> float | None:
        return self.budget.left(what, self.ct.ctid)

    # --- connect and check

    def _connect(self) -> None:
        self.link = connect(self.opts)

    def _preflight(self) -> None:
        ct, agent = self.ct, self._agent()
        facts = SourceFacts(
            ctid=ct.ctid,
            private_bytes=disk_usage(ct.private),
            memory_bytes=checkpoint.memory_usage(ct) if self.was_running else 0,
            cpu_flags=read_cpu_flags(),
            ips=tuple(ct.ips),
            online=self.opts.online,
            dump_blockers=tuple(dump_blockers(ct)) if self.opts.online else (),
            old_area_in_way="" if self.opts.remove_area else old_area_in_way(ct.private),
        )
        problems = check(
            agent.hello, agent.ct_exists(ct.ctid, ct.ips), facts, skip=self.opts.nodeps, host=self.opts.target.host
        )
        self.summary.problems_skipped = [p.message for p in problems if p.skipped]
        raise_blocking(problems)
        if self.opts.online:
            self._choose_path(agent.hello)

    def _choose_path(self, hello: dict[str, Any]) -> None:
        """The path, and why; PathUnavailable (before anything is copied) for one asked for that cannot be."""
        theirs = (hello.get("criu") or {}).get("migration") or {}
        allowed = self.opts.postcopy_allowed
        if allowed is None:
            allowed = paths.postcopy_policy(self.ct.gconf.values.get(paths.POLICY_KEY))
        try:
            ours, unknown = source_migration_facts(self.ct), []
        except VzError as e:  # the dump will say what is wrong with CRIU here; only stop-and-copy is sure
            ours, unknown = {}, [f"this host's CRIU facts are unknown: {e.message}"]
        ct_blocker = None
        wanted = self.opts.path == paths.POST_COPY or (self.opts.path is None and allowed)
        if wanted and paths.postcopy_blocker(ours, theirs) is None:
            ct_blocker = paths.fork_rate_blocker(self.ct.ctid, fork_rate(self.ct))
        choice = paths.choose(ours, theirs, self.opts.path, postcopy_allowed=allowed, ct_postcopy_blocker=ct_blocker)
        self.path = self.summary.path = choice.path
        self.summary.path_reasons = [*unknown, *choice.reasons]
        for reason in self.summary.path_reasons:
            self.progress(f"  {reason}")

    # --- files

    def _prepare(self) -> None:
        token = uuid.uuid4().hex
        self.dest = dict(
            self._agent().prepare(self.ct.ctid, self.ct.conf.text(), token=token, keep_dst=self.opts.keep_dst)
        )

    def _cleanup_destination(self) -> None:
        """Undo everything on the destination; over a fresh connection if this one broke (the agent of the
        broken one rolls back on its own, this waits for it)."""
        agent = self._agent()
        if agent.usable:
            agent.cleanup(self.ct.ctid, keep_dst=self.opts.keep_dst)
            return
        link = connect(self.opts)
        try:
            link.agent.cleanup(self.ct.ctid, keep_dst=self.opts.keep_dst, wait=RECOVER_LOCK_WAIT)
        finally:
            link.close()

    def _openssh(self) -> OpenSsh:
        """OpenSSH options for rsync and the tunnel. Online, they share one connection (the tunnel's ssh
        is the ControlMaster): nothing opens a new SSH connection while the CT is frozen."""
        if self.control_path is None:
            return self._link().session.openssh()
        sharing = (("ControlMaster", "auto"), ("ControlPath", str(self.control_path)), ("ControlPersist", "no"))
        return self._link().session.openssh(extra_options=sharing)

    def _live_sync(self) -> None:
        """The whole tree while the CT runs; what changes from now on is found again for the final sync."""
        self.tree_snapshot = changes.snapshot(self.ct.private)
        self._sync_files()
        if self.control_path is not None:  # the tunnel's SSH connection is up: start up the final sync's runs now
            self._start_final_sync()

    def _final_sync(self) -> None:
        """Only what changed since the live sync began (vzpy.migrate.changes), through the rsync runs started
        before the freeze; the whole tree again when the changes cannot be trusted. The tree here is final
        (frozen, dumped): its fingerprint, for the restore there, is taken while rsync runs."""
        snap, self.tree_snapshot = self.tree_snapshot, None
        found = changes.changes_since(snap) if snap is not None else changes.TreeChanges(why_full="no live sync")
        if self.opts.online:
            self.fingerprint = InThread(
                lambda: checkpoint.fs_fingerprint(self.ct), f"fingerprint of CT {self.ct.ctid}", late=MigrateError
            )
        if found.why_full is not None:
            self.final_sync.close()
            self.progress(f"  final sync of the whole tree: {found.why_full}")
            self._sync_files()
            return
        self.progress(f"  final sync: {len(found.dirs)} directories and {len(found.files)} other entries changed")
        if not self.final_sync.started:  # offline: nothing started them ahead
            self.final_sync.start(self.ct.private, self.dest["private"], self._openssh(), self.opts.rsync_opts)
        timeout = self._frozen_left("the final sync") or LIVE_SYNC_TIMEOUT
        results = self.final_sync.run(found, timeout)
        self.summary.bytes_moved += sum(result.bytes for result in results)
        self.summary.files_sent.append(sum(result.sent for result in results))

    def _fs_fingerprint(self) -> dict[str, object]:
        """The frozen tree's fingerprint: the one taken during the final sync, or taken now."""
        taken, self.fingerprint = self.fingerprint, None
        if taken is None:
            return checkpoint.fs_fingerprint(self.ct)
        return taken.result(self._frozen_left("the fingerprint of the files"))

    def _start_final_sync(self) -> None:
        """The final sync's rsync runs, connected and waiting for the names to send."""
        if self.tree_snapshot is not None:
            self.final_sync.start(self.ct.private, self.dest["private"], self._openssh(), self.opts.rsync_opts)

    def _sync_files(self) -> None:
        frozen_left = self._frozen_left("the final sync")
        result = sync_tree(
            self.ct.private,
            self.dest["private"],
            self._openssh(),
            rsync_opts=self.opts.rsync_opts,
            allow_vanished=frozen_left is None,
            on_progress=self._rsync_progress if self.opts.verbose else None,
            timeout=frozen_left or LIVE_SYNC_TIMEOUT,
            basis=self.dest.pop("rsync_basis", None),  # the destination's, for the first sync only
        )
        self.summary.bytes_moved += result.bytes
        self.summary.files_sent.append(result.sent)

    def _rsync_progress(self, update: Transfer) -> None:
        now = time.monotonic()
        if update.percent == 100 or now - self._last_progress >= 1.0:
            self._last_progress = now
            self.progress(f"  {human_size(update.bytes)} copied ({update.percent}%, {update.rate}, eta {update.eta})")

    # --- online: freeze, dump, restore there

    def _suspend(self) -> None:
        if not self.final_sync.started:  # pre-copy: its SSH channel and the rsync there start up during the dump
            self._start_final_sync()
        self.budget.start()
        checkpoint.suspend(self.ct, self.progress)

    def resume_source(self) -> None:
        if self.past_no_return:
            raise SourceResumeRefused(
                f"CT {self.ct.ctid} may run on {self.opts.target.host}: the source copy is never resumed"
            )
        if self.ct.stage() is not Stage.STOPPED:
            checkpoint.wake(self.ct)
        self.budget.stop()

    def _open_tunnel(self) -> None:
        """Before the freeze: a page server on the destination, and an SSH tunnel to it from here."""
        self.control_path = self._make_work() / "ssh.sock"
        if self.precopy_parent:  # only the pages changed since the last pre-dump are sent
            port = self._agent().page_server_start(self.ct.ctid, parent=self.precopy_parent)
        else:
            port = self._agent().page_server_start(self.ct.ctid)
        self.tunnel = OpenSshTunnel(self._openssh(), port).start()

    def _make_work(self) -> Path:
        if self.work is None:
            self.work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{self.ct.ctid}-", dir=self._dumpdir()))
        return self.work

    # --- pre-copy

    def _precopy(self) -> None:
        """Pre-dump iterations while the CT runs, until the stop rule says freeze now."""
        written: list[int] = []
        while True:
            index = len(written) + 1
            iteration = self._predump(precopy.subdir(index), self.precopy_parent)
            self.precopy_parent = precopy.subdir(index)
            self.summary.iterations.append(iteration)
            written.append(iteration.pages)
            self.progress(
                f"  pre-dump {index}: {iteration.pages} pages sent, {iteration.skipped} unchanged, "
                f"{iteration.seconds:.2f}s"
            )
            why = self.opts.stop_rule.why_stop(written)
            if why is not None:
                self.summary.stop_reason = why
                self.progress(f"  freezing now: {why}")
                return

    def _predump(self, subdir: str, parent: str | None) -> precopy.Iteration:
        """One pre-dump into `subdir` on both hosts, its pages through a tunnel of its own."""
        agent, ctid = self._agent(), self.ct.ctid
        images = self._make_work() / "images" / subdir
        images.mkdir(mode=0o700, parents=True)
        started = time.monotonic()
        self.predump_subdir = subdir
        port = agent.page_server_start(ctid, subdir, parent=parent or "")
        with OpenSshTunnel(self._link().session.openssh(), port) as tunnel:
            try:
                checkpoint.pre_dump_images(
                    self.ct, images, (LOOPBACK, tunnel.local_port), parent=f"../{parent}" if parent else None
                )
            except VzError as e:
                raise CheckpointFailed(f"pre-dump of CT {ctid} failed: {e.message}", detail=e.detail) from e
            self.summary.bytes_moved += agent.page_server_wait(ctid, subdir, timeout=PAGE_TRANSFER_TIMEOUT)
        self.predump_subdir = None
        stats = self._dump_stats()
        return precopy.Iteration(
            stats.get("pages_written", 0), stats.get("pages_skipped_parent", 0), time.monotonic() - started
        )

    def _stop_precopy(self) -> None:
        """The pre-dump under way's page server there (the destination's images go with its cleanup)."""
        subdir, self.predump_subdir = self.predump_subdir, None
        link = self.link
        if subdir is not None and link is not None and link.agent.usable:
            with contextlib.suppress(VzError):
                link.agent.page_server_stop(self.ct.ctid, subdir, timeout=QUERY_TIMEOUT)
        self._remove_work()

    def _close_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        self.control_path = None
        if self.link is not None and self.link.agent.usable and self.phase == "before":
            with contextlib.suppress(VzError):
                self.link.agent.page_server_stop(self.ct.ctid, timeout=QUERY_TIMEOUT)
        self._remove_work()

    def _dump(self) -> None:
        agent, ctid = self._agent(), self.ct.ctid
        assert self.tunnel is not None, "open the tunnel first"
        images = self._work() / "images"
        images.mkdir(mode=0o700, exist_ok=True)
        try:
            checkpoint.dump_images(
                self.ct,
                images,
                page_server=(LOOPBACK, self.tunnel.local_port),
                timeout=self._frozen_left("the dump"),
                parent=self.precopy_parent,
            )
        except VzError as e:
            # the page server there is stopped by the tunnel's rollback, after the CT resumed here: over a link
            # gone silent, asking now would keep the CT frozen for QUERY_TIMEOUT more
            raise CheckpointFailed(f"dump of CT {ctid} for the migration failed: {e.message}", detail=e.detail) from e
        self.summary.bytes_moved += agent.page_server_wait(ctid, timeout=self._frozen_left("the page server") or 600)
        self.summary.pages_while_frozen = self._dump_stats().get("pages_written", 0)

    def _copy_images(self) -> None:
        """The images CRIU wrote here (all but the pages, which went to the page server): small ones inline
        over the agent's channel, a big set (e.g. large tmpfs contents) with rsync."""
        images = self._work() / "images"
        files = sorted(p for p in images.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        timeout = self._frozen_left("the copy of the images")
        if size <= INLINE_IMAGES_MAX:
            encoded = {p.name: base64.b64encode(p.read_bytes()).decode() for p in files}
            if self._agent().restore_takes_images:
                self.images_for_restore = encoded  # they go with the restore's request: one round trip less
            else:
                self._agent().put_images(self.ct.ctid, encoded, timeout=timeout)
            self.summary.bytes_moved += size
            return
        # not a mirror: the page server's pagemap/pages images are already there
        result = sync_tree(
            images,
            self.dest["images_dir"],
            self._openssh(),
            rsync_opts=self.opts.rsync_opts,
            delete=False,
            timeout=timeout,
        )
        self.summary.bytes_moved += result.bytes

    def _restore_remote(self) -> None:
        fingerprint = self._fs_fingerprint()
        timeout = self._frozen_left("the restore") or 600
        self._agent().restore(self.ct.ctid, fingerprint, timeout=timeout, images=self.images_for_restore)

    # --- post-copy

    def _open_reverse_tunnel(self) -> None:
        """Before the freeze: a port there that reaches, through SSH, the port the lazy dump will serve
        the pages on here. The tunnel's ssh is the ControlMaster the syncs share."""
        self.control_path = self._make_work() / "ssh.sock"
        here, there = free_port(), self._agent().lazy_port(self.ct.ctid)
        self.lazy_ports = (here, there)
        self.tunnel = ReverseSshTunnel(self._openssh(), there, here).start()

    def _lazy_dump(self) -> None:
        """Dump the frozen CT but its memory pages, which CRIU keeps serving here (it returns once they were all
        fetched: in a thread); on once its images are written and its page server listens."""
        assert self.lazy_ports is not None, "open the reverse tunnel first"
        here = self.lazy_ports[0]
        images = self._work() / "images"
        images.mkdir(mode=0o700, exist_ok=True)
        lazy = self.lazy = LazyDump(self.ct, images, here)
        lazy.start()
        # CRIU 4.2.1's lazy page server listens on every address whatever it is told: LazyDump lets only lo in
        while not (lazy.images_written.is_set() and (listening(LOOPBACK, here) or listening(ANY_ADDRESS, here))):
            if lazy.error is not None:
                error = lazy.error
                raise CheckpointFailed(
                    f"dump of CT {self.ct.ctid} for the migration failed: {error.message}", detail=error.detail
                ) from error
            if lazy.finished.is_set():
                raise CheckpointFailed(f"the lazy dump of CT {self.ct.ctid} ended before serving its pages")
            self._frozen_left("the dump")  # FrozenTooLong when none is left
            time.sleep(0.02)
        # CRIU deleted its link-remap files before it began serving pages (dump_images puts them back only when
        # the dump returns, after the restore there): back now, for the final sync to take them along
        self.lazy_remaps = criu_images.linked_remaps(images)
        linkremap.reinstate(self.ct, self.lazy_remaps)
        self.summary.pages_while_frozen, self.summary.pages_lazy = criu_images.pagemap_pages(images)

    def _stop_lazy_dump(self) -> None:
        """Rollback: make the lazy dump end (its page server's first client hangs up at once: CRIU stops
        serving) so that the CT here can be resumed."""
        lazy, self.lazy = self.lazy, None
        if lazy is None:
            return
        lazy.stop()
        if not lazy.finished.wait(LAZY_STOP_WAIT):
            self.progress(f"warning: the lazy dump of CT {self.ct.ctid} did not stop within {LAZY_STOP_WAIT:g}s")
        linkremap.remove(self.ct, self.lazy_remaps)  # the CT runs on here: they must not stay in its tree
        self.lazy_remaps = []

    def _lazy_restore_remote(self) -> None:
        """The point of no return of post-copy: the destination restores the CT with its pages coming from
        here. From the request on, only a reply saying there is no CT there brings the migration back; any
        other failure until the resume's reply leaves the outcome in doubt (the copy here stays frozen)."""
        assert self.lazy_ports is not None, "open the reverse tunnel first"
        fingerprint = self._fs_fingerprint()
        timeout = self._frozen_left("the restore") or 600
        there = self.lazy_ports[1]
        self._commit(
            lambda: {
                "init_pid": self._agent().restore(
                    self.ct.ctid, fingerprint, timeout=timeout, lazy_port=there, images=self.images_for_restore
                )
            }
        )
        self.phase = "in doubt"  # restored there, not yet committed: the resume's reply settles it

    def _serve_lazy_pages(self) -> None:
        """The CT runs there: the pages it has not touched yet go on from here until every one arrived."""
        lazy = self.lazy
        assert lazy is not None, "dump first"
        if not lazy.finished.wait(PAGE_TRANSFER_TIMEOUT) or lazy.error is not None:
            why = lazy.error.message if lazy.error is not None else f"not done after {PAGE_TRANSFER_TIMEOUT:g}s"
            raise MigrateError(
                f"CT {self.ct.ctid} runs on {self.opts.target.host} but the rest of its memory could not be sent "
                f"({why}): it is lost there; the frozen copy here is kept, see `vzpy migrate --help` (post-copy)"
            )
        try:
            code: int | str = self._agent().lazy_wait(self.ct.ctid, timeout=QUERY_TIMEOUT)
        except VzError as e:
            code = e.message
        if code != 0:
            warning = f"warning: the lazy-pages daemon on {self.opts.target.host} did not end cleanly ({code})"
            self.summary.warnings.append(warning)
            self.progress(warning)

    def _resume_remote(self) -> None:
        timeout = max(self._frozen_left("the resume on the destination") or 0.0, RESUME_MIN_TIMEOUT)
        held = tcpkick.encode(tcpkick.release(self.ct))  # what peers sent the frozen CT: delivered there
        reply = self._commit(lambda: self._agent().resume(self.ct.ctid, timeout=timeout, held=held))
        self.summary.frozen_seconds = self.budget.stop()
        self.summary.announced = list(reply.get("announced", []))
        self.progress(
            f"CT {self.ct.ctid} runs on {self.opts.target.host}; it was frozen for "
            f"{self.summary.frozen_seconds:.2f}s (announced on {', '.join(self.summary.announced) or '-'})"
        )

    # --- the commit

    def _commit(self, request: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Send the request that commits the CT on the destination, past the point of no return: the
        marker is written first, and only an answer saying the CT is not there brings us back."""
        self._write_marker()
        self.phase = "in doubt"
        try:
            reply = request()
        except VzError as e:
            if not isinstance(e, AMBIGUOUS) and self._destination_has_no_ct():
                self.phase = "before"
                marker.remove(self.ct.gconf, self.ct.ctid)
            raise
        self.phase = "committed"
        return reply

    def _write_marker(self) -> None:
        mark = marker.Marker(str(self.opts.target), self.ct.ctid, self.opts.online, self.was_running)
        marker.write(self.ct.gconf, mark)

    def _destination_has_no_ct(self) -> bool:
        """After an error reply to the commit: whether the destination says for sure it has not the CT."""
        agent = self._agent()
        if not agent.usable:
            return False
        try:
            return agent.ct_exists(self.ct.ctid, timeout=QUERY_TIMEOUT).get("exists") is False
        except VzError:
            return False

    def _in_doubt(self, cause: BaseException) -> OutcomeInDoubt:
        why = cause.message if isinstance(cause, VzError) else type(cause).__name__
        kept = "suspended" if self.opts.online else "stopped"
        error = OutcomeInDoubt(
            f"CT {self.ct.ctid}: the outcome of the migration to {self.opts.target.host} is unknown ({why}); "
            f"the copy here stays {kept}: run `vzpy migrate --recover {self.opts.target} {self.ct.ctid}` "
            "to finish or undo it"
        )
        if isinstance(cause, VzError):
            error.exit_code = cause.exit_code
        return error

    # --- offline

    def _stop_source(self) -> None:
        """Stopped here from now on until it runs there; the marker says that it ran, for --recover."""
        self._write_marker()
        lifecycle.stop(self.ct, progress=self.progress)

    def _start_source(self) -> None:
        if self.past_no_return:
            raise SourceResumeRefused(f"CT {self.ct.ctid} may run on {self.opts.target.host}: not starting it here")
        marker.remove(self.ct.gconf, self.ct.ctid)
        if self.ct.stage() is Stage.STOPPED:  # the stop may have failed before it stopped anything
            lifecycle.start(self.ct, self.progress)

    def _start_remote(self) -> None:
        agent, ctid = self._agent(), self.ct.ctid
        self._commit(lambda: agent.start(ctid, start=self.was_running, timeout=OFFLINE_START_TIMEOUT))

    # --- after the commit

    def _finish_source(self) -> None:
        """The CT lives on the destination now: stop the copy here, remove what is left of it. A failure
        here is a warning: the migration itself succeeded."""
        with contextlib.suppress(VzError, OSError):
            self._close_tunnel()
        for problem in finish_source(self.ct, self.opts.remove_area):
            warning = (
                f"warning: CT {self.ct.ctid} runs on {self.opts.target.host}, but cleaning up here failed: "
                f"{problem}; run `vzpy migrate --recover {self.opts.target} {self.ct.ctid}` to finish"
            )
            self.summary.warnings.append(warning)
            self.progress(warning)

    def _remove_work(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None

    # --- plumbing

    def _dump_stats(self) -> dict[str, int]:
        """What CRIU's last dump or pre-dump of the CT counted (its stats image is in CRIU's work dir)."""
        return criu_images.dump_stats(checkpoint.log_dir(self.ct)) or {}

    def _dumpdir(self) -> Path:
        path = self.ct.gconf.dumpdir
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def _link(self) -> Link:
        assert self.link is not None, "connect first"
        return self.link

    def _agent(self) -> RemoteAgent:
        return self._link().agent

    def _work(self) -> Path:
        assert self.work is not None, "dump first"
        return self.work

    def _close(self) -> None:
        self.final_sync.close()
        if self.tunnel is not None:  # after a failure past the point of no return: not needed either
            self.tunnel.close()
        self._remove_work()
        if self.link is not None:
            with contextlib.suppress(VzError, OSError):
                self.link.close()


class LazyDump:
    """Post-copy's dump, in a thread: it returns only once the destination fetched every page."""

    def __init__(self, ct: Container, images: Path, port: int) -> None:
        self.ct, self.images, self.port = ct, images, port
        self.images_written = threading.Event()
        self.finished = threading.Event()
        self.error: VzError | None = None
        self.thread = threading.Thread(target=self._run, name=f"lazy dump of CT {ct.ctid}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Make CRIU stop serving: a client that hangs up at once ends its page server."""
        if not self.finished.is_set():
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=5):
                pass

    def _run(self) -> None:
        try:
            with lazy_pages.loopback_only(self.port):
                checkpoint.dump_images(
                    self.ct,
                    self.images,
                    page_server=(LOOPBACK, self.port),
                    lazy=True,
                    on_images=self.images_written.set,
                )
        except VzError as e:
            self.error = e
        finally:
            self.finished.set()


def path_to(options: MigrateOptions, source: dict[str, Any], postcopy_allowed: bool) -> paths.PathChoice:
    """The path an online migration from this host to options.target would take, and why (`vzpy check --to`)."""
    link = connect(options)
    try:
        theirs = (link.agent.hello.get("criu") or {}).get("migration") or {}
    finally:
        link.close()
    return paths.choose(source, theirs, options.path, postcopy_allowed=postcopy_allowed)


def source_migration_facts(ct: Container) -> dict[str, Any]:
    """This host's kernel and CRIU facts that decide a migration's path (cached like `vzpy check`'s)."""
    binary = require_criu(ct.gconf.values.get("CRIU"))
    return detect_capabilities(binary, DEFAULT_CACHE_DIR).migration_facts()


# --- shared with --recover


def finish_source(ct: Container, remove_area: bool) -> list[str]:
    """Stop the source copy and remove it (conf -> CTID.conf.migrated; private area removed, or kept as
    PRIVATE.migrated); the marker goes last, once nothing startable is left. The problems met."""
    conf, private = ct.conf_path, ct.private

    def move_private() -> None:
        if remove_area:
            refuse_mounts_in_areas(ct)  # rmtree would delete through a host dir mounted inside
            shutil.rmtree(private, ignore_errors=True)
        elif private.exists():
            private.rename(private.with_name(private.name + OLD_AREA_SUFFIX))

    problems = _run_all([("stop the source copy", lambda: lifecycle.kill(ct))])
    if not problems:  # never remove the files of a copy that may still run
        problems = _run_all(
            [
                ("remove its private area", move_private),
                ("retire its config", lambda: conf.rename(conf.with_name(conf.name + OLD_AREA_SUFFIX))),
            ]
        )
    with contextlib.suppress(OSError):
        ct.root.rmdir()
    remove_stale_scratch(ct)
    if not problems:
        marker.remove(ct.gconf, ct.ctid)
    return problems


def _run_all(steps: list[tuple[str, Callable[[], object]]]) -> list[str]:
    problems = []
    for what, step in steps:
        try:
            step()
        except (VzError, OSError) as e:
            problems.append(f"{what}: {getattr(e, 'message', None) or e}")
    return problems


def remove_stale_scratch(ct: Container) -> list[Path]:
    """The source's scratch dirs of earlier, killed migrations of this CT (we hold its lock)."""
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}{re.escape(ct.ctid)}-[A-Za-z0-9_]{{8}}")
    dumpdir = ct.gconf.dumpdir
    stale = [p for p in dumpdir.iterdir() if pattern.fullmatch(p.name)] if dumpdir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def recover(ct: Container, options: MigrateOptions, progress: Progress) -> str:
    """After a migration was interrupted: ask the destination whether the CT was committed there (once
    no agent works on it any more). Committed: it is made to run there, the source copy is stopped and
    removed. Not committed: the destination is cleaned and the source copy resumed. What was done."""
    mark = marker.read(ct.gconf, ct.ctid)
    if mark is not None and mark.host != str(options.target):
        raise MigrateUsage(
            f"CT {ct.ctid}'s migration whose outcome is unknown went to {mark.host}, not {options.target}: "
            f"run `{mark.recover_command}`"
        )
    remove_stale_scratch(ct)
    host = options.target.host
    link = connect(options)
    try:
        state = link.agent.recover_state(ct.ctid, wait=RECOVER_LOCK_WAIT)
        if state["state"] == "committed":
            start = bool(mark and not mark.online and mark.was_running)
            link.agent.recover_commit(ct.ctid, start=start)
            problems = finish_source(ct, options.remove_area)
            if problems:
                raise MigrateError(f"CT {ct.ctid} runs on {host}, but cleaning up here failed: {'; '.join(problems)}")
            return f"CT {ct.ctid} runs on {host}: the source copy was stopped and removed"
        progress(f"CT {ct.ctid} was not committed on {host} ({state['state']}): cleaning it up there")
        link.agent.cleanup(ct.ctid, keep_dst=options.keep_dst, wait=RECOVER_LOCK_WAIT)
    finally:
        with contextlib.suppress(VzError, OSError):
            link.close()
    return _bring_back(ct, mark, host)


def _bring_back(ct: Container, mark: marker.Marker | None, host: str) -> str:
    """The destination has no copy: the source's runs again (the marker goes first, so nothing refuses)."""
    stage = ct.stage()
    marker.remove(ct.gconf, ct.ctid)
    if stage in FROZEN_STAGES:
        checkpoint.wake(ct)
    elif stage is Stage.STOPPED and mark is not None and not mark.online and mark.was_running:
        lifecycle.start(ct)
    elif stage is Stage.STOPPED:
        return f"CT {ct.ctid} was not committed on {host}: it was cleaned there; it is stopped here"
    return f"CT {ct.ctid} was not committed on {host}: it was cleaned there and runs here"
