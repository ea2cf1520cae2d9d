"""Finding and killing what belongs to a test host or network, and reaping networks of killed runs.

Everything a network creates lives under STATE_ROOT/<token>/, with owner.json naming the owning process
and hosts/<name>/host.json (a HostRecord) naming each host's netns, sshd and temp dir: `reap_stale()`
tears down networks whose owner died before its teardown ran.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vzpy_lab.netns.layout import CGROUP_ROOT, CLEANUP_TIMEOUT, STATE_ROOT, HostCleanupError, netns_path
from vzpy_lab.netns.system import (
    NsId,
    Step,
    delete_link,
    delete_netns,
    gone_or_zombie,
    ns_id,
    remove_tree,
    run_steps,
    start_time,
    write_file,
)

# --- cgroups ---------------------------------------------------------------------------------------


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory of a CGROUP_PARENT, in all hierarchies, parents before children."""
    tops = sorted({*CGROUP_ROOT.glob(name), *CGROUP_ROOT.glob(f"*/{name}")})
    return [Path(root) for top in tops if top.is_dir() for root, _, _ in os.walk(top)]


def _write_quietly(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)


def thaw_and_kill_cgroups(name: str) -> None:
    """Thaw frozen cgroups (v1 freezer, v2 cgroup.freeze) and use v2 cgroup.kill where there is one."""
    for directory in cgroup_dirs(name):
        for control, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0"), ("cgroup.kill", "1")):
            if (directory / control).exists():
                _write_quietly(directory / control, value)


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(name):
        try:
            pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


