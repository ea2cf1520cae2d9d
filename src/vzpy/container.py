"""The CT model: its IDs and paths, its CTID.conf, and its persisted run state (stage, init pid)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from vzpy import areas, fileio
from vzpy.config import ConfFile, GlobalConfig, default_hostname, expand_veid, parse_size, validate_ctid
from vzpy.errors import BadConfig, ConfigNotFound
from vzpy.runtime.cgroups import CgroupSet, Limits
from vzpy.runtime.network import host_ifname
from vzpy.stage import Facts, Stage, settled


@dataclass
class RunState:
    """What vzpy knows about a live CT; persisted as JSON under LOCKDIR between invocations."""

    stage: Stage = Stage.STOPPED
    init_pid: int = 0
    init_started: float = 0.0  # psutil create_time, so a reused pid is not mistaken for the init
    # the same, as /proc/PID/stat's starttime (clock ticks since boot): create_time adds /proc/stat's btime,
    # which moves by a second now and then as the clock is adjusted (NTP), and would make a live init look dead
    init_start_ticks: int = 0
    veth: str = ""
    ips: list[str] = field(default_factory=list)
    dumpfile: str = ""
    # the stage action under way (stage.enter persisted `stage` as its target and this mark; its commit
    # clears it): lets the next vzpy see the real stage when one was killed half-way
    pending: str = ""
    pending_from: str = ""
    # files CRIU linked into the CT's tree for its dump (`link_remap`): kept for a restore, removed on resume
    link_remaps: list[str] = field(default_factory=list)
    # when the CT was frozen (suspend or undump): resume reports how long it stood still
    frozen_since: float = 0.0
    updated: float = 0.0

    def init_alive(self) -> bool:
        if not self.init_pid:
            return False
        try:
            fields = _stat_fields(self.init_pid)
            if self.init_start_ticks:
                same = int(fields[STARTTIME]) == self.init_start_ticks
            else:  # a state written before init_start_ticks existed
                same = _created_at(self.init_pid, self.init_started)
            return same and fields[STATE] != "Z"
        except (OSError, ValueError, IndexError):
            return False


def _created_at(pid: int, create_time: float) -> bool:
    """Whether `pid` has psutil's `create_time` (how states of older vzpy versions identify their init)."""
    import psutil  # only here: its import would add ~50 ms to every status and list

    try:
        return psutil.Process(pid).create_time() == create_time
    except psutil.Error:
        return False


# /proc/PID/stat fields as _stat_fields returns them: proc(5)'s field 3 (state) and field 22 (starttime)
STATE, STARTTIME = 0, 19


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on: after the last ")", as the command name before it is the process's own
    (a CT's: anything)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks since boot (never changes, unlike a wall-clock create time)."""
    return int(_stat_fields(pid)[STARTTIME])


class Container:
    def __init__(self, ctid: str, gconf: GlobalConfig) -> None:
        self.ctid = validate_ctid(ctid)
        self.gconf = gconf
        self._areas_checked = False

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
        return self.conf.checked("HOSTNAME") or default_hostname(self.ctid)

    @property
    def ips(self) -> list[str]:
        return (self.conf.get("IP_ADDRESS") or "").split()

    @property
    def limits(self) -> Limits:
        """The limits CTID.conf sets (the limit of vzctl's barrier:limit pairs); BadConfig at file:line if bad."""
        physpages = self.conf.checked("PHYSPAGES")
        numproc = self.conf.checked("NUMPROC")
        cpus = self.conf.checked("CPUS")
        return Limits(
            memory_bytes=parse_size(physpages.split(":")[-1]) if physpages else None,
            cpus=float(cpus) if cpus else None,
            pids_max=int(numproc.split(":")[-1]) if numproc else None,
        )

    def check_areas(self) -> None:
        """BadConfig (with file:line) unless VE_PRIVATE and VE_ROOT are directories of this CT's own.

        Mount, unmount and the commands each guard with it; the other CTs' configs are read once per command."""
        if not self._areas_checked:
            areas.check_ct(self.conf if self.exists() else None, self.ctid, self.gconf)
            self._areas_checked = True

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
        # durable: a stage is persisted before its side effects, so it must survive a host crash too
        fileio.write_atomic(self.state_path, json.dumps(asdict(state), indent=1), mode=0o600)

    def clear_state(self) -> None:
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            return
        fileio.fsync_dir(self.state_path.parent)

    def facts(self, state: RunState) -> Facts:
        """What the host shows of the CT beside `state` (for vzpy.stage.settled)."""
        cgroups = self.cgroups
        alive = state.init_alive()
        return Facts(
            init_alive=alive,
            has_tasks=alive or bool(cgroups.pids()),
            frozen=alive and cgroups.freezer_state() != "THAWED",
        )

    def stage(self) -> Stage:
        """The real stage (vzpy.stage.settled): the persisted one, checked against the processes and freezer.

        Stages are entered through vzpy.stage.enter, so a vzpy killed half-way leaves a stage from which
        the matching recovery (`chkpnt --resume`, `restore --kill`) is allowed.
        """
        state = self.load_state()
        return settled(state, self.facts(state))

    def nproc(self) -> int:
        return len(self.cgroups.pids())
