"""The CT model: its IDs and paths, its CTID.conf, and its persisted run state (stage, init pid)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from vzpy import areas, fileio, units
from vzpy.config import (
    ConfFile,
    GlobalConfig,
    cpulimit_percent,
    default_hostname,
    expand_veid,
    numproc_limit,
    parse_yesno,
    validate_ctid,
)
from vzpy.errors import BadConfig, ConfigNotFound
from vzpy.runtime import resolver
from vzpy.runtime.cgroups import UNLIMITED, CgroupSet, Limits
from vzpy.runtime.network import host_ifname
from vzpy.runtime.quota import DiskLimits
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


# /proc reads that give what psutil would, for the chkpnt and restore paths: psutil's import costs ~10 ms.


def create_time(pid: int) -> float:
    """psutil's Process(pid).create_time(), computed as psutil 7 does: start ticks over the clock rate, plus
    the boot time (/proc/stat's btime). OSError when the process is gone."""
    ticks = start_ticks(pid)
    with open("/proc/stat", "rb") as f:
        btime = next((float(line.split()[1]) for line in f if line.startswith(b"btime")), None)
    if btime is None:
        raise OSError(f"no btime in /proc/stat for pid {pid}'s create time")
    return ticks / os.sysconf("SC_CLK_TCK") + btime


def process_name(pid: int) -> str:
    """psutil's Process(pid).name(): the kernel's (15-character) name, or the basename of argv[0] when it is
    that name cut short. Only shown, never trusted: a CT's process sets both. OSError when it is gone."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="surrogateescape")
    if len(name) < 15:
        return name
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="surrogateescape")
    except OSError:
        return name
    extended = os.path.basename(argv0)
    return extended if argv0 and extended.startswith(name) else name


LIMIT_KEYS = ("PHYSPAGES", "SWAPPAGES", "CPULIMIT", "CPUS", "CPUUNITS", "NUMPROC")


def limits_of(setting: Callable[[str], str | None], keys: Iterable[str] = LIMIT_KEYS) -> Limits:
    """The cgroup limits of `keys` as `setting` gives them; a key not in `keys` stays None (left as it is)."""
    value = {key: setting(key) if key in keys else None for key in LIMIT_KEYS}
    memory, swap = value["PHYSPAGES"], value["SWAPPAGES"]
    cpu_percents = [cpulimit_percent(value["CPULIMIT"])] if value["CPULIMIT"] else []
    if value["CPUS"]:
        cpu_percents.append(float(value["CPUS"]) * 100)
    limited = [percent for percent in cpu_percents if percent > 0]  # 0 is "no limit" in both
    numproc = value["NUMPROC"]
    return Limits(
        memory_bytes=_bytes_or_unlimited(memory) if memory else None,
        swap_bytes=_bytes_or_unlimited(swap) if swap else None,
        cpu_percent=min(limited) if limited else 0.0 if cpu_percents else None,
        cpu_shares=int(value["CPUUNITS"]) if value["CPUUNITS"] else None,
        pids_max=numproc_limit(numproc) if numproc else None,
    )


def _bytes_or_unlimited(pages: str) -> int:
    limit = units.pair_limit_bytes(pages, units.PAGES)
    return UNLIMITED if limit is None else limit


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

    def setting(self, key: str) -> str | None:
        """A key as vzctl merges them: CTID.conf's value, else vz.conf's (CT defaults live there too); None
        when unset or empty. BadConfig naming file:line when the value is bad (VALUE_CHECKS)."""
        return self.conf.checked(key) or self.gconf.checked(key)

    @property
    def limits(self) -> Limits:
        """The limits the config sets: the limit of vzctl's barrier:limit pairs; BadConfig at file:line if bad."""
        return limits_of(self.setting)

    @property
    def onboot(self) -> bool:
        """ONBOOT=yes: started by the boot service (vzctl's default: no)."""
        return parse_yesno(self.setting("ONBOOT") or "no")

    @property
    def disabled(self) -> bool:
        """DISABLED=yes: `start` is refused (VZ_VE_START_DISABLED)."""
        return parse_yesno(self.setting("DISABLED") or "no")

    @property
    def stop_timeout(self) -> int | None:
        """STOP_TIMEOUT in seconds, None when unset (vzctl then waits 120 s)."""
        value = self.setting("STOP_TIMEOUT")
        return int(value) if value else None

    @property
    def nameservers(self) -> list[str] | None:
        """NAMESERVER's addresses (`inherit`: the host's), None when unset: the CT's resolv.conf is left alone."""
        value = self.setting("NAMESERVER")
        return None if value is None else resolver.host_nameservers() if value == "inherit" else value.split()

    @property
    def searchdomains(self) -> list[str] | None:
        """SEARCHDOMAIN's domains (`inherit`: the host's), None when unset."""
        value = self.setting("SEARCHDOMAIN")
        return None if value is None else resolver.host_searchdomains() if value == "inherit" else value.split()

    @property
    def disk_limits(self) -> DiskLimits:
        """DISKSPACE (1K blocks) and DISKINODES: the hard limits (the pairs' second value), None when unset."""
        space, inodes = self.setting("DISKSPACE"), self.setting("DISKINODES")
        soft_space, hard_space = units.parse_pair(space, units.KBLOCKS) if space else (None, None)
        soft_inodes, hard_inodes = units.parse_pair(inodes, units.COUNT) if inodes else (None, None)
        return DiskLimits(
            configured=bool(space or inodes),
            soft_bytes=None if soft_space is None else soft_space * 1024,
            hard_bytes=None if hard_space is None else hard_space * 1024,
            soft_inodes=soft_inodes,
            hard_inodes=hard_inodes,
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