def remove_cgroups(name: str, timeout: float = CLEANUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for directory in reversed(cgroup_dirs(name)):
        _rmdir_when_empty(directory, deadline)


def _rmdir_when_empty(directory: Path, deadline: float) -> None:
    """rmdir a cgroup, retrying while it is still busy with exiting tasks."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _cgroup_segments(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return set()
    return {segment for line in lines for segment in line.split(":", 2)[-1].split("/")}


# --- finding and killing a host's processes --------------------------------------------------------


@dataclass(frozen=True)
class Residents:
    """The processes that belong to a test host: in one of its namespaces or in its cgroup parent.

    Namespaces of this process (the machine's own) are never matched, whatever a caller passes.
    """

    namespaces: frozenset[tuple[str, NsId]]
    cgroup_name: str | None = None

    @classmethod
    def of(cls, namespaces: Iterable[tuple[str, NsId | None]], cgroup_name: str | None = None) -> Residents:
        own = {(kind, ns_id(f"/proc/{pid}/ns/{kind}")) for kind in ("net", "mnt") for pid in ("self", "1")}
        chosen = {(kind, ident) for kind, ident in namespaces if ident is not None and (kind, ident) not in own}
        return cls(frozenset(chosen), cgroup_name)

    def owns(self, pid: int) -> bool:
        if pid == os.getpid() or gone_or_zombie(pid):
            return False
        if any(ns_id(f"/proc/{pid}/ns/{kind}") == ident for kind, ident in self.namespaces):
            return True
        return self.cgroup_name is not None and self.cgroup_name in _cgroup_segments(pid)

    def find(self) -> list[int]:
        candidates = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
        if self.cgroup_name:
            candidates |= cgroup_pids(self.cgroup_name)
        return sorted(pid for pid in candidates if self.owns(pid))


def _kill_if(pid: int, still_matches: Callable[[int], bool]) -> None:
    """SIGKILL via a pidfd, re-checking after opening it so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if still_matches(pid):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def kill_residents(residents: Residents, timeout: float = CLEANUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while victims := residents.find():
        if residents.cgroup_name:
            thaw_and_kill_cgroups(residents.cgroup_name)
        for pid in victims:
            _kill_if(pid, residents.owns)
        if time.monotonic() > deadline:
            raise HostCleanupError(f"still alive {timeout:g}s after SIGKILL: pids {victims}")
        time.sleep(0.01)


def reap(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """Kill (if still running), wait for and close the pipes of our own child processes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=CLEANUP_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# --- per-host state on disk, and the teardown steps ------------------------------------------------


@dataclass
class HostRecord:
    """What teardown needs, saved as host.json so a later run can reap a host whose owner died."""

    name: str
    octet: int
    netns: str
    base: str
    sshd_pid: int | None = None
    sshd_start: int | None = None

    @property
    def hostname(self) -> str:
        return self.netns

    @property
    def cgroup_parent(self) -> str:
        return f"vzpy-{self.hostname}"

    def save(self) -> None:
        write_file(Path(self.base) / "host.json", json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> HostRecord:
        return cls(**json.loads(path.read_text()))

    def live_sshd(self) -> int | None:
        """The sshd's pid, only if that very process is still running."""
        if self.sshd_pid is None or start_time(self.sshd_pid) != self.sshd_start:
            return None
        return self.sshd_pid

    def namespaces(self) -> list[tuple[str, NsId | None]]:
        """Its netns; while its sshd runs, also its mount ns and the netns named in its /run/netns
        (as made by `ip netns add` inside the host, which `ip netns exec` processes live in)."""
        found = [("net", ns_id(netns_path(self.netns)))]
        pid = self.live_sshd()
        if pid is None:
            return found
        found.append(("mnt", ns_id(f"/proc/{pid}/ns/mnt")))
        inner = Path(f"/proc/{pid}/root/run/netns")
        with contextlib.suppress(OSError):
            found += [("net", ns_id(inner / name)) for name in os.listdir(inner)]
        return found

    def residents(self, *extra: tuple[str, NsId | None]) -> Residents:
        return Residents.of([*self.namespaces(), *extra], self.cgroup_parent)


def host_teardown(record: HostRecord, switch_netns: str, residents: Residents, extra: list[Step]) -> list[Step]:
    return [
        ("kill processes", lambda: kill_residents(residents)),
        *extra,
        ("remove cgroups", lambda: remove_cgroups(record.cgroup_parent)),
        ("delete veth", lambda: delete_link(switch_netns, f"v{record.octet}")),
        ("delete netns", lambda: delete_netns(record.netns)),
        ("remove temp dir", lambda: remove_tree(Path(record.base))),
    ]


def network_teardown(state_dir: Path, switch: str, client: str, residents: Residents) -> list[Step]:
    return [
        ("kill client processes", lambda: kill_residents(residents)),
        ("delete client netns", lambda: delete_netns(client)),
        ("delete switch netns", lambda: delete_netns(switch)),
        ("remove state dir", lambda: remove_tree(state_dir)),
    ]


# --- reaping what killed runs left behind ----------------------------------------------------------


def _reap_network(state_dir: Path, owner: dict[str, Any]) -> list[str]:
    switch, client = owner["switch"], owner["client"]
    errors = []
    for host_file in sorted(state_dir.glob("hosts/*/host.json")):
        record = HostRecord.load(host_file)
        errors += run_steps(host_teardown(record, switch, record.residents(), []))
    residents = Residents.of([("net", ns_id(netns_path(name))) for name in (client, switch)])
    return errors + run_steps(network_teardown(state_dir, switch, client, residents))


def reap_stale(state_root: Path = STATE_ROOT) -> list[str]:
    """Tear down networks whose owning process is gone (a run killed before its teardown).

    Networks of live processes (other sessions running now) are left alone. Returns one message
    per reaped network, plus any cleanup failures.
    """
    messages = []
    for state_dir, owner in orphaned(state_root):
        errors = _reap_network(state_dir, owner)
        messages.append(f"reaped stale test network {state_dir.name}" + "".join(f"\n  {e}" for e in errors))
    return messages


def orphaned(state_root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(state dir, its owner.json) of every network or lab under state_root whose owning process is gone."""
    for owner_file in sorted(state_root.glob("*/owner.json")):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if start_time(owner["pid"]) != owner["start"]:
            yield owner_file.parent, owner
