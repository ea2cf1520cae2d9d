"""What the agent does with a migrating CT's state on the destination: take its images, restore it
frozen, then commit it here and resume it (online) or start it (offline); and, for `--recover`, settle a
migration whose agent died.

They call the checkpoint and lifecycle library functions directly: the agent already holds the CT's lock.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from vzpy import areas, checkpoint, fsstate, lifecycle
from vzpy.config import ConfFile, GlobalConfig, validate_ctid
from vzpy.container import Container
from vzpy.criu import require_criu
from vzpy.criu.lazy import start_lazy_pages
from vzpy.errors import VzError
from vzpy.host import mounts
from vzpy.migrate import OLD_AREA_SUFFIX, ProtocolError, RestoreFailed
from vzpy.migrate.args import Args, bool_arg, ctid_arg, number_arg, optional_number_arg
from vzpy.migrate.session import AgentSession, Incoming
from vzpy.runtime import network, tcpkick
from vzpy.stage import Stage

IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # CRIU's image file names: flat, no "..", no "/"
RECOVER_LOCK_WAIT = 60.0  # an agent whose source vanished may still be finishing a request
FROZEN_STAGES = (Stage.SUSPENDED, Stage.DUMPED, Stage.UNDUMPED)
LAZY_SOCKET = "lazy-pages.socket"  # CRIU's, in the work dir: a stale one would make the daemon fail
RETIRING = ".removing-"  # PRIVATE.migrated.removing-XXXXXXXX: a retired old area, being removed
BASIS_DIR = "basis"  # in the work dir: the old area's files rsync may copy instead of receiving them
BASIS_BUILD_SECONDS = 20.0  # within prepare's reply timeout; a basis cut short only sends more


def container(session: AgentSession, incoming: Incoming) -> Container:
    """The incoming CT, seen through its staged config (CTID.conf.migrating) until commit."""
    ct = Container(incoming.ctid, session.gconf)
    conf = Path(incoming.conf) if Path(incoming.conf).exists() else incoming.staged_conf
    ct.conf = ConfFile.load(conf)  # overrides the cached property: CTID.conf is not there yet
    return ct


def kill_restored(session: AgentSession, incoming: Incoming) -> None:
    with contextlib.suppress(FileNotFoundError):
        lifecycle.kill(container(session, incoming))


def put_images(session: AgentSession, args: Args) -> dict[str, Any]:
    """The dump's non-page images, sent inline (small: a round trip beats an rsync while the CT is frozen)."""
    incoming = session.incoming_ct(args)
    files = args.get("files")
    if not isinstance(files, dict):
        raise ProtocolError("migration protocol error: files must be an object of name -> base64")
    for name, data in files.items():
        if not isinstance(name, str) or not IMAGE_NAME_RE.fullmatch(name) or not isinstance(data, str):
            raise ProtocolError(f"migration protocol error: bad image name {name!r}")
        fd = os.open(incoming.images / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(data, validate=True))
    return {"written": len(files)}


def restore(session: AgentSession, args: Args) -> dict[str, Any]:
    """Restore the CT from the images the source sent, frozen and network locked."""
    incoming = session.incoming_ct(args)
    ct = container(session, incoming)
    if args.get("fs_fingerprint") is not None:
        recorded = fsstate.Fingerprint.from_json(args["fs_fingerprint"])
        fsstate.verify(recorded, ct.private, ct.ctid, exclude=checkpoint.FS_EXCLUDE)
    if ct.stage() is Stage.UNDUMPED:  # a retried request: it is already there
        return {"init_pid": ct.load_state().init_pid}
    if "images" in args:  # protocol 1.2: the dump's other images come with the request (see put_images)
        put_images(session, {**args, "files": args["images"]})
    incoming.restored = True
    incoming.save()  # a dead agent's successor must know to kill what this restore makes
    session.on_rollback(ct.ctid, "kill the restored CT", lambda: lifecycle.kill(ct))
    lazy_port = optional_number_arg(args, "lazy_port")
    if lazy_port is not None:
        _start_lazy_pages(session, ct, incoming, int(lazy_port))
    deadline = optional_number_arg(args, "deadline")
    init_pid = checkpoint.restore_images(ct, incoming.images, timeout=deadline, lazy=lazy_port is not None)
    return {"init_pid": init_pid}


def _start_lazy_pages(session: AgentSession, ct: Container, incoming: Incoming, port: int) -> None:
    """Post-copy: the daemon that fetches the CT's pages from the source (through the tunnel ending on
    127.0.0.1:port here) as the restored tasks touch them, and the rest in the background."""
    session.stop_lazy_pages(ct.ctid)  # a retried request's
    binary = require_criu(session.gconf.values.get("CRIU"))
    work = checkpoint.log_dir(ct)  # the restore's work dir: the daemon's socket must be there
    (work / LAZY_SOCKET).unlink(missing_ok=True)
    daemon = start_lazy_pages(binary, incoming.images, work, ("127.0.0.1", port), timeout=None)
    session.add_lazy_pages(ct.ctid, daemon)


