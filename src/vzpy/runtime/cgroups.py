"""The CT's cgroups (v1 hierarchies as on this host): freezer, memory, cpu, pids, devices.

Each CT gets /sys/fs/cgroup/<controller>/<parent>/<CTID>; the parent comes from vz.conf's
CGROUP_PARENT so several vzpy roots on one machine (test hosts) do not collide.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vzpy.errors import InvalidValue, VzError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("freezer", "memory", "cpu", "pids", "devices")
# What a CT may create (mknod) and open, as vzctl and LXC allow: memory devices, terminals, ptys. Nothing
# else, above all no block device: a CT's root could otherwise read and write the host's disks.
ALLOWED_DEVICES = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:1 rwm",  # console
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts
)
CPU_PERIOD_US = 100_000
MAX_LIMIT = 2**63 - 1


class CgroupError(VzError):
    exit_code = 3


def ct_hierarchies(proc_cgroup: str | None = None) -> list[str]:
    """The v1 hierarchies that hold a CT cgroup, named as /proc/PID/cgroup names them ("cpu,cpuacct" where
    co-mounted), from this host's own /proc/self/cgroup. A CT sits in the root cgroup of every other
    hierarchy: CRIU must not dump those, or it records the host's whole tree there and a restore recreates
    every directory of it that is gone by then. Empty (dump all) where no v1 hierarchy has them (cgroup v2)."""
    text = Path("/proc/self/cgroup").read_text() if proc_cgroup is None else proc_cgroup
    names = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and set(parts[1].split(",")) & set(CONTROLLERS):
            names.append(parts[1])
    return names


UNLIMITED = -1
# the memory cgroup reports "no limit" as PAGE_COUNTER_MAX pages, a little under 2**63
_UNLIMITED_READ = 1 << 62


@dataclass(frozen=True)
class Limits:
    """What a CT's cgroups enforce. None: leave as it is (unset in the config, or not asked to change);
    UNLIMITED (-1) for the byte limits and 0 for cpu_percent: no limit."""

    memory_bytes: int | None = None  # PHYSPAGES' limit: memory.limit_in_bytes
    swap_bytes: int | None = None  # SWAPPAGES' limit: memory.memsw.limit_in_bytes = memory + swap
    cpu_percent: float | None = None  # min(CPULIMIT, CPUS x 100) in % of one CPU: cpu.cfs_quota_us
    cpu_shares: int | None = None  # CPUUNITS: cpu.shares (the kernel keeps it within 2..262144)
    pids_max: int | None = None  # NUMPROC's limit, 0 for none: pids.max


_memsw_warned = False


def _warn_no_memsw() -> None:
    global _memsw_warned
    if not _memsw_warned:
        _memsw_warned = True
        sys.stderr.write(
            "vzpy: warning: SWAPPAGES is not enforced: this kernel's memory cgroup has no memory.memsw files "
            "(boot it with swapaccount=1)\n"
        )


@dataclass(frozen=True)
class CgroupSet:
    parent: str
    ctid: str

    def path(self, controller: str) -> Path:
        return CGROUP_ROOT / controller / self.parent / self.ctid

    def exists(self) -> bool:
        return self.path("freezer").is_dir()

    def create(self) -> None:
        for controller in CONTROLLERS:
            base = CGROUP_ROOT / controller
            if not (base / "cgroup.procs").exists():
                raise CgroupError(
                    f"cgroup v1 controller {controller!r} is not mounted at {base}; "
                    "vzpy needs the freezer, memory, cpu, pids and devices hierarchies"
                )
            self.path(controller).mkdir(parents=True, exist_ok=True)
        self.restrict_devices()

    def restrict_devices(self) -> None:
        """Deny every device, then allow ALLOWED_DEVICES; before any task of the CT runs (start and restore)."""
        self._write("devices", "devices.deny", "a")
        for rule in ALLOWED_DEVICES:
            self._write("devices", "devices.allow", rule)

    def device_rules(self) -> list[str]:
        return self.read("devices", "devices.list").splitlines()

    def apply(self, limits: Limits) -> None:
        """Write the limits that are not None; the others stay as they are."""
        if limits.memory_bytes is not None or limits.swap_bytes is not None:
            self._apply_memory(limits.memory_bytes, limits.swap_bytes)
        if limits.cpu_percent is not None:
            self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = -1 if limits.cpu_percent <= 0 else max(1000, int(limits.cpu_percent * CPU_PERIOD_US / 100))
            self._write("cpu", "cpu.cfs_quota_us", str(quota))
        if limits.cpu_shares is not None:
            self._write("cpu", "cpu.shares", str(limits.cpu_shares))
        if limits.pids_max is not None:
            self._write("pids", "pids.max", "max" if limits.pids_max <= 0 else str(limits.pids_max))

    def memory_limits(self) -> tuple[int, int | None]:
        """(memory limit, memory+swap limit or None without memsw), UNLIMITED for none."""
        memory = int(self.read("memory", "memory.limit_in_bytes"))
        memsw_file = self.path("memory") / "memory.memsw.limit_in_bytes"
        memsw = int(memsw_file.read_text()) if memsw_file.exists() else None
        return (
            UNLIMITED if memory >= _UNLIMITED_READ else memory,
            None if memsw is None else UNLIMITED if memsw >= _UNLIMITED_READ else memsw,
        )

    def _apply_memory(self, memory: int | None, swap: int | None) -> None:
        """memory.limit_in_bytes and memsw = memory + swap (vzctl's vswap). A None part keeps its current
        value: a new memory limit keeps the swap allowance the CT has, a new swap keeps the memory limit."""
        current_memory, current_memsw = self.memory_limits()
        memory = current_memory if memory is None else memory
        if current_memsw is None:
            if swap is not None:
                _warn_no_memsw()
            self._write_memory_limit(memory)
            return
        if swap is None:
            unlimited = UNLIMITED in (current_memory, current_memsw)
            swap = UNLIMITED if unlimited else current_memsw - current_memory
        memsw = UNLIMITED if UNLIMITED in (memory, swap) else min(memory + swap, MAX_LIMIT)
        # v1 wants memsw >= memory at every moment: raise memsw before memory, lower it after
        if memsw == UNLIMITED or (current_memsw != UNLIMITED and memsw >= current_memsw):
            self._write("memory", "memory.memsw.limit_in_bytes", str(memsw))
            self._write_memory_limit(memory)
        else:
            self._write_memory_limit(memory)
            self._write("memory", "memory.memsw.limit_in_bytes", str(memsw))

    def _write_memory_limit(self, limit: int) -> None:
        try:
            (self.path("memory") / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(f"cannot set CT {self.ctid}'s memory limit to {limit} bytes: {e.strerror}") from e
            used = self.read("memory", "memory.usage_in_bytes")
            raise InvalidValue(
                f"memory limit {limit} bytes is below the {used} bytes CT {self.ctid} uses now; give a larger --memory"
            ) from e

    def add(self, pid: int) -> None:
        for controller in CONTROLLERS:
            self._write(controller, "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            text = (self.path("freezer") / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split()]

    def read(self, controller: str, name: str) -> str:
        return (self.path(controller) / name).read_text().strip()

    def freezer_state(self) -> str:
        """THAWED, FREEZING or FROZEN; THAWED when the cgroup does not exist."""
        try:
            return self.read("freezer", "freezer.state")
        except FileNotFoundError:
            return "THAWED"

    def freeze(self, timeout: float = 10.0) -> None:
        self._write("freezer", "freezer.state", "FROZEN")
        self._wait_state("FROZEN", timeout)

    def thaw(self, timeout: float = 10.0) -> None:
        self._write("freezer", "freezer.state", "THAWED")
        self._wait_state("THAWED", timeout)

    def remove(self) -> None:
        """Remove the CT's cgroups; they must be empty (the CT stopped)."""
        for controller in CONTROLLERS:
            path = self.path(controller)
            if not path.is_dir():
                continue
            # child cgroups first: a restore recreates those the dumped tasks were in (CRIU's cgroup images)
            children = [Path(top) for top, _dirs, _files in os.walk(path, topdown=False) if Path(top) != path]
            for cgroup in [*children, path]:
                try:
                    cgroup.rmdir()
                except OSError as e:
                    raise CgroupError(f"cannot remove cgroup {cgroup}: {e.strerror}") from e

    def _wait_state(self, wanted: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.freezer_state()) != wanted:
            if time.monotonic() > deadline:
                raise CgroupError(f"freezer of CT {self.ctid} stuck in {state}, wanted {wanted}")
            time.sleep(0.005)

    def _write(self, controller: str, name: str, value: str) -> None:
        target = self.path(controller) / name
        try:
            target.write_text(value)
        except OSError as e:
            raise CgroupError(f"cannot write {value!r} to {target}: {e.strerror}") from e
