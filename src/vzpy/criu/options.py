"""CRIU options as one plain dataclass, and the RPC request (criu_req) built from it for an action.

A field that does not apply to an action is not sent for it, so one CriuOptions can describe a whole
checkpoint (pre-dumps, then the dump). Optional fields are sent only when set: unset leaves CRIU's default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vzpy.criu.binary import load_rpc


class CriuAction(StrEnum):
    DUMP = "dump"
    PRE_DUMP = "pre-dump"
    RESTORE = "restore"
    CHECK = "check"
    PAGE_SERVER = "page-server"
    FEATURE_CHECK = "feature-check"
    VERSION = "version"


class CgroupMode(StrEnum):
    """--manage-cgroups modes (criu(8))."""

    IGNORE = "ignore"
    NONE = "none"
    PROPS = "props"
    SOFT = "soft"
    FULL = "full"
    STRICT = "strict"


class NetworkLock(StrEnum):
    IPTABLES = "iptables"
    NFTABLES = "nftables"
    SKIP = "skip"


# The RPC request type for each action. A pre-dump uses SINGLE_PRE_DUMP: with PRE_DUMP the swrk waits
# for a further PRE_DUMP or DUMP on the same connection, but each of our calls is its own swrk.
REQUEST_TYPES = {
    CriuAction.DUMP: "DUMP",
    CriuAction.PRE_DUMP: "SINGLE_PRE_DUMP",
    CriuAction.RESTORE: "RESTORE",
    CriuAction.CHECK: "CHECK",
    CriuAction.PAGE_SERVER: "PAGE_SERVER_CHLD",
    CriuAction.FEATURE_CHECK: "FEATURE_CHECK",
    CriuAction.VERSION: "VERSION",
}
CGROUP_MODES = {
    CgroupMode.IGNORE: "IGNORE",
    CgroupMode.NONE: "CG_NONE",
    CgroupMode.PROPS: "PROPS",
    CgroupMode.SOFT: "SOFT",
    CgroupMode.FULL: "FULL",
    CgroupMode.STRICT: "STRICT",
}
NETWORK_LOCKS = {NetworkLock.IPTABLES: "IPTABLES", NetworkLock.NFTABLES: "NFTABLES", NetworkLock.SKIP: "SKIP"}
# Features the FEATURE_CHECK request can ask about (criu_features fields).
RPC_FEATURES = ("mem_track", "lazy_pages", "pidfd_store")

DUMPS = frozenset({CriuAction.DUMP, CriuAction.PRE_DUMP})
TREE_ACTIONS = DUMPS | {CriuAction.RESTORE}
IMAGE_ACTIONS = TREE_ACTIONS | {CriuAction.PAGE_SERVER}


@dataclass
class CriuOptions:
    # Where images are read/written. Sent as an fd (images_dir_fd) that we keep open during the call.
    images_dir: Path | None = None
    # Where CRIU chdirs and writes its log; default: images_dir. Also sent as an fd.
    work_dir: Path | None = None
    # Log file name inside work_dir (CRIU refuses paths with "/"); default "<action>.log".
    log_file: str | None = None
    # 4 = debug: CRIU's log is the only diagnostic when a dump or restore fails, so keep it verbose.
    log_level: int = 4
    # Root of the tree to dump (the CT's init as seen from the host). Required for dumps.
    pid: int | None = None
    # Root filesystem of the restored tree (the CT's mounted root).
    root: Path | None = None
    # Keep the tree running after a dump (a checkpoint that is not a suspend).
    leave_running: bool = False
    # Dump/restore established TCP connections (needs TCP repair and a network lock).
    tcp_established: bool = False
    # Dump/restore file locks (flock, posix, ofd).
    file_locks: bool = False
    # Allow linking deleted-but-open files back into the filesystem to dump them.
    link_remap: bool = False
    # How CRIU treats cgroups (None: CRIU's default, soft).
    manage_cgroups: CgroupMode | None = None
    # Restore into another cgroup than the dumped one: controller ("" for all) -> path.
    cgroup_roots: dict[str, str] = field(default_factory=dict)
    # Dump only these cgroup hierarchies (as /proc/PID/cgroup names them: "cpu,cpuacct" when co-mounted);
    # empty: all of them.
    dump_cgroup_hierarchies: list[str] = field(default_factory=list)
    # Freezer cgroup of the tree (v1 freezer dir, or v2 dir with cgroup.freeze).
    freeze_cgroup: Path | None = None
    # How CRIU blocks the CT's network while it is dumped/restored.
    network_lock: NetworkLock | None = None
    # veth pairs to recreate on restore: CT interface name -> host interface name, optionally "@bridge".
    veths: dict[str, str] = field(default_factory=dict)
    # Resources the restored tree gets from fds we hold: CRIU key (e.g. "pipe:[1234]") -> our fd.
    inherit_fd: dict[str, int] = field(default_factory=dict)
    # Ask CRIU for NOTIFY messages at each action-script point (set by Criu when a callback is given).
    notify_scripts: bool = False
    # Track dirty memory so the next pre-dump/dump writes only changed pages (needs mem_dirty_track).
    track_mem: bool = False
    # Previous pre-dump's images dir, relative to images_dir (e.g. "../1").
    parent_img: str | None = None
    # Page server: for a dump, where to send pages; for CriuAction.PAGE_SERVER, where to listen
    # (port 0 = any free port; the chosen one is returned). With lazy_pages, where the dump listens.
    page_server: tuple[str, int] | None = None
    # For a dump to a page server: a socket already connected to it, which CRIU uses instead of connecting
    # itself (ps.fd; Criu.dump opens it). It must be a blocking socket and exist in the swrk at this number.
    page_server_fd: int | None = None
    # Post-copy: the dump leaves pages for `criu lazy-pages`; the restore faults them in on demand.
    lazy_pages: bool = False
    # Restore the tree's root as our child instead of a child of CRIU (then we must reap it).
    rst_sibling: bool = False
    # Seconds CRIU may take to freeze the tree (CRIU's default: 10).
    timeout: int | None = None
    # For CriuAction.FEATURE_CHECK: which of RPC_FEATURES to ask about.
    features: tuple[str, ...] = RPC_FEATURES

    def log_name(self, action: CriuAction) -> str:
        return self.log_file or f"{action}.log"

    def log_path(self, action: CriuAction) -> Path | None:
        directory = self.work_dir or self.images_dir
        return directory.absolute() / self.log_name(action) if directory else None


@dataclass(frozen=True)
class DirFds:
    """Open directory fds for a call; CRIU opens them as /proc/<our pid>/fd/N."""

    images: int | None = None
    work: int | None = None


@contextmanager
def open_dirs(action: CriuAction, opts: CriuOptions) -> Iterator[DirFds]:
    """Open images_dir and work_dir for the RPC's duration (OSError if one cannot be opened)."""
    opened: list[int] = []

    def open_dir(path: Path | None) -> int | None:
        if path is None:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(fd)
        return fd

    try:
        if action in IMAGE_ACTIONS:
            yield DirFds(images=open_dir(opts.images_dir), work=open_dir(opts.work_dir))
        else:
            yield DirFds()
    finally:
        for fd in opened:
            os.close(fd)


