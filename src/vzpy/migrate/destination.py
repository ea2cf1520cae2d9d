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
from pathlib import Path
from typing import Any

from vzpy import checkpoint, fsstate, lifecycle
from vzpy.config import ConfFile
from vzpy.container import Container
from vzpy.criu import require_criu
from vzpy.criu.lazy import start_lazy_pages
from vzpy.errors import VzError
from vzpy.migrate import ProtocolError, RestoreFailed
from vzpy.migrate.args import Args, bool_arg, ctid_arg, number_arg, optional_number_arg
from vzpy.migrate.session import AgentSession, Incoming
from vzpy.runtime import network, tcpkick
from vzpy.stage import Stage

IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # CRIU's image file names: flat, no "..", no "/"
RECOVER_LOCK_WAIT = 60.0  # an agent whose source vanished may still be finishing a request
FROZEN_STAGES = (Stage.SUSPENDED, Stage.DUMPED, Stage.UNDUMPED)
LAZY_SOCKET = "lazy-pages.socket"  # CRIU's, in the work dir: a stale one would make the daemon fail


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
    return {"conf": incoming.conf, "frozen": frozen, "announced": announced, "leftovers": session.finish(incoming)}


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
    return {"conf": incoming.conf, "leftovers": session.finish(incoming)}


def _uncommit(session: AgentSession, incoming: Incoming, ct: Container) -> None:
    """The CT never ran here: kill what is there and go back to prepared (the source still has it)."""
    with contextlib.suppress(VzError, OSError):
        lifecycle.kill(ct)
    session.uncommit(incoming)


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
    leftovers = session.finish(record) if record is not None else []
    session.unlock(ctid)
    return {"woken": woken, "stage": ct.stage().value, "leftovers": leftovers}


def recover_cleanup(session: AgentSession, incoming: Incoming, keep_dst: bool) -> list[str]:
    """Roll back a dead agent's uncommitted migration, killing a CT it restored."""
    return session.rollback(incoming, keep_dst, kill_restored=lambda: kill_restored(session, incoming))