def resume(session: AgentSession, args: Args) -> dict[str, Any]:
    """Commit the CT here, then let it run: from here on the source must never resume it.

    Committed first so that a connection lost after the CT runs cannot roll it back (the agent rolls back
    only what is not committed). If it cannot be woken it is killed and uncommitted: the reply says so."""
    incoming = session.incoming_ct(args)
    ct = container(session, incoming)
    session.commit(incoming)
    try:
        frozen = checkpoint.wake(ct)
    except BaseException as e:
        _uncommit(session, incoming, ct)
        raise RestoreFailed(f"CT {ct.ctid} restored on {session.hostname} but could not be resumed: {e}") from e
    announced = announce(ct)
    tcpkick.deliver(ct, tcpkick.decode(args.get("held")))  # peers' segments held on the source
    leftovers = finish_and_retire(session, incoming)
    return {"conf": incoming.conf, "frozen": frozen, "announced": announced, "leftovers": leftovers}


def start(session: AgentSession, args: Args) -> dict[str, Any]:
    """Offline migration: commit the CT here and start it (if it ran on the source)."""
    incoming = session.incoming_ct(args)
    session.commit(incoming)
    if bool_arg(args, "start", True):
        ct = Container(incoming.ctid, session.gconf)
        try:
            lifecycle.start(ct)
        except BaseException:
            _uncommit(session, incoming, ct)
            raise
    return {"conf": incoming.conf, "leftovers": finish_and_retire(session, incoming)}


def _uncommit(session: AgentSession, incoming: Incoming, ct: Container) -> None:
    """The CT never ran here: kill what is there and go back to prepared (the source still has it)."""
    with contextlib.suppress(VzError, OSError):
        lifecycle.kill(ct)
    session.uncommit(incoming)


# --- the CT's old private area (PRIVATE.migrated) as the first sync's basis


def old_area(ctid: str, private: Path, gconf: GlobalConfig) -> Path | None:
    """PRIVATE.migrated, kept here when the CT left with `-r no`, if it may serve as a basis: one that may be
    retired (below), and a directory (not a symlink) owned by root (the agent), on the filesystem of
    `private`'s parent."""
    old = retirable_old_area(ctid, private, gconf)
    if old is None:
        return None
    try:
        found, parent = os.lstat(old), os.stat(private.parent)
    except OSError:
        return None
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_dev != parent.st_dev:
        return None
    return old


def retirable_old_area(ctid: str, private: Path, gconf: GlobalConfig) -> Path | None:
    """Whatever stands at PRIVATE.migrated once the CT is back here (out of date, and in the way of its next
    `-r no` migration away), if it may be removed: nothing mounted on or in it, and no area of another CT
    (CTID "101.migrated" is valid). A symlink or a file is removed itself, never what it names."""
    old = private.with_name(private.name + OLD_AREA_SUFFIX)
    if not os.path.lexists(old):
        return None
    if mounts.mounts_below(old, including=True) or _another_cts_area(ctid, old, gconf):
        return None
    return old


def _another_cts_area(ctid: str, path: Path, gconf: GlobalConfig) -> bool:
    confdir = gconf.confdir
    for conf_path in sorted(confdir.glob("*.conf")) if confdir.is_dir() else []:
        try:
            other = validate_ctid(conf_path.name.removesuffix(".conf"))
            if other == ctid:
                continue
            conf = ConfFile.load(conf_path)
            theirs = [areas.area_of(key, other, conf, gconf).path for key in areas.AREA_KEYS]
        except (OSError, UnicodeError, VzError):
            return True  # unreadable: it might be
        if any(path.is_relative_to(area) or area.is_relative_to(path) for area in theirs):
            return True
    return False


def build_basis(old: Path, basis: Path, seconds: float = BASIS_BUILD_SECONDS) -> int:
    """Hard-link the regular files of the old area into `basis`, a tree of directories made here: its
    symlinks, devices and anything on another filesystem are left out. rsync resolves a --copy-dest path
    through the directory symlinks in it (`etc -> /root` in the old area would make it read the host's
    /root/...), so it is given this tree, where it cannot leave. The old area is only read (the links bump
    its files' link counts and ctimes until the work dir goes). The number of files linked; a basis cut
    short at `seconds` is still valid."""
    deadline = time.monotonic() + seconds
    if basis.is_symlink() or basis.exists():
        shutil.rmtree(basis)
    basis.mkdir(mode=0o700)
    device, linked = os.lstat(old).st_dev, 0
    for top, dirnames, filenames, dirfd in os.fwalk(old, follow_symlinks=False):
        here = basis / os.path.relpath(top, old)
        dirnames[:] = [name for name in dirnames if _same_fs_dir(name, dirfd, device)]
        for name in dirnames:
            (here / name).mkdir(mode=0o700)
        for name in filenames:
            if time.monotonic() > deadline:
                return linked
            linked += _link_regular(name, dirfd, here / name)
    return linked


