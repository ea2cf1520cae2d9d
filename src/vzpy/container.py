"""The CT model: its IDs and paths, its CTID.conf, and its persisted run state (stage, init pid)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import psutil

from vzpy.config import ConfFile, GlobalConfig, validate_ctid
from vzpy.errors import ConfigNotFound, InvalidValue
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
    if not number.isdigit():
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
        return Path(self.conf.get("VE_PRIVATE") or self.gconf.ve_private(self.ctid))

    @property
    def root(self) -> Path:
        return Path(self.conf.get("VE_ROOT") or self.gconf.ve_root(self.ctid))

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
        except FileNotFoundError:
            return RunState()
        data["stage"] = Stage(data["stage"])
        return RunState(**data)

    def save_state(self, state: RunState) -> None:
        state.updated = time.time()
        self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(state), indent=1))
        os.replace(tmp, self.state_path)

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def stage(self) -> Stage:
        """The real stage: the persisted one, checked against the processes and the freezer."""
        state = self.load_state()
        if state.stage is Stage.STOPPED or not state.init_alive():
            return Stage.STOPPED
        frozen = self.cgroups.freezer_state() != "THAWED"
        if not frozen:
            return Stage.RUNNING
        if state.stage in (Stage.DUMPED, Stage.UNDUMPED):
            return state.stage
        return Stage.SUSPENDED

    def nproc(self) -> int:
        return len(self.cgroups.pids())
