"""The CT's cgroups (v1 hierarchies as on this host): freezer, memory, cpu, pids.

Each CT gets /sys/fs/cgroup/<controller>/<parent>/<CTID>; the parent comes from vz.conf's
CGROUP_PARENT so several vzpy roots on one machine (test hosts) do not collide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vzpy.errors import VzError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("freezer", "memory", "cpu", "pids")
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
                    "vzpy needs the freezer, memory, cpu and pids hierarchies"
                )
            self.path(controller).mkdir(parents=True, exist_ok=True)

    def apply(self, limits: Limits) -> None:
        if limits.memory_bytes is not None:
            self._write("memory", "memory.limit_in_bytes", str(limits.memory_bytes))
        if limits.cpus is not None:
            self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
            quota = -1 if limits.cpus <= 0 else int(limits.cpus * CPU_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", str(quota))
        if limits.pids_max is not None:
            self._write("pids", "pids.max", "max" if limits.pids_max <= 0 else str(limits.pids_max))

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
            if path.is_dir():
                try:
                    path.rmdir()
                except OSError as e:
                    raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}") from e

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
