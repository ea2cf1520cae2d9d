"""The agent's state for one source connection: the CTs migrating here, their locks, page servers and
what a rollback must undo.

What prepare made for a CT is recorded in its work dir (DUMPDIR/Migrate.CTID/agent.json) so that a later
agent (a retried prepare, a cleanup, or a recovery) finds what a dead one left behind. The record's state:

    prepared    files are being synced, images received, maybe restored (frozen): rolled back if the
                source goes away
    kept        rolled back with --keep-dst: the synced private area stays for the next attempt
    committed   CTID.conf is in place: the CT is this host's; never rolled back by the agent

Commit is the staged config renamed to CTID.conf (atomic), recorded before the CT is woken, so a lost
channel after it can never roll back a CT that may already run.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vzpy import fileio, lock, proc
from vzpy.config import GlobalConfig
from vzpy.criu import PageServer
from vzpy.errors import VzError
from vzpy.migrate import CopyFailed, CtExistsRemote, MigrationLocked, RemoteConfigError
from vzpy.migrate.args import ctid_arg

WORKDIR_PREFIX = "Migrate."
TRASH_PREFIX = ".removing."  # a finished migration's work dir, being removed
RECORD = "agent.json"
STAGED_SUFFIX = ".migrating"
DEFAULT_IDLE_TIMEOUT = 4 * 3600.0
LOCK_OPERATION = "incoming-migration"
LOCK_POLL = 0.05


@dataclass
class Incoming:
    """One CT migrating here; saved as WORKDIR/agent.json."""

    ctid: str
    token: str
    workdir: str
    private: str
    root: str
    conf: str
    keep_dst: bool = False
    made_private: bool = False  # its contents are ours (rollback removes them)
    private_existed: bool = False  # it was an empty directory before: rollback empties it, keeps it
    state: str = "prepared"  # prepared | kept | committed
    restored: bool = False  # a restore was started: a rollback kills what it made, even after a dead agent

    @property
    def images(self) -> Path:
        return Path(self.workdir) / "images"

    @property
    def staged_conf(self) -> Path:
        return Path(self.conf + STAGED_SUFFIX)

    @property
    def record(self) -> Path:
        return Path(self.workdir) / RECORD

    def save(self) -> None:
        fileio.write_atomic(self.record, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, workdir: Path) -> Incoming | None:
        try:
            data = json.loads((workdir / RECORD).read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise CopyFailed(f"unreadable migration record {workdir / RECORD}: {e}; remove {workdir}") from e

    def paths(self) -> dict[str, str]:
        return {
            "private": self.private,
            "root": self.root,
            "workdir": self.workdir,
            "images_dir": str(self.images),
            "conf": self.conf,
        }


class AgentSession:
    """Everything one agent process holds for its source."""

    def __init__(self, gconf_loader: Callable[[], GlobalConfig] = GlobalConfig.load) -> None:
        self._gconf_loader = gconf_loader
        self._gconf: GlobalConfig | None = None
        self.hostname = socket.gethostname()
        self.version: tuple[int, int] | None = None
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.fault = ""  # a fault-injection spec for this agent (vzpy.migrate.fault)
        self.incoming: dict[str, Incoming] = {}
        self._locks: dict[str, lock.CtLock] = {}
        self._page_servers: dict[tuple[str, str], PageServer] = {}
        self._lazy_pages: dict[str, proc.Child] = {}  # post-copy's lazy-pages daemons, by CT
        self._undo: dict[str, list[tuple[str, Callable[[], None]]]] = {}

    @property
    def gconf(self) -> GlobalConfig:
        if self._gconf is None:
            try:
                self._gconf = self._gconf_loader()
            except VzError as e:
                raise RemoteConfigError(f"cannot read the global config on {self.hostname}: {e.message}") from e
        return self._gconf

    def workdir(self, ctid: str) -> Path:
        return self.gconf.dumpdir / f"{WORKDIR_PREFIX}{ctid}"

    def incoming_ct(self, args: dict[str, object]) -> Incoming:
        """The CT of args["ctid"], prepared in this session (CopyFailed otherwise)."""
        ctid = ctid_arg(args)
        incoming = self.incoming.get(ctid)
        if incoming is None or incoming.state != "prepared":
            raise CopyFailed(f"CT {ctid} is not being migrated to {self.hostname} in this session: prepare it first")
        return incoming

    def on_rollback(self, ctid: str, what: str, undo: Callable[[], None]) -> None:
        """Run `undo` if the CT's migration is rolled back (last registered runs first); commit drops it."""
        self._undo.setdefault(ctid, []).append((what, undo))

    # --- locking (vzpy.lock's CT lock, held from prepare to commit or rollback)

    def lock(self, ctid: str, wait: float = 0.0) -> None:
        """Hold CT ctid's lock; with `wait`, retry that long (a dying agent may still hold it)."""
        if ctid in self._locks:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                self._locks[ctid] = lock.acquire(self.gconf.lockdir, ctid, LOCK_OPERATION)
                return
            except lock.CtLocked as e:
                if time.monotonic() >= deadline:
                    raise MigrationLocked(
                        f"CT {ctid} is locked on {self.hostname} by {e.holder}; retry later"
                    ) from None
            time.sleep(LOCK_POLL)

    def unlock(self, ctid: str) -> None:
        held = self._locks.pop(ctid, None)
        if held is not None:
            held.release()

    def lock_holder(self, ctid: str) -> str | None:
        """Who holds CT ctid's lock, if anyone but us."""
        if ctid in self._locks:
            return None
        holder = lock.holder(self.gconf.lockdir, ctid)
        return None if holder is None else f"locked by {holder}"

    # --- page servers

    def page_server(self, ctid: str, subdir: str) -> PageServer | None:
        return self._page_servers.get((ctid, subdir))

    def add_page_server(self, ctid: str, subdir: str, server: PageServer) -> None:
        self._page_servers[(ctid, subdir)] = server

    def stop_page_servers(self, ctid: str) -> None:
        for key in [key for key in self._page_servers if key[0] == ctid]:
            self._page_servers.pop(key).stop()

    # --- post-copy's lazy-pages daemons: killed by a rollback, left running by a commit (the CT needs them
    # until every page arrived; they exit then, also after this agent is gone)

    def add_lazy_pages(self, ctid: str, daemon: proc.Child) -> None:
        self._lazy_pages[ctid] = daemon
        self.on_rollback(ctid, "stop the lazy-pages daemon", lambda: self.stop_lazy_pages(ctid))

    def stop_lazy_pages(self, ctid: str) -> None:
        daemon = self._lazy_pages.pop(ctid, None)
        if daemon is not None:
            daemon.close()

    def wait_lazy_pages(self, ctid: str, wait: float) -> int:
        """The daemon's exit code once it exited (CopyFailed when there is none, or it still runs)."""
        daemon = self._lazy_pages.get(ctid)
        if daemon is None:
            raise CopyFailed(f"no lazy-pages daemon runs for CT {ctid} on {self.hostname}")
        code = daemon.wait(wait)
        if code is None:
            raise CopyFailed(f"the lazy-pages daemon of CT {ctid} on {self.hostname} still runs after {wait:g}s")
        self._lazy_pages.pop(ctid)
        return code

    # --- commit, rollback

    def commit(self, incoming: Incoming) -> None:
        """Make the CT this host's: CTID.conf in place, recorded as committed (the point of no return here)."""
        self.stop_page_servers(incoming.ctid)
        if Path(incoming.conf).exists():
            raise CtExistsRemote(
                f"CT {incoming.ctid} appeared on {self.hostname} during the migration ({incoming.conf})"
            )
        # CTID.conf's presence is what "committed" means
        fileio.replace_durably(incoming.staged_conf, Path(incoming.conf))
        incoming.state = "committed"
        incoming.save()

    def uncommit(self, incoming: Incoming) -> None:
        """Undo a commit whose CT never ran here (its wake or start failed): back to prepared, so the
        source's rollback cleans it up as any other failed migration."""
        fileio.replace_durably(Path(incoming.conf), incoming.staged_conf)
        incoming.state = "prepared"
        incoming.save()

    def finish(self, incoming: Incoming) -> list[str]:
        """After the CT runs here: drop its rollback, move its work dir aside (removed in the background: the
        source waits for this reply, and removing a big CT's pages takes a while), release its lock."""
        self._undo.pop(incoming.ctid, None)
        errors = run_steps([("remove images", lambda: remove_later(Path(incoming.workdir)))])
        self.unlock(incoming.ctid)
        return errors

    def rollback(
        self, incoming: Incoming, keep_dst: bool, kill_restored: Callable[[], None] | None = None
    ) -> list[str]:
        """Undo everything done for the CT; the paths removed. Every step runs; failures are raised
        together afterwards (CopyFailed). `kill_restored` kills a CT a dead agent restored."""
        ctid = incoming.ctid
        removed: list[str] = []
        steps = [(what, undo) for what, undo in reversed(self._undo.pop(ctid, []))]
        if not steps and incoming.restored and kill_restored is not None:
            steps.append(("kill the restored CT", kill_restored))
        steps += [
            ("stop page servers", lambda: self.stop_page_servers(ctid)),
            ("remove staged config", lambda: remove(incoming.staged_conf, removed)),
            ("remove private area and images", lambda: _remove_data(incoming, keep_dst, removed)),
        ]
        errors = run_steps(steps)
        self.incoming.pop(ctid, None)
        self.unlock(ctid)
        if errors:
            raise CopyFailed(f"rollback of CT {ctid} on {self.hostname} incomplete: " + "; ".join(errors))
        return removed

    def rollback_all(self) -> list[str]:
        """Roll back every uncommitted CT (the channel dropped, or the agent was told to stop)."""
        errors = []
        for incoming in list(self.incoming.values()):
            if incoming.state == "prepared":
                try:
                    self.rollback(incoming, incoming.keep_dst)
                except VzError as e:
                    errors.append(e.message)
        for ctid in list(self._locks):
            self.unlock(ctid)
        return errors


