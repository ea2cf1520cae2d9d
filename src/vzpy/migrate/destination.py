"""What the migration agent does with a migrating CT's state on the destination: restore it frozen,
then resume it (committing it here first), or start it (offline migration).

Registered as the agent's `restore`, `resume` and `start` ops. They call the checkpoint and lifecycle
library functions directly: the agent already holds the CT's lock.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

from vzpy import checkpoint, fsstate, lifecycle
from vzpy.config import ConfFile
from vzpy.container import Container
from vzpy.errors import VzError
from vzpy.migrate import CopyFailed, ProtocolError, RestoreFailed
from vzpy.migrate.agent import Agent, Incoming, register_op
from vzpy.runtime import network
from vzpy.stage import Stage

IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # CRIU's image file names: flat, no "..", no "/"


def _container(agent: Agent, incoming: Incoming) -> Container:
    """The incoming CT, seen through its staged config (CTID.conf.migrating) until commit."""
    ct = Container(incoming.ctid, agent.gconf)
    ct.conf = ConfFile.load(incoming.staged_conf)  # overrides the cached property: CTID.conf is not there yet
    return ct


def _restore(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Restore the CT from the images the source sent, frozen and network locked."""
    incoming = agent.incoming_ct(args)
    ct = _container(agent, incoming)
    if args.get("fs_fingerprint") is not None:
        recorded = fsstate.Fingerprint.from_json(args["fs_fingerprint"])
        fsstate.verify(recorded, ct.private, ct.ctid, exclude=checkpoint.FS_EXCLUDE)
    if ct.stage() is Stage.UNDUMPED:  # a retried request: it is already there
        return {"init_pid": ct.load_state().init_pid}
    agent.on_rollback(ct.ctid, "kill the restored CT", lambda: lifecycle.kill(ct))
    init_pid = checkpoint.restore_images(ct, incoming.images)
    return {"init_pid": init_pid}


def _put_images(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """The dump's non-page images, sent inline (small: a round trip beats an rsync while the CT is frozen)."""
    incoming = agent.incoming_ct(args)
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


def _resume(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Commit the CT here, then let it run: from here on the source must never resume it.

    Committed first so that a connection lost after the CT runs cannot roll it back: the agent only
    rolls back what is not committed."""
    incoming = agent.incoming_ct(args)
    ct = _container(agent, incoming)
    committed = _commit(agent, args)
    try:
        frozen = checkpoint.wake(ct)
    except BaseException as e:
        _uncommit(ct)
        raise RestoreFailed(f"CT {ct.ctid} restored on {agent.hostname} but could not be resumed: {e}") from e
    announced = [name for ip in ct.ips for name in network.announce(ip)]
    return {**committed, "frozen": frozen, "announced": announced}


def _start(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Offline migration: commit the CT here and start it (if it ran on the source)."""
    incoming = agent.incoming_ct(args)
    committed = _commit(agent, args)
    if args.get("start", True):
        ct = Container(incoming.ctid, agent.gconf)
        try:
            lifecycle.start(ct)
        except VzError:
            _uncommit(ct)
            raise
    return committed


def _commit(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    from vzpy.migrate.agent import OPS

    return OPS["commit"].handler(agent, args)


def _uncommit(ct: Container) -> None:
    """Undo a commit whose CT never ran here: the source still has it."""
    lifecycle.kill(ct)
    Path(ct.conf_path).unlink(missing_ok=True)


register_op("put_images", _put_images, CopyFailed)
register_op("restore", _restore, RestoreFailed)
register_op("resume", _resume, RestoreFailed)
register_op("start", _start, RestoreFailed)
