"""Preflight: can this CT go to that destination? Decided from the agent's `hello` and `ct_exists` replies
and the source's own facts, before anything is copied.

check() returns every problem found (an empty list: go); a problem whose check the operator skipped with
--nodeps is still returned, marked skipped, so it can be shown as ignored. Check names (for --nodeps):
version, criu, cgroups, ctid, disk_space, cpu, ip, dumpable.

Everything the destination or CRIU would only find out after the CT was frozen is checked here: the
destination's cgroup hierarchies, and (online) the CT's processes CRIU cannot dump (vzpy.dumpable).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzpy.host.cpu import CPUINFO, arch_mismatch, host_cpu, missing_flags, parse_cpuinfo, relevant_flags
from vzpy.migrate import (
    OLD_AREA_SUFFIX,
    CheckpointFailed,
    CtExistsRemote,
    DestinationNotReady,
    IncompatibleVersion,
    IpInUseRemote,
    MigrateError,
    MigrateUsage,
    MigrationLocked,
    NoDiskSpaceRemote,
    UnsupportedCpu,
)
from vzpy.migrate.protocol import PROTOCOL_VERSION, parse_version
from vzpy.runtime.cgroups import CONTROLLERS
from vzpy.units import human_size

if TYPE_CHECKING:
    from vzpy.container import Container

CHECKS = ("version", "criu", "cgroups", "ctid", "disk_space", "cpu", "ip", "dumpable", "old_area")
MiB = 1 << 20
# Images besides memory pages (process tree, fds, mounts, sockets...), and room left over on the filesystem.
DUMP_OVERHEAD = 32 * MiB
DISK_MARGIN = 64 * MiB
DUMP_FACTOR = 1.1


@dataclass(frozen=True)
class SourceFacts:
    """What preflight needs to know about the CT and the source host."""

    ctid: str
    private_bytes: int
    memory_bytes: int = 0
    cpu_flags: frozenset[str] = frozenset()
    machine: str = field(default_factory=platform.machine)
    ips: tuple[str, ...] = ()
    online: bool = True
    dump_blockers: tuple[str, ...] = ()  # why CRIU could not dump the CT (online only)
    old_area_in_way: str = ""  # with -r no: what stands where the private area is to be kept (old_area_in_way())


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    error: type[MigrateError]
    skipped: bool = False

    def as_error(self) -> MigrateError:
        return self.error(self.message)


# --- source facts ----------------------------------------------------------------------------------------


def read_cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's flags (x86 `flags`, arm64 `Features`) from /proc/cpuinfo."""
    return frozenset(host_cpu(cpuinfo)["flags"])


def parse_cpu_flags(text: str) -> frozenset[str]:
    return frozenset(parse_cpuinfo(text)["flags"])


def read_cpu_model(cpuinfo: Path = CPUINFO) -> str:
    return str(host_cpu(cpuinfo)["model_name"])


def disk_usage(path: Path) -> int:
    """Bytes a tree occupies on disk (allocated blocks, hard links once, no symlink following): what
    copying it needs, sparse files counted as rsync -S writes them."""
    total, seen = 0, set()
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total + os.lstat(path).st_blocks * 512


def old_area_in_way(private: Path) -> str:
    """With -r no the private area is kept here as PRIVATE.migrated once the CT has moved: whatever stands at
    that name already (an older area kept because something is mounted in it or it is another CT's, a file)
    would make that rename fail only after the commit. Its path, or "" when the name is free."""
    old = private.with_name(private.name + OLD_AREA_SUFFIX)
    return str(old) if os.path.lexists(old) else ""


# --- --nodeps ----------------------------------------------------------------------------------------------


def parse_nodeps(value: str | None) -> frozenset[str]:
    """-f/--nodeps: "" or "all" skips every check, else a comma-separated list of CHECKS names."""
    if value is None:
        return frozenset()
    names = {name.strip() for name in value.split(",") if name.strip()}
    if not names or names == {"all"}:
        return frozenset(CHECKS)
    unknown = sorted(names - set(CHECKS))
    if unknown:
        raise MigrateUsage(f"unknown --nodeps check {', '.join(unknown)}: use {', '.join(CHECKS)} or all")
    return frozenset(names)