def validate(action: CriuAction, opts: CriuOptions) -> None:
    """Refuse requests CRIU would misread (ValueError: a programming error, not an operator's)."""
    if action in IMAGE_ACTIONS and opts.images_dir is None:
        raise ValueError(f"criu {action} needs images_dir")
    if action in DUMPS and not opts.pid:
        # Without a pid CRIU dumps the requesting process: the swrk itself.
        raise ValueError(f"criu {action} needs the pid of the tree's root")
    if action is CriuAction.PAGE_SERVER and opts.page_server is None:
        raise ValueError("criu page-server needs page_server=(address, port)")
    if "/" in opts.log_name(action):
        raise ValueError(f"log_file must be a plain name inside work_dir, not {opts.log_file!r}")
    unknown = set(opts.features) - set(RPC_FEATURES)
    if action is CriuAction.FEATURE_CHECK and unknown:
        raise ValueError(f"RPC feature check knows only {RPC_FEATURES}, not {sorted(unknown)}")


def build_request(action: CriuAction, opts: CriuOptions, dirs: DirFds | None = None) -> Any:
    """The criu_req for `action`. `dirs` are the open fds of images_dir/work_dir (see open_dirs)."""
    validate(action, opts)
    rpc = load_rpc()
    req = rpc.criu_req(type=rpc.criu_req_type.Value(REQUEST_TYPES[action]))
    if action is CriuAction.VERSION:
        return req
    if action is CriuAction.FEATURE_CHECK:
        req.features.CopyFrom(rpc.criu_features(**{name: True for name in opts.features}))
        return req
    dirs = dirs or DirFds()
    # images_dir_fd is a required proto2 field: -1 says "none" (a check needs no images).
    req.opts.images_dir_fd = dirs.images if dirs.images is not None else -1
    req.opts.log_level = opts.log_level
    if action is CriuAction.CHECK:
        return req
    _set_log(req.opts, action, opts, dirs)
    _set_page_server(req.opts, action, opts)
    if action in TREE_ACTIONS:
        _set_tree(req.opts, rpc, action, opts)
    if action in DUMPS:
        _set_dump(req.opts, action, opts)
    if action is CriuAction.RESTORE:
        _set_restore(req.opts, opts)
    return req


