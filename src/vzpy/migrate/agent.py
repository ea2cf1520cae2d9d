"""The destination side of a migration: `vzpy migrate-agent`, serving protocol requests on stdin/stdout.

The source starts it over SSH (connect_agent) and drives it one request at a time:

    hello                              versions, and this host's facts (CRIU, kernel, CPU, paths, free disk)
    ct_exists(ctid, ips)               whether the CTID (or its private area, or the IPs) is taken here
    prepare(ctid, conf_text, token)    take the CT's lock, make its private area and a 0700 work dir
                                       (DUMPDIR/Migrate.CTID/images), write CTID.conf.migrating
    page_server_start(ctid, subdir)    a CRIU page server on 127.0.0.1 writing into the images dir
    page_server_wait(ctid, subdir, wait) / page_server_stop(ctid, subdir)
    restore / resume / start           in vzpy.migrate.destination (registered when the agent serves)
    commit(ctid)                       CTID.conf.migrating -> CTID.conf, remove the images, release the lock
    cleanup(ctid, keep_dst)            undo everything prepare (and later ops) did for the CT
    ping, bye

Every op is idempotent. What prepare made is recorded in the work dir (agent.json), so a later cleanup
(or prepare) finds what a dead agent left behind. If the channel drops (stdin EOF), or the agent is
signalled, before commit, every uncommitted CT is rolled back. Ops added later (restore, resume) register
undo steps with Agent.on_rollback so a rollback also undoes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzpy import __version__
from vzpy.config import ConfFile, GlobalConfig, validate_ctid
from vzpy.criu import Criu, CriuOptions, PageServer, log_excerpt, require_criu
from vzpy.errors import VzError
from vzpy.migrate import (
    ApplyConfigFailed,
    ConnectionBroken,
    CopyFailed,
    CtExistsRemote,
    DestinationNotReady,
    MigrateError,
    MigrateUsage,
    MigrationLocked,
    ProtocolError,
    RemoteConfigError,
)
from vzpy.migrate.preflight import read_cpu_flags, read_cpu_model
from vzpy.migrate.protocol import (
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    Client,
    Connection,
    FdStream,
    Message,
    check_compatible,
    error_reply,
    negotiated,
    ok_reply,
    parse_version,
)
from vzpy.migrate.ssh import ChannelStream

if TYPE_CHECKING:
    from vzpy.migrate.ssh import SshSession

WORKDIR_PREFIX = "Migrate."
MARKER = "agent.json"
STAGED_SUFFIX = ".migrating"
PAGE_SERVER_ADDRESS = "127.0.0.1"
PAGE_SERVER_LOG = "page-server.log"
SUBDIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_IDLE_TIMEOUT = 4 * 3600.0
LOCK_OPERATION = "incoming-migration"
CATCH_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

Handler = Callable[["Agent", dict[str, Any]], dict[str, Any]]


# --- what prepare made for one CT ----------------------------------------------------------------------


@dataclass
class Incoming:
    """One CT migrating here; saved as WORKDIR/agent.json while it is not committed."""

    ctid: str
    token: str
    workdir: str
    private: str
    root: str
    conf: str
    keep_dst: bool = False
    made_private: bool = False  # its contents are ours (rollback removes them)
    private_existed: bool = False  # it was an empty directory before: rollback empties it, keeps it
    state: str = "prepared"  # prepared | kept (rolled back with --keep-dst) | committed

    @property
    def images(self) -> Path:
        return Path(self.workdir) / "images"

    @property
    def staged_conf(self) -> Path:
        return Path(self.conf + STAGED_SUFFIX)

    @property
    def marker(self) -> Path:
        return Path(self.workdir) / MARKER

    def save(self) -> None:
        tmp = self.marker.with_name(f".{MARKER}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.marker)

    @classmethod
    def load(cls, workdir: Path) -> Incoming | None:
        try:
            data = json.loads((workdir / MARKER).read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise CopyFailed(f"unreadable migration record {workdir / MARKER}: {e}; remove {workdir}") from e

    def paths(self) -> dict[str, str]:
        return {
            "private": self.private,
            "root": self.root,
            "workdir": self.workdir,
            "images_dir": str(self.images),
            "conf": self.conf,
        }


# --- op registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    handler: Handler
    # Raised (with the original message) for failures that are not MigrateErrors: sets the exit code.
    failure: type[MigrateError]
    needs_hello: bool = True


OPS: dict[str, Op] = {}


def register_op(name: str, handler: Handler, failure: type[MigrateError], *, needs_hello: bool = True) -> None:
    """Add or replace an op: `handler(agent, args) -> results`. The extension point for restore/resume:
    use agent.incoming_ct(args) for the prepared CT and agent.on_rollback(ctid, what, undo) for what a
    rollback must undo (e.g. kill the restored tree)."""
    OPS[name] = Op(handler, failure, needs_hello)


def op(name: str, failure: type[MigrateError], *, needs_hello: bool = True) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        register_op(name, handler, failure, needs_hello=needs_hello)
        return handler

    return register


# --- the agent -----------------------------------------------------------------------------------------


class Agent:
    def __init__(self, gconf_loader: Callable[[], GlobalConfig] = GlobalConfig.load) -> None:
        self._gconf_loader = gconf_loader
        self._gconf: GlobalConfig | None = None
        self.hostname = socket.gethostname()
        self.version: tuple[int, int] | None = None
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.incoming: dict[str, Incoming] = {}
        self._lock_fds: dict[str, int] = {}
        self._page_servers: dict[tuple[str, str], PageServer] = {}
        self._undo: dict[str, list[tuple[str, Callable[[], None]]]] = {}

    @property
    def gconf(self) -> GlobalConfig:
        if self._gconf is None:
            try:
                self._gconf = self._gconf_loader()
            except VzError as e:
                raise RemoteConfigError(f"cannot read the global config on {self.hostname}: {e.message}") from e
        return self._gconf

    # --- dispatch

    def handle(self, message: Message) -> Message:
        """One request -> its reply (errors become error replies, never exceptions)."""
        request_id = message.get("id") if isinstance(message.get("id"), int) else None
        try:
            name, spec = self._op_for(message)
            args = {k: v for k, v in message.items() if k not in ("v", "id", "op")}
            return ok_reply(request_id, **_run_op(self, name, spec, args))
        except VzError as e:
            return error_reply(request_id, e)

    def _op_for(self, message: Message) -> tuple[str, Op]:
        name = message.get("op")
        if message.get("v") != PROTOCOL_MAJOR and name != "hello":
            raise ProtocolError(f"migration protocol error: message version {message.get('v')!r}, expected 1")
        spec = OPS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ProtocolError(f"migration protocol error: unknown op {name!r} (known: {', '.join(sorted(OPS))})")
        if spec.needs_hello and self.version is None:
            raise ProtocolError(f"migration protocol error: {name} before hello")
        return name, spec

    # --- helpers for ops

    def incoming_ct(self, args: dict[str, Any]) -> Incoming:
        """The CT of args["ctid"], prepared in this session (CopyFailed otherwise)."""
        ctid = ctid_arg(args)
        incoming = self.incoming.get(ctid)
        if incoming is None or incoming.state != "prepared":
            raise CopyFailed(f"CT {ctid} is not being migrated to {self.hostname} in this session: prepare it first")
        return incoming

    def on_rollback(self, ctid: str, what: str, undo: Callable[[], None]) -> None:
        """Run `undo` if the CT's migration is rolled back (last registered runs first); commit drops it."""
        self._undo.setdefault(ctid, []).append((what, undo))

    # --- locking

    def lock(self, ctid: str) -> None:
        """Hold CT ctid's vzpy lock (lock.ct_lock's file) until commit or rollback."""
        if ctid in self._lock_fds:
            return
        lockdir = self.gconf.lockdir
        lockdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lockdir / f"{ctid}.lck", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise MigrationLocked(f"CT {ctid} is locked on {self.hostname} by {holder}; retry later") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {LOCK_OPERATION}\n".encode(), 0)
        self._lock_fds[ctid] = fd

    def unlock(self, ctid: str) -> None:
        fd = self._lock_fds.pop(ctid, None)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)

    def lock_holder(self, ctid: str) -> str | None:
        """Who holds CT ctid's lock, if anyone but us."""
        if ctid in self._lock_fds:
            return None
        path = self.gconf.lockdir / f"{ctid}.lck"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return f"locked by {_holder(fd)}"
        finally:
            os.close(fd)

    # --- page servers

    def page_server(self, ctid: str, subdir: str) -> PageServer | None:
        return self._page_servers.get((ctid, subdir))

    def add_page_server(self, ctid: str, subdir: str, server: PageServer) -> None:
        self._page_servers[(ctid, subdir)] = server

    def stop_page_servers(self, ctid: str) -> None:
        for key in [key for key in self._page_servers if key[0] == ctid]:
            self._page_servers.pop(key).stop()

    # --- rollback and commit

    def rollback(self, incoming: Incoming, keep_dst: bool) -> list[str]:
        """Undo everything done for the CT; the paths removed. Every step runs; failures are raised
        together afterwards (CopyFailed)."""
        ctid = incoming.ctid
        removed: list[str] = []
        steps = [(what, undo) for what, undo in reversed(self._undo.pop(ctid, []))]
        steps += [
            ("stop page servers", lambda: self.stop_page_servers(ctid)),
            ("remove staged config", lambda: _remove(incoming.staged_conf, removed)),
            ("remove private area and images", lambda: _remove_data(incoming, keep_dst, removed)),
        ]
        errors = _run_steps(steps)
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
        for ctid in list(self._lock_fds):
            self.unlock(ctid)
        return errors

    def forget_undo(self, ctid: str) -> None:
        self._undo.pop(ctid, None)