# --- the checks --------------------------------------------------------------------------------------------


def check(
    hello: Mapping[str, Any],
    exists: Mapping[str, Any],
    source: SourceFacts,
    *,
    skip: Collection[str] = (),
    host: str | None = None,
) -> list[Problem]:
    """Every problem between this CT and the destination described by `hello` and `exists` (the agent's
    replies); [] means go. Problems of skipped checks come back with skipped=True."""
    where = host or str(hello.get("hostname") or "the destination")
    found = [
        *_version(hello, where),
        *(_criu(hello, where) if source.online else []),
        *_cgroups(hello, where),
        *_ctid(exists, source.ctid, where),
        *_disk_space(hello, source, where),
        *(_cpu(hello, source, where) if source.online else []),
        *_ip(exists, where),
        *_dumpable(source),
        *_old_area(source),
    ]
    return [Problem(p.check, p.message, p.error, skipped=p.check in skip) for p in found]


def blocking(problems: Iterable[Problem]) -> list[Problem]:
    return [problem for problem in problems if not problem.skipped]


def raise_blocking(problems: Iterable[Problem]) -> None:
    """Raise the first problem not skipped (its exit code), listing the others below it."""
    left = blocking(problems)
    if left:
        others = "\n".join(f"  also: {p.message}" for p in left[1:])
        raise left[0].error(left[0].message, detail=others)


def _version(hello: Mapping[str, Any], where: str) -> list[Problem]:
    theirs = parse_version(hello.get("proto"))
    if theirs[0] != PROTOCOL_VERSION[0]:
        message = f"vzpy on {where} speaks migration protocol {theirs[0]}.x, this one {PROTOCOL_VERSION[0]}.x"
        return [Problem("version", f"{message}: install the same vzpy version on both hosts", IncompatibleVersion)]
    return []


def _criu(hello: Mapping[str, Any], where: str) -> list[Problem]:
    criu = hello.get("criu") or {}
    if criu.get("ok"):
        return []
    why = criu.get("error") or "no usable CRIU"
    return [Problem("criu", f"CRIU cannot restore on {where}: {why}", DestinationNotReady)]


def _cgroups(hello: Mapping[str, Any], where: str) -> list[Problem]:
    if "cgroups" not in hello:  # an agent older than protocol 1.1 does not say
        return []
    missing = [name for name in CONTROLLERS if name not in (hello.get("cgroups") or ())]
    if not missing:
        return []
    message = (
        f"{where} has no cgroup v1 hierarchy for {', '.join(missing)}: vzpy there cannot run the CT "
        "(mount the freezer, memory, cpu and pids controllers)"
    )
    return [Problem("cgroups", message, DestinationNotReady)]


def _dumpable(source: SourceFacts) -> list[Problem]:
    return [
        Problem("dumpable", f"CRIU cannot dump CT {source.ctid}: {why}", CheckpointFailed)
        for why in source.dump_blockers
    ]


def dump_blockers(ct: Container) -> list[str]:
    """Why CRIU could not dump the running CT (vzpy.dumpable's findings), found before anything is frozen."""
    from vzpy import dumpable  # reads /proc of the CT's tasks: only the source needs it

    return [blocker.message for blocker in dumpable.settled_blockers(ct)]


def _old_area(source: SourceFacts) -> list[Problem]:
    if not source.old_area_in_way:
        return []
    message = (
        f"CT {source.ctid}'s private area cannot be kept here with -r no: {source.old_area_in_way} exists "
        "already (left by an earlier migration?); remove it, or migrate with -r yes"
    )
    return [Problem("old_area", message, MigrateError)]