def _set_log(msg: Any, action: CriuAction, opts: CriuOptions, dirs: DirFds) -> None:
    # work_dir_fd only when a work dir is given: without it CRIU logs into the images dir.
    if dirs.work is not None:
        msg.work_dir_fd = dirs.work
    msg.log_file = opts.log_name(action)


def _set_page_server(msg: Any, action: CriuAction, opts: CriuOptions) -> None:
    # ps only when pages are streamed (dump -> remote page server), served (page-server), or left
    # for lazy-pages (dump with lazy_pages): otherwise a dump writes pages into images_dir.
    if opts.page_server is None or action is CriuAction.RESTORE:
        return
    if opts.page_server_fd is not None and action in DUMPS and not opts.lazy_pages:
        # the address too would only make CRIU warn that it is ignored
        msg.ps.fd = opts.page_server_fd
        return
    address, port = opts.page_server
    msg.ps.address = address
    msg.ps.port = port


def _set_tree(msg: Any, rpc: Any, action: CriuAction, opts: CriuOptions) -> None:
    """Options shared by dump, pre-dump and restore."""
    for name in ("notify_scripts", "file_locks"):
        if getattr(opts, name):
            setattr(msg, name, True)
    if opts.manage_cgroups is not None:
        msg.manage_cgroups_mode = rpc.criu_cg_mode.Value(CGROUP_MODES[opts.manage_cgroups])
    for controller, path in opts.cgroup_roots.items():
        root = msg.cg_root.add(path=path)
        if controller:
            root.ctrl = controller
    if action is not CriuAction.RESTORE:
        msg.cgroup_dump_controller.extend(opts.dump_cgroup_hierarchies)
    # A pre-dump does not touch the network: it leaves the tree running.
    if action is not CriuAction.PRE_DUMP:
        if opts.tcp_established:
            msg.tcp_established = True
        if opts.network_lock is not None:
            msg.network_lock = rpc.criu_network_lock_method.Value(NETWORK_LOCKS[opts.network_lock])
    # lazy_pages: the dump keeps pages for lazy-pages; the restore leaves them to uffd. A pre-dump
    # has no lazy mode.
    if opts.lazy_pages and action is not CriuAction.PRE_DUMP:
        msg.lazy_pages = True


def _set_dump(msg: Any, action: CriuAction, opts: CriuOptions) -> None:
    """Options for dump and pre-dump."""
    assert opts.pid is not None  # validate() refused a dump without a pid
    msg.pid = opts.pid
    # freeze_cgroup only when the CT has one: without it CRIU freezes task by task with ptrace.
    if opts.freeze_cgroup is not None:
        msg.freeze_cgroup = str(opts.freeze_cgroup)
    # track_mem only for pre-copy: asking for it on a kernel without soft-dirty tracking fails the dump.
    if opts.track_mem:
        msg.track_mem = True
    # parent_img only from the second iteration on: it names the previous pre-dump to diff against.
    if opts.parent_img:
        msg.parent_img = opts.parent_img
    if opts.timeout is not None:
        msg.timeout = opts.timeout
    if action is CriuAction.PRE_DUMP:
        return
    if opts.leave_running:
        msg.leave_running = True
    if opts.link_remap:
        msg.link_remap = True


def _set_restore(msg: Any, opts: CriuOptions) -> None:
    if opts.root is not None:
        msg.root = str(opts.root)
    # rst_sibling only when the caller reaps the restored root: it becomes the caller's child.
    if opts.rst_sibling:
        msg.rst_sibling = True
    for inside, outside in opts.veths.items():
        msg.veths.add(if_in=inside, if_out=outside)
    # inherit_fd: these fds must also exist in the swrk process (rpc passes them at the same numbers).
    for key, fd in opts.inherit_fd.items():
        msg.inherit_fd.add(key=key, fd=fd)
