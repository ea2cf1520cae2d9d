"""What CRIU could not dump in a running CT, found before anything is frozen.

Each Blocker names one task (host pid, comm), what is wrong and how to fix it, in one line:
- a task whose uids/gids differ from root's while root lacks CAP_SYS_RESOURCE (CRIU then cannot read its
  rlimits: "Can't get rlimit 0");
- a task in the CT's cgroup but outside its PID namespace, or in the CT's process tree but not in its
  cgroup (CRIU cannot seize a task the freezer left running);
- a task of the CT whose parent is outside it (a `vzpy exec` command still running): CRIU dumps the init's
  tree only, so it and its children would be lost;
- a task whose session or process group leader is outside the CT's PID namespace;
- an fd on a file of a mount the CT does not have (a host file, the host's /dev/null or terminal);
- an fd on a socket of the host's network namespace.

Everything is read from the host's /proc about the task (status, fd links, fdinfo): links are read, never
followed, and what the CT controls (comm, paths) is only shown, sanitized.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vzpy.container import Container
from vzpy.errors import ChkpntError
from vzpy.host import mounts

CAP_SYS_RESOURCE = 24
# /proc/net files listing a network namespace's sockets, and the column holding each socket's inode
SOCKET_TABLES = {
    "unix": 6,
    "tcp": 9,
    "tcp6": 9,
    "udp": 9,
    "udp6": 9,
    "udplite": 9,
    "udplite6": 9,
    "raw": 9,
    "raw6": 9,
    "icmp": 9,
    "icmp6": 9,
    "packet": 8,
    "netlink": 9,
}
SHOWN_FDS = 3  # fds named per task in a message; the rest are counted
# A task forked after the cgroup was read is in the tree but not in that read: the cgroup is read again (the
# kernel links a new task into its parent's cgroup just after its parent's children list, so once more later)
CGROUP_REREADS = 3
CGROUP_REREAD_PAUSE = 0.02
MAX_SHOWN_CHARS = 64
# A command of a `vzpy exec` still running (a cron job's, say) is waited for this long before chkpnt refuses
EXEC_GRACE = 2.0
EXEC_POLL = 0.05


class NotDumpable(ChkpntError):
    """A running CT holds something CRIU cannot dump (exit code 16, like a failed chkpnt)."""


@dataclass(frozen=True)
class Blocker:
    pid: int  # on the host
    comm: str  # sanitized
    reason: str  # uid, pidns, cgroup, parent, session, pgrp, host-file, host-socket
    message: str  # one line: what is wrong and how to fix it


@dataclass(frozen=True)
class TaskStatus:
    """The fields of /proc/PID/status that matter here."""

    comm: str
    uids: tuple[int, ...]  # real, effective, saved, fs
    gids: tuple[int, ...]
    ns_pids: tuple[int, ...]  # outermost namespace first
    ns_pgids: tuple[int, ...]
    ns_sids: tuple[int, ...]
    ppid: int = 0  # as the host sees it
    zombie: bool = False  # exited, not reaped yet: in its parent's children, in no cgroup's cgroup.procs

    @classmethod
    def parse(cls, text: str) -> TaskStatus:
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()

        def numbers(key: str) -> tuple[int, ...]:
            return tuple(int(word) for word in fields.get(key, "").split())

        return cls(
            comm=printable(fields.get("Name", "?")),
            uids=numbers("Uid"),
            gids=numbers("Gid"),
            ns_pids=numbers("NSpid"),
            ns_pgids=numbers("NSpgid"),
            ns_sids=numbers("NSsid"),
            ppid=int(fields.get("PPid") or 0),
            zombie=fields.get("State", "").startswith("Z"),
        )


def printable(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """CT-controlled text made safe for a one-line message: no control characters, bounded length."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def has_capability(cap: int, proc: Path = Path("/proc")) -> bool:
    """Whether this process (and so the CRIU it starts as root) has capability `cap` in effect."""
    for line in (proc / "self" / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def socket_inodes(table_text: str, column: int) -> set[int]:
    """Socket inodes in one /proc/net table (its header line skipped)."""
    inodes = set()
    for line in table_text.splitlines()[1:]:
        words = line.split()
        if len(words) > column and words[column].isdigit():
            inodes.add(int(words[column]))
    return inodes


def fdinfo_mnt_id(fdinfo_text: str) -> int | None:
    for line in fdinfo_text.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


@dataclass
class CtView:
    """What the CT's own namespaces hold, as seen through its init in the host's /proc."""

    init_pid: int
    proc: Path = Path("/proc")
    _host_sockets: set[int] | None = field(default=None, repr=False)

    @cached_property
    def pidns(self) -> int:
        return os.stat(self.proc / str(self.init_pid) / "ns" / "pid").st_ino

    @cached_property
    def level(self) -> int:
        """Depth of the CT's PID namespace (the host's is 0): index into a task's NSpid/NSsid fields."""
        return len(read_status(self.proc, self.init_pid).ns_pids) - 1

    @cached_property
    def mounts(self) -> set[int]:
        return {m.mount_id for m in mounts.mounts(self.init_pid, proc=self.proc)}

    @cached_property
    def sockets(self) -> set[int]:
        return _net_sockets(self.proc / str(self.init_pid) / "net")

    @property
    def host_sockets(self) -> set[int]:
        # read only when a task holds a socket the CT's netns does not list: usually never
        if self._host_sockets is None:
            self._host_sockets = _net_sockets(self.proc / "self" / "net")
        return self._host_sockets


def _net_sockets(net: Path) -> set[int]:
    inodes: set[int] = set()
    for name, column in SOCKET_TABLES.items():
        try:
            inodes |= socket_inodes((net / name).read_text(), column)
        except OSError:
            continue
    return inodes


def read_status(proc: Path, pid: int) -> TaskStatus:
    return TaskStatus.parse((proc / str(pid) / "status").read_text())


def blockers(ct: Container) -> list[Blocker]:
    """Why CRIU would fail to dump the running CT, one Blocker per task and reason; [] when none is known
    (or the CT does not run: the stage machine refuses that)."""
    state = ct.load_state()
    if not state.init_alive():
        return []
    view = CtView(state.init_pid)
    return find_blockers(
        view, ct.cgroups.pids(), can_dump_other_uids=_can_dump_other_uids(), reread_cgroup=ct.cgroups.pids
    )


def settled_blockers(ct: Container, exec_grace: float = EXEC_GRACE) -> list[Blocker]:
    """blockers(), except that when the only ones are commands of a `vzpy exec` or `enter` still running
    (a cron job's, say), they get `exec_grace` seconds to end first."""
    found = blockers(ct)
    deadline = time.monotonic() + exec_grace
    while found and all(blocker.reason == "parent" for blocker in found) and time.monotonic() < deadline:
        time.sleep(EXEC_POLL)
        found = blockers(ct)
    return found


def require_dumpable(ct: Container, exec_grace: float = EXEC_GRACE) -> None:
    """Raise NotDumpable naming the first blocker (all of them in its detail) unless the CT can be dumped
    (settled_blockers)."""
    found = settled_blockers(ct, exec_grace)
    if not found:
        return
    more = f" (and {len(found) - 1} more, below)" if len(found) > 1 else ""
    raise NotDumpable(
        f"CT {ct.ctid} cannot be checkpointed: {found[0].message}{more}",
        detail="\n".join(blocker.message for blocker in found[1:]),
    )


def _can_dump_other_uids() -> bool:
    return has_capability(CAP_SYS_RESOURCE)


def find_blockers(
    view: CtView,
    cgroup_pids: Iterable[int],
    *,
    can_dump_other_uids: bool,
    reread_cgroup: Callable[[], Iterable[int]] | None = None,
) -> list[Blocker]:
    """Blockers among the CT's cgroup members and the init's process tree (what CRIU dumps).
    `reread_cgroup`: the cgroup's members now, for tasks of the tree forked after `cgroup_pids` was read."""
    in_cgroup = set(cgroup_pids)
    tree = process_tree(view.proc, view.init_pid)
    if reread_cgroup is not None:
        in_cgroup |= _late_forks(view, tree, in_cgroup, reread_cgroup)
    found: list[Blocker] = []
    for pid in sorted(in_cgroup | set(tree)):
        try:
            if pid not in in_cgroup:
                found.extend(_outside_cgroup(view, pid))
            else:
                found.extend(_task_blockers(view, pid, can_dump_other_uids))
        except OSError:
            continue  # the task exited meanwhile (or is a zombie): nothing of it to dump
    return found


def _late_forks(
    view: CtView, tree: list[int], in_cgroup: set[int], reread_cgroup: Callable[[], Iterable[int]]
) -> set[int]:
    """The cgroup's members, read again (a few times) while live tasks of the tree are missing from `in_cgroup`."""
    missing = {pid for pid in tree if pid not in in_cgroup and _alive(view, pid)}
    found: set[int] = set()
    for attempt in range(CGROUP_REREADS):
        if not missing:
            break
        if attempt:
            time.sleep(CGROUP_REREAD_PAUSE)
        now = set(reread_cgroup())
        found |= now
        missing -= now
    return found


def _alive(view: CtView, pid: int) -> bool:
    """Not exited, nor a zombie."""
    try:
        return not read_status(view.proc, pid).zombie
    except OSError:
        return False


def process_tree(proc: Path, root: int, limit: int = 1 << 16) -> list[int]:
    """`root` and its descendants (host pids), from /proc/PID/task/TID/children."""
    found = [root]
    index = 0
    while index < len(found) and len(found) < limit:
        pid = found[index]
        index += 1
        try:
            tids = os.listdir(proc / str(pid) / "task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                found.extend(int(child) for child in (proc / str(pid) / "task" / tid / "children").read_text().split())
            except FileNotFoundError:
                continue
    return found


def _outside_cgroup(view: CtView, pid: int) -> Iterator[Blocker]:
    status = read_status(view.proc, pid)
    if status.zombie:  # CRIU dumps it like any zombie of the tree
        return
    yield Blocker(
        pid,
        status.comm,
        "cgroup",
        f"{_who(pid, status, view.level)} runs in the CT but not in its cgroups (entered with nsenter?), so it "
        "cannot be frozen with it: end it and start it with `vzpy exec`",
    )


def _task_blockers(view: CtView, pid: int, can_dump_other_uids: bool) -> Iterator[Blocker]:
    status = read_status(view.proc, pid)
    who = _who(pid, status, view.level)
    if not _in_ct_pidns(view, pid, status):
        yield Blocker(
            pid,
            status.comm,
            "pidns",
            f"{who} is in the CT's cgroups but not in its PID namespace (a host process moved there?): "
            "end it or move it out of the CT's cgroups",
        )
        return
    if pid != view.init_pid:
        yield from _parent_blocker(view, pid, status, who)
    if not can_dump_other_uids:
        yield from _uid_blocker(pid, status, who)
    yield from _session_blockers(pid, status, who, view.level)
    yield from _fd_blockers(view, pid, status, who)


def _who(pid: int, status: TaskStatus, level: int) -> str:
    inside = status.ns_pids[level] if len(status.ns_pids) > level else 0
    return f"pid {pid} ({status.comm}, pid {inside} in the CT)" if inside else f"pid {pid} ({status.comm})"


def _in_ct_pidns(view: CtView, pid: int, status: TaskStatus) -> bool:
    if os.stat(view.proc / str(pid) / "ns" / "pid").st_ino == view.pidns:
        return True
    # deeper: a PID namespace nested in the CT's, CRIU's to judge
    return len(status.ns_pids) > view.level + 1


def _parent_blocker(view: CtView, pid: int, status: TaskStatus, who: str) -> Iterator[Blocker]:
    try:
        parent_levels = len(read_status(view.proc, status.ppid).ns_pids) if status.ppid else view.level + 1
    except OSError:
        return  # the parent exited: the task goes to the CT's init
    if parent_levels > view.level:
        return
    yield Blocker(
        pid,
        status.comm,
        "parent",
        f"{who} was started by a `vzpy exec` or `vzpy enter` still running on the host, outside the CT's process "
        "tree, so CRIU would not dump it: let that command end, or start it detached "
        "(`vzpy exec CTID 'setsid CMD </dev/null >/dev/null 2>&1 &'`)",
    )


def _uid_blocker(pid: int, status: TaskStatus, who: str) -> Iterator[Blocker]:
    # prlimit() on another task needs CAP_SYS_RESOURCE unless its real, effective and saved ids equal ours
    uid, gid = os.getuid(), os.getgid()
    other_uid = next((u for u in status.uids[:3] if u != uid), None)
    other_gid = next((g for g in status.gids[:3] if g != gid), None)
    if other_uid is None and other_gid is None:
        return
    runs_as = f"uid {other_uid}" if other_uid is not None else f"gid {other_gid}"
    yield Blocker(
        pid,
        status.comm,
        "uid",
        f"{who} runs as {runs_as} and this host's root lacks CAP_SYS_RESOURCE, so CRIU cannot read its rlimits "
        '("Can\'t get rlimit"): stop it or run it as root, or checkpoint on a host whose root has CAP_SYS_RESOURCE',
    )


def _session_blockers(pid: int, status: TaskStatus, who: str, level: int) -> Iterator[Blocker]:
    for reason, ids, what in (("session", status.ns_sids, "session"), ("pgrp", status.ns_pgids, "process group")):
        if len(ids) > level and ids[level] == 0:
            yield Blocker(
                pid,
                status.comm,
                reason,
                f"{who} is in a {what} whose leader is outside the CT (it was started from the host): "
                "restart it from inside the CT, e.g. with `vzpy exec`",
            )
            return


def _fd_blockers(view: CtView, pid: int, status: TaskStatus, who: str) -> Iterator[Blocker]:
    host_files: list[str] = []
    host_sockets: list[str] = []
    fd_dir = view.proc / str(pid) / "fd"
    for name in sorted(os.listdir(fd_dir), key=int):
        try:
            target = os.readlink(fd_dir / name)
            if target.startswith("/"):
                mnt_id = fdinfo_mnt_id((view.proc / str(pid) / "fdinfo" / name).read_text())
                if mnt_id is not None and mnt_id not in view.mounts:
                    host_files.append(f"{name} ({printable(target)})")
            elif target.startswith("socket:[") and _is_host_socket(view, target):
                host_sockets.append(name)
        except FileNotFoundError:
            continue  # closed meanwhile
    if host_files:
        yield Blocker(
            pid,
            status.comm,
            "host-file",
            f"{who} holds {_fds(host_files)} on files outside the CT (inherited from the host): "
            "restart it from inside the CT with its stdio on the CT's own files",
        )
    if host_sockets:
        yield Blocker(
            pid,
            status.comm,
            "host-socket",
            f"{who} holds {_fds(host_sockets)} on sockets of the host's network namespace: "
            "restart it from inside the CT",
        )


def _is_host_socket(view: CtView, target: str) -> bool:
    inode = int(target.removeprefix("socket:[").removesuffix("]"))
    return inode not in view.sockets and inode in view.host_sockets


def _fds(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_FDS])
    more = f" and {len(names) - SHOWN_FDS} more" if len(names) > SHOWN_FDS else ""
    return f"fd{'s' if len(names) > 1 else ''} {shown}{more}"
