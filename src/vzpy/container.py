"""The CT model: its IDs and paths, its CTID.conf, and its persisted run state (stage, init pid)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import psutil

from vzpy.config import ConfFile, GlobalConfig, expand_veid, validate_ctid
from vzpy.errors import BadConfig, ConfigNotFound, InvalidValue
from vzpy.runtime.cgroups import CgroupSet, Limits
from vzpy.runtime.network import host_ifname
from vzpy.stage import Stage

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": PAGE_SIZE}


def parse_size(value: str, *, what: str = "size") -> int:
    """vzctl sizes: a number of bytes with K/M/G/T, or pages with P (PHYSPAGES="0:256M")."""
    text = value.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(unit)]
    if not (number.isascii() and number.isdigit()):
        raise InvalidValue(f"invalid {what} {value!r}: use e.g. 512M or 2G")
    return int(number) * _SUFFIXES[unit]


@dataclass
class RunState:
    """What vzpy knows about a live CT; persisted as JSON under LOCKDIR between invocations."""

    stage: Stage = Stage.STOPPED
    init_pid: int = 0
    init_started: float = 0.0  # psutil create_time, so a reused pid is not mistaken for the init
    veth: str = ""
    ips: list[str] = field(default_factory=list)
    dumpfile: str = ""
    # an operation that was started and not finished ("undump"): lets the next vzpy see the real stage
    pending: str = ""
    # when the CT was frozen (suspend or undump): resume reports how long it stood still
    frozen_since: float = 0.0
    updated: float = 0.0

    def init_alive(self) -> bool:
        if not self.init_pid:
            return False
        try:
            process = psutil.Process(self.init_pid)
            return process.create_time() == self.init_started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class Container:
    def __init__(self, ctid: str, gconf: GlobalConfig) -> None:
        self.ctid = validate_ctid(ctid)
        self.gconf = gconf

    # --- where things are
    @property
    def conf_path(self) -> Path:
        return self.gconf.ct_conf_path(self.ctid)

    @property
    def private(self) -> Path:
        return self._path("VE_PRIVATE")

    @property
    def root(self) -> Path:
        return self._path("VE_ROOT")

    def _path(self, key: str) -> Path:
        """A path from CTID.conf ($VEID expanded, as vzctl writes them) or else from vz.conf."""
        value = self.conf.get(key)
        return expand_veid(key, value, self.ctid) if value else self.gconf.expand(key, self.ctid)

    @property
    def state_path(self) -> Path:
        return self.gconf.lockdir / f"{self.ctid}.state.json"

    @property
    def default_dumpfile(self) -> Path:
        return self.gconf.dumpdir / f"Dump.{self.ctid}"

    @property
    def cgroups(self) -> CgroupSet:
        return CgroupSet(self.gconf.values["CGROUP_PARENT"], self.ctid)

    @property
    def veth(self) -> str:
        return host_ifname(self.gconf.values["VETH_PREFIX"], self.ctid)

    # --- configuration
    def exists(self) -> bool:
        return self.conf_path.exists()

    @cached_property
    def conf(self) -> ConfFile:
        if not self.conf_path.exists():
            raise ConfigNotFound(
                f"CT {self.ctid} does not exist: {self.conf_path} not found; "
                f"create it with `vzpy create {self.ctid} --ostemplate minimal`"
            )
        return ConfFile.load(self.conf_path)

    @property
    def hostname(self) -> str:
        return self.conf.get("HOSTNAME") or f"ct{self.ctid}"

    @property
    def ips(self) -> list[str]:
        return (self.conf.get("IP_ADDRESS") or "").split()

    @property
    def limits(self) -> Limits:
        physpages = self.conf.get("PHYSPAGES")
        numproc = self.conf.get("NUMPROC")
        cpus = self.conf.get("CPUS")
        return Limits(
            memory_bytes=parse_size(physpages.split(":")[-1], what="PHYSPAGES") if physpages else None,
            cpus=float(cpus) if cpus else None,
            pids_max=int(numproc.split(":")[-1]) if numproc else None,
        )

    # --- run state
    def load_state(self) -> RunState:
        try:
            data = json.loads(self.state_path.read_text())
            data["stage"] = Stage(data["stage"])
            return RunState(**data)
        except FileNotFoundError:
            return RunState()
        except (ValueError, TypeError, KeyError) as e:
            raise BadConfig(
                f"state file {self.state_path} of CT {self.ctid} is unreadable ({e}); "
                "if the CT is not running, remove the file"
            ) from e

    def save_state(self, state: RunState) -> None:
        state.updated = time.time()
        self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(state), indent=1))
        os.replace(tmp, self.state_path)

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def stage(self) -> Stage:
        """The real stage: the persisted one, checked against the processes and the freezer.

        Stages are persisted before their side effects, so a vzpy killed half-way leaves a stage from
        which the matching recovery (`chkpnt --resume`, `restore --kill`) is allowed.
        """
        state = self.load_state()
        if state.pending == "undump":
            return Stage.UNDUMPED if self.cgroups.pids() else Stage.STOPPED
        if state.stage is Stage.STOPPED or not state.init_alive():
            return Stage.STOPPED
        if state.stage is Stage.RUNNING:
            return Stage.SUSPENDED if self.cgroups.freezer_state() != "THAWED" else Stage.RUNNING
        return state.stage

    def nproc(self) -> int:
        return len(self.cgroups.pids())
