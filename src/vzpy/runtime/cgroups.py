"""The CT's cgroups (v1 hierarchies as on this host): freezer, memory, cpu, pids, devices.

Each CT gets /sys/fs/cgroup/<controller>/<parent>/<CTID>; the parent comes from vz.conf's
CGROUP_PARENT so several vzpy roots on one machine (test hosts) do not collide.
"""

from __future__ import annotations

import errno
import os
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


class CgroupError(VzError):
    exit_code = 3


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpus: float | None = None
    pids_max: int | None = None


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
        if limits.memory_bytes is not None:
            self._write_memory_limit(limits.memory_bytes)
        if limits.cpus is not None:
            self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = -1 if limits.cpus <= 0 else int(limits.cpus * CPU_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", str(quota))
        if limits.pids_max is not None:
            self._write("pids", "pids.max", "max" if limits.pids_max <= 0 else str(limits.pids_max))

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
