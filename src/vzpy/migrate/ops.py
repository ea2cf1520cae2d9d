"""The agent's ops: name -> handler, the exit code class for its unexpected failures, whether it needs
hello first. The explicit table OPS is the protocol's whole surface on the destination.

    hello                              versions, and this host's facts (CRIU, kernel, CPU, cgroups, paths, disk)
    ct_exists(ctid, ips)               whether the CTID (or its private area, or the IPs) is taken here
    prepare(ctid, conf_text, token)    take the CT's lock, make its private area and a 0700 work dir
                                       (DUMPDIR/Migrate.CTID/images), write CTID.conf.migrating; with the
                                       CT's old area here (PRIVATE.migrated), the rsync_basis for the first sync
    page_server_start/wait/stop        a CRIU page server on 127.0.0.1 writing into the images dir (or a
                                       pre-dump iteration's subdir, whose `parent` link names the one before)
    lazy_port(ctid)                    post-copy: a free loopback port here for the tunnel to the source's pages
    lazy_wait(ctid, wait)              post-copy, after the commit: wait for the lazy-pages daemon to finish
    put_images(ctid, files)            the dump's other images, inline
    restore(ctid, fs_fingerprint)      restore the CT, frozen (with lazy_port: post-copy, pages fetched from there)
    resume(ctid)                       commit (CTID.conf.migrating -> CTID.conf), then wake the CT
    start(ctid, start)                 offline: commit, then start the CT (or only register it)
    cleanup(ctid, keep_dst)            undo everything prepare (and later ops) did for the CT
    recover_state / recover_commit     for `vzpy migrate --recover`: where a migration stands; finish it
    ping, bye

Every op but resume/start is idempotent. If the channel drops (stdin EOF), or the agent is signalled,
before commit, every uncommitted CT is rolled back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vzpy import __version__, areas
from vzpy.config import VALUE_CHECKS, ConfFile
from vzpy.criu import Criu, CriuOptions, log_excerpt, require_criu
from vzpy.errors import VzError
from vzpy.host import addresses
from vzpy.migrate import (
    ApplyConfigFailed,
    CopyFailed,
    CtExistsRemote,
    DestinationNotReady,
    MigrateError,
    MigrationLocked,
    ProtocolError,
    RemoteConfigError,
    RestoreFailed,
    destination,
)
from vzpy.migrate.args import (
    Args,
    bool_arg,
    ctid_arg,
    number_arg,
    str_arg,
    strings_arg,
    subdir_arg,
    token_arg,
)
from vzpy.migrate.facts import host_facts
from vzpy.migrate.protocol import PROTOCOL_VERSION, check_compatible, negotiated, parse_version
from vzpy.migrate.session import AgentSession, Incoming, remove

PAGE_SERVER_ADDRESS = "127.0.0.1"
PARENT_LINK = "parent"  # CRIU's name for the link to the parent images
PAGE_SERVER_LOG = "page-server.log"
BASIS_KEY = "rsync_basis"  # in prepare's reply: the --copy-dest directory here for the first sync

Handler = Callable[[AgentSession, Args], dict[str, Any]]


@dataclass(frozen=True)
class Op:
    handler: Handler
    # Raised (with the original message) for failures that are not MigrateErrors: sets the exit code.
    failure: type[MigrateError]
    needs_hello: bool = True


def hello(session: AgentSession, args: Args) -> dict[str, Any]:
    theirs = parse_version(args.get("proto"))
    check_compatible(theirs, peer=f"the source's vzpy {args.get('vzpy', '?')}")
    session.idle_timeout = number_arg(args, "idle_timeout", session.idle_timeout)
    session.fault = str_arg(args, "fault", "")
    session.version = negotiated(theirs)
    return {"proto": list(PROTOCOL_VERSION), "vzpy": __version__, **host_facts(session.gconf)}


def ping(session: AgentSession, args: Args) -> dict[str, Any]:
    return {"time": time.time()}


def bye(session: AgentSession, args: Args) -> dict[str, Any]:
    return {}


def ct_exists(session: AgentSession, args: Args) -> dict[str, Any]:
    ctid = ctid_arg(args)
    ips = strings_arg(args, "ips")
    gconf = session.gconf
    private = gconf.ve_private(ctid)
    record = Incoming.load(session.workdir(ctid))
    return {
        "exists": gconf.ct_conf_path(ctid).exists(),
        "conf": str(gconf.ct_conf_path(ctid)),
        "private": str(private),
        "private_exists": private.is_dir() and any(private.iterdir()),
        "kept": record is not None and record.state == "kept",
        "migrating": record is not None and record.state == "prepared",
        "locked": session.lock_holder(ctid),
        "ips_in_use": addresses.ips_in_use(ips, addresses.configured_owners(gconf.confdir), ctid=ctid),
    }


def prepare(session: AgentSession, args: Args) -> dict[str, Any]:
    ctid = ctid_arg(args)
    token = token_arg(args)
    existing = session.incoming.get(ctid)
    if existing is not None and existing.state == "prepared":
        if existing.token == token:
            return _prepared_reply(existing)
        raise MigrationLocked(f"CT {ctid} is already being migrated to {session.hostname} by another request")
    conf_text, keep_dst = str_arg(args, "conf_text"), bool_arg(args, "keep_dst", False)
    session.lock(ctid)
    try:
        incoming = _prepare_locked(session, ctid, token, conf_text, keep_dst)
    except BaseException:
        session.unlock(ctid)
        raise
    _offer_basis(session, incoming)
    return _prepared_reply(incoming)


def _prepared_reply(incoming: Incoming) -> dict[str, Any]:
    basis = destination.basis_path(incoming)
    return {**incoming.paths(), **({BASIS_KEY: str(basis)} if basis.is_dir() else {})}


def _offer_basis(session: AgentSession, incoming: Incoming) -> None:
    """Build the basis from the CT's old area if there is one this host may use (on the work dir's filesystem:
    it is hard links). Best effort: without it the files are all sent. Removed by a rollback (also one that
    keeps the synced area), and with the work dir once the CT is here."""
    old = destination.old_area(incoming.ctid, Path(incoming.private), session.gconf)
    basis = destination.basis_path(incoming)
    session.on_rollback(incoming.ctid, "remove the rsync basis", lambda: remove(basis, []))
    try:
        if old is not None and os.stat(incoming.workdir).st_dev == os.lstat(old).st_dev:
            destination.build_basis(old, basis)
    except OSError:
        with contextlib.suppress(OSError):
            remove(basis, [])


def _prepare_locked(session: AgentSession, ctid: str, token: str, conf_text: str, keep_dst: bool) -> Incoming:
    gconf = session.gconf
    conf_path = gconf.ct_conf_path(ctid)
    if conf_path.exists():
        raise CtExistsRemote(f"CT {ctid} already exists on {session.hostname} ({conf_path})")
    # the staged conf takes this host's vz.conf areas: refuse them (naming vz.conf:line) before anything is made
    try:
        areas.check_ct(None, ctid, gconf)
    except VzError as e:
        raise ApplyConfigFailed(f"CT {ctid} cannot have its files on {session.hostname}: {e.message}") from e
    private, root = gconf.ve_private(ctid), gconf.ve_root(ctid)
    conf = _staged_conf(conf_text, conf_path, private, root)
    workdir = session.workdir(ctid)
    leftover = _take_over_leftovers(session, workdir)
    adopt = leftover is not None and leftover.made_private
    existed = leftover.private_existed if leftover is not None and adopt else private.is_dir()
    if private.is_dir() and any(private.iterdir()) and not adopt:
        raise CtExistsRemote(
            f"private area {private} of CT {ctid} already exists on {session.hostname}; remove it or pick another CTID"
        )
    incoming = Incoming(ctid, token, str(workdir), str(private), str(root), str(conf_path), keep_dst)
    incoming.made_private, incoming.private_existed = True, existed
    session.incoming[ctid] = incoming  # from here on a failure (or a signal) rolls back what was made
    try:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir.chmod(0o700)
        incoming.images.mkdir(mode=0o700, exist_ok=True)
        incoming.save()  # on disk too: a killed agent leaves a record the next cleanup or prepare follows
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf.save()
    except BaseException:
        with contextlib.suppress(VzError):
            session.rollback(incoming, keep_dst=adopt)
        raise
    return incoming


def _staged_conf(conf_text: str, conf_path: Path, private: Path, root: Path) -> ConfFile:
    """The CT's config as CTID.conf.migrating, with this host's VE_PRIVATE and VE_ROOT."""
    staged = conf_path.with_name(conf_path.name + ".migrating")
    try:
        conf = ConfFile.parse(staged, conf_text)
        for key in VALUE_CHECKS:  # lines vzctl skips are skipped here too; a bad value of a key vzpy applies is not
            conf.checked(key)
        conf.set("VE_PRIVATE", str(private))
        conf.set("VE_ROOT", str(root))
    except VzError as e:
        raise ApplyConfigFailed(f"the CT's config does not apply here: {e.message}") from e
    return conf


def _take_over_leftovers(session: AgentSession, workdir: Path) -> Incoming | None:
    """Clean what an earlier, dead or kept migration of this CT left (we hold the CT's lock, so its agent
    is gone); its record, whose private area (made_private) is reused: the source syncs it again."""
    record = Incoming.load(workdir)
    if record is None:
        if workdir.exists():
            shutil.rmtree(workdir)
        return None
    if record.restored:
        destination.kill_restored(session, record)
    remove(record.staged_conf, [])
    remove(record.images, [])
    remove(destination.basis_path(record), [])  # rebuilt if the old area is still there
    return record


def cleanup(session: AgentSession, args: Args) -> dict[str, Any]:
    ctid = ctid_arg(args)
    incoming = session.incoming.get(ctid)
    if incoming is None:
        session.lock(ctid, wait=number_arg(args, "wait", 0.001))
        try:
            incoming = Incoming.load(session.workdir(ctid))
        except BaseException:
            session.unlock(ctid)
            raise
        if incoming is None:
            session.unlock(ctid)
            return {"removed": []}
    if incoming.state == "committed" or Path(incoming.conf).exists():
        raise CopyFailed(f"CT {ctid} was committed on {session.hostname}: it is no longer a migration to clean up")
    keep = args.get("keep_dst")
    keep_dst = incoming.keep_dst if keep is None else bool_arg(args, "keep_dst", False)
    if ctid in session.incoming:
        return {"removed": session.rollback(incoming, keep_dst)}
    return {"removed": destination.recover_cleanup(session, incoming, keep_dst)}


def page_server_start(session: AgentSession, args: Args) -> dict[str, Any]:
    incoming = session.incoming_ct(args)
    subdir = subdir_arg(args)
    directory = incoming.images / subdir if subdir else incoming.images
    running = session.page_server(incoming.ctid, subdir)
    if running is not None and running.exit_code is None:
        return {"port": running.port, "pid": running.pid, "images_dir": str(directory)}
    directory.mkdir(mode=0o700, exist_ok=True)
    _link_parent(incoming.images, directory, subdir_arg(args, "parent"))
    try:
        binary = require_criu(session.gconf.values.get("CRIU"))
    except VzError as e:
        raise DestinationNotReady(f"no usable CRIU on {session.hostname}: {e.message}") from e
    options = CriuOptions(images_dir=directory, page_server=(PAGE_SERVER_ADDRESS, 0), log_file=PAGE_SERVER_LOG)
    server = Criu(binary).page_server(options)
    session.add_page_server(incoming.ctid, subdir, server)
    return {"port": server.port, "pid": server.pid, "images_dir": str(directory)}


def _link_parent(images: Path, directory: Path, parent: str) -> None:
    """Pre-copy: `directory`'s "parent" link to the previous iteration's images (a sibling subdir of the
    images dir): the page server and the restore read the pages not sent again through it."""
    link = directory / PARENT_LINK
    if link.is_symlink():
        link.unlink()
    if not parent:
        return
    if parent == directory.name or not (images / parent).is_dir():
        raise CopyFailed(f"no images of pre-dump {parent!r} here to build on")
    link.symlink_to(os.path.relpath(images / parent, directory))


def lazy_port(session: AgentSession, args: Args) -> dict[str, Any]:
    """A loopback port nobody listens on now (the source's ssh -R binds it; it retries if it was taken)."""
    session.incoming_ct(args)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((PAGE_SERVER_ADDRESS, 0))
        return {"port": int(sock.getsockname()[1])}


def lazy_wait(session: AgentSession, args: Args) -> dict[str, Any]:
    """Post-copy, after the commit: wait until the lazy-pages daemon has every page (it exits then)."""
    return {"exit_code": session.wait_lazy_pages(ctid_arg(args), number_arg(args, "wait", 60.0))}


def page_server_wait(session: AgentSession, args: Args) -> dict[str, Any]:
    incoming = session.incoming_ct(args)
    subdir = subdir_arg(args)
    server = session.page_server(incoming.ctid, subdir)
    if server is None:
        raise CopyFailed(f"no page server was started for CT {incoming.ctid} ({subdir or 'images'})")
    directory = incoming.images / subdir if subdir else incoming.images
    code = server.wait(number_arg(args, "wait", 60.0))
    if code != 0:
        log = directory / PAGE_SERVER_LOG
        excerpt = log_excerpt(log.read_text(errors="replace")) if log.exists() else ""
        raise CopyFailed(f"the page server on {session.hostname} exited with code {code}", detail=excerpt)
    received = sum(p.stat().st_size for p in directory.glob("pages-*.img"))
    return {"exit_code": code, "bytes": received}


def page_server_stop(session: AgentSession, args: Args) -> dict[str, Any]:
    incoming = session.incoming_ct(args)
    server = session.page_server(incoming.ctid, subdir_arg(args))
    if server is not None:
        server.stop()
    return {"stopped": server is not None}


OPS: dict[str, Op] = {
    "hello": Op(hello, RemoteConfigError, needs_hello=False),
    "ping": Op(ping, ProtocolError),
    "bye": Op(bye, ProtocolError, needs_hello=False),
    "ct_exists": Op(ct_exists, RemoteConfigError),
    "prepare": Op(prepare, CopyFailed),
    "cleanup": Op(cleanup, CopyFailed),
    "page_server_start": Op(page_server_start, CopyFailed),
    "page_server_wait": Op(page_server_wait, CopyFailed),
    "page_server_stop": Op(page_server_stop, CopyFailed),
    "lazy_port": Op(lazy_port, CopyFailed),
    "lazy_wait": Op(lazy_wait, CopyFailed),
    "put_images": Op(destination.put_images, CopyFailed),
    "restore": Op(destination.restore, RestoreFailed),
    "resume": Op(destination.resume, RestoreFailed),
    "start": Op(destination.start, RestoreFailed),
    "recover_state": Op(destination.recover_state, RemoteConfigError),
    "recover_commit": Op(destination.recover_commit, RestoreFailed),
}