def _holder(fd: int) -> str:
    """Who holds a CT lock, from what lock.ct_lock writes into it: "PID OPERATION"."""
    pid, _, operation = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    return f"vzpy pid {pid or 'unknown'} ({operation or 'unknown operation'})"


def _run_op(agent: Agent, name: str, spec: Op, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return spec.handler(agent, args)
    except MigrateError:
        raise
    except VzError as e:
        raise spec.failure(e.message, detail=e.detail) from e
    except OSError as e:
        raise spec.failure(f"{name} on {agent.hostname} failed: {e}") from e
    except Exception as e:  # a bug: say which op and what, keep serving
        raise spec.failure(f"{name} on {agent.hostname}: internal error: {type(e).__name__}: {e}") from e


def _run_steps(steps: Sequence[tuple[str, Callable[[], object]]]) -> list[str]:
    errors = []
    for what, step in steps:
        try:
            step()
        except Exception as e:
            errors.append(f"{what}: {getattr(e, 'message', None) or e}")
    return errors


def _remove(path: Path, removed: list[str]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        removed.append(str(path))
    elif path.exists() or path.is_symlink():
        path.unlink()
        removed.append(str(path))


def _empty_dir(path: Path, removed: list[str]) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        _remove(child, removed)


def _remove_data(incoming: Incoming, keep_dst: bool, removed: list[str]) -> None:
    """The images always; the private area unless keep_dst (then the record stays, marked kept, so a
    later prepare of the same CT reuses the synced area)."""
    _remove(incoming.images, removed)
    private = Path(incoming.private)
    if keep_dst and incoming.made_private:
        incoming.state = "kept"
        incoming.save()
        return
    if incoming.made_private and incoming.private_existed:
        _empty_dir(private, removed)
    elif incoming.made_private:
        _remove(private, removed)
    _remove(Path(incoming.workdir), removed)


# --- argument helpers ----------------------------------------------------------------------------------


def ctid_arg(args: dict[str, Any]) -> str:
    value = args.get("ctid")
    if not isinstance(value, str):
        raise ProtocolError("migration protocol error: ctid missing or not a string")
    try:
        return validate_ctid(value)
    except VzError as e:
        raise MigrateUsage(e.message) from e


def _str_arg(args: dict[str, Any], name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise ProtocolError(f"migration protocol error: {name} missing or not a string")
    return value


def _bool_arg(args: dict[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"migration protocol error: {name} must be true or false")
    return value


def _number_arg(args: dict[str, Any], name: str, default: float) -> float:
    value = args.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"migration protocol error: {name} must be a positive number")
    return float(value)


def _subdir_arg(args: dict[str, Any]) -> str:
    subdir = _str_arg(args, "subdir", "")
    if subdir and (not SUBDIR_RE.match(subdir) or subdir in (".", "..")):
        raise ProtocolError(f"migration protocol error: bad images subdir {subdir!r}")
    return subdir


# --- host facts ----------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fs_facts(path: Path) -> dict[str, Any]:
    existing = _existing_ancestor(path)
    st = os.statvfs(existing)
    return {"path": str(path), "free": st.f_bavail * st.f_frsize, "dev": os.stat(existing).st_dev}


def _criu_facts(gconf: GlobalConfig) -> dict[str, Any]:
    try:
        binary = require_criu(gconf.values.get("CRIU"))
    except VzError as e:
        return {"ok": False, "path": None, "version": None, "error": e.message, "features": {}}
    try:
        features = Criu(binary).feature_check()
    except VzError:
        features = {}
    return {"ok": True, "path": str(binary.path), "version": str(binary.version), "error": None, "features": features}


def host_facts(gconf: GlobalConfig) -> dict[str, Any]:
    keys = ("VE_PRIVATE", "VE_ROOT", "CONFDIR", "DUMPDIR", "LOCKDIR", "CGROUP_PARENT", "VETH_PREFIX")
    private_base = gconf.expand("VE_PRIVATE", "0").parent
    return {
        "hostname": socket.gethostname(),
        "kernel": os.uname().release,
        "criu": _criu_facts(gconf),
        "cpu": {"machine": os.uname().machine, "model": read_cpu_model(), "flags": sorted(read_cpu_flags())},
        "config": {"path": str(gconf.path), **{key: gconf.values[key] for key in keys}},
        "disk": {"private": _fs_facts(private_base), "dump": _fs_facts(gconf.dumpdir)},
    }


# --- the ops -------------------------------------------------------------------------------------------


@op("hello", RemoteConfigError, needs_hello=False)
def _hello(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    theirs = parse_version(args.get("proto"))
    check_compatible(theirs, peer=f"the source's vzpy {args.get('vzpy', '?')}")
    agent.idle_timeout = _number_arg(args, "idle_timeout", agent.idle_timeout)
    agent.version = negotiated(theirs)
    return {"proto": list(PROTOCOL_VERSION), "vzpy": __version__, **host_facts(agent.gconf)}


@op("ping", ProtocolError)
def _ping(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    return {"time": time.time()}


@op("bye", ProtocolError, needs_hello=False)
def _bye(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    return {}


@op("ct_exists", RemoteConfigError)
def _ct_exists(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    ctid = ctid_arg(args)
    ips = args.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise ProtocolError("migration protocol error: ips must be a list of strings")
    gconf = agent.gconf
    private = gconf.ve_private(ctid)
    record = Incoming.load(gconf.dumpdir / f"{WORKDIR_PREFIX}{ctid}")
    return {
        "exists": gconf.ct_conf_path(ctid).exists(),
        "conf": str(gconf.ct_conf_path(ctid)),
        "private": str(private),
        "private_exists": private.is_dir() and any(private.iterdir()),
        "kept": record is not None and record.state == "kept",
        "migrating": record is not None and record.state == "prepared",
        "locked": agent.lock_holder(ctid),
        "ips_in_use": _ips_in_use(gconf, ctid, set(ips)),
    }


def _ips_in_use(gconf: GlobalConfig, ctid: str, wanted: set[str]) -> dict[str, str]:
    used: dict[str, str] = {}
    confdir = gconf.confdir
    for conf_path in sorted(confdir.glob("*.conf")) if wanted and confdir.is_dir() else []:
        other = conf_path.name.removesuffix(".conf")
        if other == ctid:
            continue
        try:
            ips = (ConfFile.load(conf_path).get("IP_ADDRESS") or "").split()
        except VzError:
            continue
        used.update({ip.split("/")[0]: other for ip in ips if ip.split("/")[0] in wanted})
    return used


@op("prepare", CopyFailed)
def _prepare(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    ctid = ctid_arg(args)
    token = _str_arg(args, "token")
    if not TOKEN_RE.match(token):
        raise ProtocolError("migration protocol error: token must be 1-64 of [A-Za-z0-9_.-]")
    existing = agent.incoming.get(ctid)
    if existing is not None and existing.state == "prepared":
        if existing.token == token:
            return existing.paths()
        raise MigrationLocked(f"CT {ctid} is already being migrated to {agent.hostname} by another request")
    conf_text, keep_dst = _str_arg(args, "conf_text"), _bool_arg(args, "keep_dst", False)
    agent.lock(ctid)
    try:
        return _prepare_locked(agent, ctid, token, conf_text, keep_dst).paths()
    except BaseException:
        agent.unlock(ctid)
        raise


def _prepare_locked(agent: Agent, ctid: str, token: str, conf_text: str, keep_dst: bool) -> Incoming:
    gconf = agent.gconf
    conf_path = gconf.ct_conf_path(ctid)
    if conf_path.exists():
        raise CtExistsRemote(f"CT {ctid} already exists on {agent.hostname} ({conf_path})")
    private, root = gconf.ve_private(ctid), gconf.ve_root(ctid)
    conf = _staged_conf(conf_text, conf_path, private, root)
    workdir = gconf.dumpdir / f"{WORKDIR_PREFIX}{ctid}"
    leftover = _take_over_leftovers(workdir)
    adopt = leftover is not None and leftover.made_private
    existed = leftover.private_existed if leftover is not None and adopt else private.is_dir()
    if private.is_dir() and any(private.iterdir()) and not adopt:
        raise CtExistsRemote(
            f"private area {private} of CT {ctid} already exists on {agent.hostname}; remove it or pick another CTID"
        )
    incoming = Incoming(ctid, token, str(workdir), str(private), str(root), str(conf_path), keep_dst)
    incoming.made_private, incoming.private_existed = True, existed
    agent.incoming[ctid] = incoming  # from here on a failure (or a signal) rolls back what was made
    try:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir.chmod(0o700)
        incoming.images.mkdir(mode=0o700, exist_ok=True)
        incoming.save()  # on disk too: a killed agent leaves a record the next cleanup or prepare follows
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf.save()
    except BaseException:
        with contextlib.suppress(VzError):
            agent.rollback(incoming, keep_dst=adopt)
        raise
    return incoming


def _staged_conf(conf_text: str, conf_path: Path, private: Path, root: Path) -> ConfFile:
    """The CT's config as CTID.conf.migrating, with this host's VE_PRIVATE and VE_ROOT."""
    staged = conf_path.with_name(conf_path.name + STAGED_SUFFIX)
    try:
        conf = ConfFile.parse(staged, conf_text)
        conf.set("VE_PRIVATE", str(private))
        conf.set("VE_ROOT", str(root))
    except VzError as e:
        raise ApplyConfigFailed(f"the CT's config does not apply here: {e.message}") from e
    return conf


def _take_over_leftovers(workdir: Path) -> Incoming | None:
    """Clean what an earlier, dead or kept migration of this CT left (we hold the CT's lock, so its agent
    is gone); its record, whose private area (made_private) is reused: the source syncs it again."""
    record = Incoming.load(workdir)
    if record is None:
        if workdir.exists():
            shutil.rmtree(workdir)
        return None
    _remove(record.staged_conf, [])
    _remove(record.images, [])
    return record


@op("cleanup", CopyFailed)
def _cleanup(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    ctid = ctid_arg(args)
    incoming = agent.incoming.get(ctid)
    if incoming is not None and incoming.state == "committed":
        raise CopyFailed(f"CT {ctid} was committed on {agent.hostname}: it is no longer a migration to clean up")
    if incoming is None:
        agent.lock(ctid)
        try:
            incoming = Incoming.load(agent.gconf.dumpdir / f"{WORKDIR_PREFIX}{ctid}")
        except BaseException:
            agent.unlock(ctid)
            raise
        if incoming is None:
            agent.unlock(ctid)
            return {"removed": []}
    keep = args.get("keep_dst")
    keep_dst = incoming.keep_dst if keep is None else _bool_arg(args, "keep_dst", False)
    return {"removed": agent.rollback(incoming, keep_dst)}


@op("commit", ApplyConfigFailed)
def _commit(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    ctid = ctid_arg(args)
    incoming = agent.incoming.get(ctid)
    if incoming is not None and incoming.state == "committed":
        return {"conf": incoming.conf, "removed": []}
    incoming = agent.incoming_ct(args)
    agent.stop_page_servers(ctid)
    if Path(incoming.conf).exists():
        raise CtExistsRemote(f"CT {ctid} appeared on {agent.hostname} during the migration ({incoming.conf})")
    os.replace(incoming.staged_conf, incoming.conf)
    incoming.state = "committed"
    agent.forget_undo(ctid)
    removed: list[str] = []
    errors = _run_steps([("remove images", lambda: _remove(Path(incoming.workdir), removed))])
    agent.unlock(ctid)
    return {"conf": incoming.conf, "removed": removed, "leftovers": errors}


@op("page_server_start", CopyFailed)
def _page_server_start(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    incoming = agent.incoming_ct(args)
    subdir = _subdir_arg(args)
    directory = incoming.images / subdir if subdir else incoming.images
    running = agent.page_server(incoming.ctid, subdir)
    if running is not None and running.exit_code is None:
        return {"port": running.port, "pid": running.pid, "images_dir": str(directory)}
    directory.mkdir(mode=0o700, exist_ok=True)
    try:
        binary = require_criu(agent.gconf.values.get("CRIU"))
    except VzError as e:
        raise DestinationNotReady(f"no usable CRIU on {agent.hostname}: {e.message}") from e
    options = CriuOptions(images_dir=directory, page_server=(PAGE_SERVER_ADDRESS, 0), log_file=PAGE_SERVER_LOG)
    server = Criu(binary).page_server(options)
    agent.add_page_server(incoming.ctid, subdir, server)
    return {"port": server.port, "pid": server.pid, "images_dir": str(directory)}


@op("page_server_wait", CopyFailed)
def _page_server_wait(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    incoming = agent.incoming_ct(args)
    subdir = _subdir_arg(args)
    server = agent.page_server(incoming.ctid, subdir)
    if server is None:
        raise CopyFailed(f"no page server was started for CT {incoming.ctid} ({subdir or 'images'})")
    code = server.wait(_number_arg(args, "wait", 60.0))
    if code != 0:
        log = (incoming.images / subdir / PAGE_SERVER_LOG) if subdir else incoming.images / PAGE_SERVER_LOG
        excerpt = log_excerpt(log.read_text(errors="replace")) if log.exists() else ""
        raise CopyFailed(f"the page server on {agent.hostname} exited with code {code}", detail=excerpt)
    directory = incoming.images / subdir if subdir else incoming.images
    received = sum(p.stat().st_size for p in directory.glob("pages-*.img"))
    return {"exit_code": code, "bytes": received}


@op("page_server_stop", CopyFailed)
def _page_server_stop(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    incoming = agent.incoming_ct(args)
    server = agent.page_server(incoming.ctid, _subdir_arg(args))
    if server is not None:
        server.stop()
    return {"stopped": server is not None}


# --- serving -------------------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SERVING_PID = 0  # the agent's own pid, set when it starts serving


def _raise_stop(signum: int, frame: object) -> None:
    # Children the agent forks (the CT launcher, pyroute2's netns helpers) inherit this handler until they
    # exec. In them, raising would unwind through a copy of the agent's own stack and answer on the
    # protocol channel: they must just die of the signal, as they would without the handler.
    if os.getpid() != _SERVING_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    raise _Stop(signum)


def serve(agent: Agent, connection: Connection) -> int:
    """Answer requests until bye or EOF; roll back uncommitted CTs on the way out. The exit code: 0 after
    bye or after EOF with nothing to roll back, 21 (connection broken) when the source vanished mid-way."""
    broken = False
    try:
        while True:
            message = connection.receive(timeout=agent.idle_timeout)
            if message is None:
                broken = any(incoming.state == "prepared" for incoming in agent.incoming.values())
                return ConnectionBroken.exit_code if broken else 0
            connection.send(agent.handle(message))
            if message.get("op") == "bye":
                return 0
    except VzError as e:  # broken pipe, idle timeout, garbage on stdin
        print(f"vzpy migrate-agent: {e.message}; rolling back", file=sys.stderr)
        return e.exit_code
    except _Stop as e:
        print(f"vzpy migrate-agent: {e}; rolling back", file=sys.stderr)
        return 128 + e.signum
    finally:
        _ignore_stop_signals()
        for error in agent.rollback_all():
            print(f"vzpy migrate-agent: {error}", file=sys.stderr)


def _ignore_stop_signals() -> None:
    """A second signal must not interrupt the rollback (only where serve_stdio installed the handlers)."""
    for signum in CATCH_SIGNALS:
        if signal.getsignal(signum) is _raise_stop:
            signal.signal(signum, signal.SIG_IGN)


def serve_stdio() -> int:
    """Serve on fds 0/1, moved aside: stray output (and CRIU's children) cannot touch the protocol."""
    from vzpy.migrate import destination  # noqa: F401 - registers restore/resume/start (it imports this module)

    proto_in, proto_out = os.dup(0), os.dup(1)
    for fd in (proto_in, proto_out):
        os.set_inheritable(fd, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    global _SERVING_PID
    _SERVING_PID = os.getpid()
    for signum in CATCH_SIGNALS:
        signal.signal(signum, _raise_stop)
    connection = Connection(FdStream(proto_in, proto_out), peer="the migration source")
    try:
        return serve(Agent(), connection)
    finally:
        connection.close()


# --- the source's end ----------------------------------------------------------------------------------


def agent_argv(remote_vzpy: str = "vzpy") -> list[str]:
    return [remote_vzpy, "migrate-agent"]


class RemoteAgent:
    """The source's handle on a running agent: typed calls, errors raised with the agent's exit codes."""

    def __init__(self, client: Client, hello: Message) -> None:
        self.client = client
        self.hello = hello

    def ct_exists(self, ctid: str, ips: Sequence[str] = ()) -> Message:
        return self.client.call("ct_exists", ctid=ctid, ips=list(ips))

    def prepare(self, ctid: str, conf_text: str, *, token: str, keep_dst: bool = False) -> Message:
        """Paths on the destination: private, root, workdir, images_dir, conf."""
        return self.client.call("prepare", ctid=ctid, conf_text=conf_text, token=token, keep_dst=keep_dst)

    def page_server_start(self, ctid: str, subdir: str = "") -> int:
        """Start a page server for the CT's images (subdir: one pre-dump iteration); its loopback port."""
        return int(self.client.call("page_server_start", ctid=ctid, subdir=subdir)["port"])

    def page_server_wait(self, ctid: str, subdir: str = "", timeout: float = 60.0) -> int:
        """Wait for the page server to finish; the bytes of memory pages it received."""
        reply = self.client.call("page_server_wait", ctid=ctid, subdir=subdir, wait=timeout, timeout=timeout + 30.0)
        return int(reply.get("bytes", 0))

    def page_server_stop(self, ctid: str, subdir: str = "") -> None:
        self.client.call("page_server_stop", ctid=ctid, subdir=subdir)

    def commit(self, ctid: str) -> Message:
        return self.client.call("commit", ctid=ctid)

    def cleanup(self, ctid: str, keep_dst: bool | None = None) -> list[str]:
        args = {} if keep_dst is None else {"keep_dst": keep_dst}
        return list(self.client.call("cleanup", ctid=ctid, **args)["removed"])

    def close(self) -> None:
        """Say bye (best effort: the agent rolls back what is not committed either way) and hang up."""
        with contextlib.suppress(VzError):
            self.client.call("bye", timeout=10.0)
        self.client.close()

    def __enter__(self) -> RemoteAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_agent(session: SshSession, argv: Sequence[str] | None = None, *, timeout: float = 60.0) -> RemoteAgent:
    """Start the agent over `session` and say hello (its facts: RemoteAgent.hello). DestinationNotReady
    (exit 14) when vzpy is missing there or has no migrate-agent."""
    argv = list(argv or agent_argv())
    connection = session.exec_json(argv)
    client = Client(connection, timeout=timeout)
    try:
        return RemoteAgent(client, client.hello())
    except ConnectionBroken as e:
        stream = connection.stream
        status = stream.exit_status(2.0) if isinstance(stream, ChannelStream) else None
        client.close()
        if status == 127:
            raise DestinationNotReady(
                f"{argv[0]} not found on {session.target}: install vzpy there or pass --remote-vzpy PATH"
            ) from e
        if status:
            raise DestinationNotReady(
                f"`{shlex.join(argv)}` failed on {session.target} with exit code {status}: install the same vzpy "
                "version there (or pass --remote-vzpy PATH)",
                detail=e.message,
            ) from e
        raise
    except BaseException:
        client.close()
        raise


if __name__ == "__main__":
    # `python -m vzpy.migrate.agent` (before `vzpy migrate-agent` is registered, and in tests). Serve with
    # the imported module, not this __main__ copy, so ops registered by other modules are seen.
    from vzpy.migrate import agent as _agent

    sys.exit(_agent.serve_stdio())