def run_steps(steps: Sequence[tuple[str, Callable[[], object]]]) -> list[str]:
    errors = []
    for what, step in steps:
        try:
            step()
        except Exception as e:
            errors.append(f"{what}: {getattr(e, 'message', None) or e}")
    return errors


def remove_later(workdir: Path) -> threading.Thread | None:
    """Rename workdir to a hidden name next to it, then remove that (and what an earlier, killed agent left
    under such names for the same CT) in a thread the agent's exit waits for."""
    if not workdir.exists():
        return None
    trash = workdir.with_name(f"{TRASH_PREFIX}{workdir.name}.{uuid.uuid4().hex[:8]}")
    workdir.rename(trash)
    stale = [p for p in workdir.parent.glob(f"{TRASH_PREFIX}{workdir.name}.*") if p != trash]

    def remove_all() -> None:
        for path in [trash, *stale]:
            shutil.rmtree(path, ignore_errors=True)

    thread = threading.Thread(target=remove_all, name=f"remove {trash}")
    thread.start()
    return thread


def remove(path: Path, removed: list[str]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        removed.append(str(path))
    elif path.exists() or path.is_symlink():
        path.unlink()
        removed.append(str(path))


def _empty_dir(path: Path, removed: list[str]) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        remove(child, removed)


def _remove_data(incoming: Incoming, keep_dst: bool, removed: list[str]) -> None:
    """The images always; the private area unless keep_dst (then the record stays, marked kept, so a
    later prepare of the same CT reuses the synced area)."""
    remove(incoming.images, removed)
    private = Path(incoming.private)
    if keep_dst and incoming.made_private:
        incoming.state = "kept"
        incoming.restored = False
        incoming.save()
        return
    if incoming.made_private and incoming.private_existed:
        _empty_dir(private, removed)
    elif incoming.made_private:
        remove(private, removed)
    remove(Path(incoming.workdir), removed)