def _ctid(exists: Mapping[str, Any], ctid: str, where: str) -> list[Problem]:
    if exists.get("exists"):
        return [Problem("ctid", f"CT {ctid} already exists on {where} ({exists.get('conf')})", CtExistsRemote)]
    if exists.get("locked"):
        return [Problem("ctid", f"CT {ctid} is busy on {where}: {exists.get('locked')}", MigrationLocked)]
    if exists.get("private_exists") and not exists.get("kept"):
        message = f"private area {exists.get('private')} of CT {ctid} already exists on {where}"
        return [Problem("ctid", f"{message}; remove it there or pick another CTID", CtExistsRemote)]
    return []


def dump_estimate(memory_bytes: int) -> int:
    return int(memory_bytes * DUMP_FACTOR) + DUMP_OVERHEAD


def _disk_space(hello: Mapping[str, Any], source: SourceFacts, where: str) -> list[Problem]:
    disk = hello.get("disk") or {}
    private, dump = disk.get("private") or {}, disk.get("dump") or {}
    needs = {"private": source.private_bytes, "dump": dump_estimate(source.memory_bytes) if source.online else 0}
    if private.get("dev") is not None and private.get("dev") == dump.get("dev"):
        filesystems = [(private, needs["private"] + needs["dump"], "private area + dump")]
    else:
        filesystems = [(private, needs["private"], "private area"), (dump, needs["dump"], "dump")]
    return [
        _space_problem(fs, need, what, where)
        for fs, need, what in filesystems
        if need and int(fs.get("free", 0)) < need + DISK_MARGIN
    ]


def _space_problem(fs: Mapping[str, Any], need: int, what: str, where: str) -> Problem:
    message = (
        f"not enough disk space on {where}: {fs.get('path')} has {human_size(int(fs.get('free', 0)))} free, "
        f"the {what} needs {human_size(need + DISK_MARGIN)} (with {human_size(DISK_MARGIN)} to spare); free some space"
    )
    return Problem("disk_space", message, NoDiskSpaceRemote)


def relevant_cpu_flags(flags: Iterable[str], machine: str) -> frozenset[str]:
    """The flags whose absence on the destination breaks restored processes (host.cpu's one policy)."""
    return relevant_flags(flags, machine)


def _cpu(hello: Mapping[str, Any], source: SourceFacts, where: str) -> list[Problem]:
    cpu = hello.get("cpu") or {}
    if arch_mismatch(source.machine, str(cpu.get("machine") or "")):
        message = f"{where} is {cpu['machine']}, this host {source.machine}: a CT cannot move between architectures"
        return [Problem("cpu", message, UnsupportedCpu)]
    missing = missing_flags(source.cpu_flags, source.machine, cpu.get("flags") or ())
    if not missing:
        return []
    message = (
        f"the CPU of {where} lacks {', '.join(missing)}, which this CPU has: processes that use them "
        "would crash after the move (--nodeps=cpu to migrate anyway)"
    )
    return [Problem("cpu", message, UnsupportedCpu)]


def _ip(exists: Mapping[str, Any], where: str) -> list[Problem]:
    used = exists.get("ips_in_use") or {}
    if not used:
        return []
    listed = ", ".join(f"{ip} (CT {ctid})" for ip, ctid in sorted(used.items()))
    return [Problem("ip", f"IP address(es) already in use on {where}: {listed}", IpInUseRemote)]


FORK_SAMPLE_SECONDS = 1.0
FORK_SAMPLE_INTERVAL = 0.005


def fork_rate(ct: Container, seconds: float = FORK_SAMPLE_SECONDS) -> float:
    """New processes per second in the CT, sampled from its cgroup for `seconds`: a lower bound, since a child
    that lives and dies between two reads is not seen (the kernel's own counts are not per cgroup in v1)."""
    known = set(ct.cgroups.pids())
    started = time.monotonic()
    new = 0
    while (elapsed := time.monotonic() - started) < seconds:
        current = set(ct.cgroups.pids())
        new += len(current - known)
        known |= current
        time.sleep(FORK_SAMPLE_INTERVAL)
    return new / max(elapsed, 1e-3)