def _same_fs_dir(name: str, dirfd: int, device: int) -> bool:
    try:
        found = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(found.st_mode) and found.st_dev == device


def _link_regular(name: str, dirfd: int, target: Path) -> int:
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            return 0
        os.link(name, target, src_dir_fd=dirfd, follow_symlinks=False)
    except OSError:  # e.g. EMLINK, or it went away: it is sent instead
        return 0
    return 1


def retire_old_area(ctid: str, private: Path, gconf: GlobalConfig) -> str | None:
    """After the CT was committed here: its old area is out of date, and in the way of the next `-r no`
    migration away. Renamed aside at once, removed in the background (a big tree must not delay the reply to
    the commit); the agent waits for that before it exits. The old area's path, or None if there was none."""
    old = retirable_old_area(ctid, private, gconf)
    if old is None:
        return None
    doomed = old.with_name(f"{old.name}{RETIRING}{uuid.uuid4().hex[:8]}")
    os.rename(old, doomed)
    stale = [p for p in old.parent.glob(f"{old.name}{RETIRING}*") if p != doomed]  # a killed agent's

    def remove_all() -> None:
        for path in (doomed, *stale):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path, ignore_errors=True)  # fd-based: follows no symlink in it
                else:
                    path.unlink()

    threading.Thread(target=remove_all, name="retire").start()
    return str(old)


def finish_and_retire(session: AgentSession, incoming: Incoming) -> list[str]:
    """session.finish, then retire what this host kept of the CT when it left: its old area (used as the basis
    or not) and CTID.conf.migrated, both out of date now that the CT is here again (the problems)."""
    leftovers = session.finish(incoming)
    try:
        retire_old_area(incoming.ctid, Path(incoming.private), session.gconf)
    except OSError as e:
        leftovers.append(f"remove the CT's old private area: {e}")
    retired_conf = Path(incoming.conf + OLD_AREA_SUFFIX)  # what `vzpy migrate` renamed CTID.conf to here
    try:
        retired_conf.unlink(missing_ok=True)
    except OSError as e:
        leftovers.append(f"remove {retired_conf}: {e}")
    return leftovers


def basis_path(incoming: Incoming) -> Path:
    return Path(incoming.workdir) / BASIS_DIR


def announce(ct: Container) -> list[str]:
    """Gratuitous ARP for the CT's addresses on vz.conf's NEIGHBOUR_DEVS (best effort: the CT runs already)."""
    devs = ct.gconf.neighbour_devs
    try:
        return sorted({name for ip in ct.ips for name in network.announce(ip, (ct.veth,), devs.mode, devs.devices)})
    except (VzError, OSError):
        return []


# --- recovery of a migration whose source (and maybe agent) died


def recover_state(session: AgentSession, args: Args) -> dict[str, Any]:
    """Where a migration of the CT to this host stands, once no other agent works on it (its lock is
    taken and kept for recover_commit or cleanup): committed (CTID.conf is here), prepared or kept (a
    record, no CTID.conf) or none."""
    ctid = ctid_arg(args)
    session.lock(ctid, wait=number_arg(args, "wait", RECOVER_LOCK_WAIT))
    conf = session.gconf.ct_conf_path(ctid)
    record = Incoming.load(session.workdir(ctid))
    if conf.exists():
        ct = Container(ctid, session.gconf)
        return {"state": "committed", "stage": ct.stage().value, "record": record is not None}
    return {"state": record.state if record is not None else "none", "stage": None, "record": record is not None}


def recover_commit(session: AgentSession, args: Args) -> dict[str, Any]:
    """Finish a committed migration whose agent died before the CT ran: wake it (online) and remove the
    work dir. The CT's lock was taken by recover_state."""
    ctid = ctid_arg(args)
    session.lock(ctid, wait=number_arg(args, "wait", RECOVER_LOCK_WAIT))
    ct = Container(ctid, session.gconf)
    if not ct.exists():
        raise RestoreFailed(f"CT {ctid} was not committed on {session.hostname}: nothing to finish")
    woken = ct.stage() in FROZEN_STAGES
    if woken:
        checkpoint.wake(ct)
    elif ct.stage() is Stage.STOPPED and bool_arg(args, "start", False):
        lifecycle.start(ct)
    record = Incoming.load(session.workdir(ctid))
    leftovers = finish_and_retire(session, record) if record is not None else []
    session.unlock(ctid)
    return {"woken": woken, "stage": ct.stage().value, "leftovers": leftovers}


def recover_cleanup(session: AgentSession, incoming: Incoming, keep_dst: bool) -> list[str]:
    """Roll back a dead agent's uncommitted migration, killing a CT it restored."""
    return session.rollback(incoming, keep_dst, kill_restored=lambda: kill_restored(session, incoming))
