"""`vzpy list` and `vzlist`: vzlist(8)'s options, field names, table, sorting and JSON, over vzpy's CTs.

Fields are vzlist's (`-L` lists them). Those read from CTID.conf show what it says (as vzlist does for a
stopped CT); usage fields (held, maxheld, failcnt; uptime) show what the host measures for a live CT: the
CT's processes (numproc), its memory cgroup (physpages, swappages) and its init's age (uptime). What vzpy
cannot know (OpenVZ's other beancounters' usage, load average, disk usage) is "-" in the table and null in
JSON. A CT whose CTID.conf cannot be read is listed with a warning (its status still comes from its processes).

`vzpy list` takes the same options as `vzlist` but `-h PATTERN` (vzpy's -h is help; use --hostname PATTERN);
`vzpy list --json` is `vzlist -j`. Errors exit 1, as vzlist's do.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from vzpy.cli import display
from vzpy.cli.app import App, ctid_order
from vzpy.config import CTID_RE, default_hostname
from vzpy.container import Container, RunState
from vzpy.errors import VzError
from vzpy.runtime.cgroups import CgroupSet
from vzpy.stage import Stage, settled

STATUS_ORDER = ("running", "stopped", "mounted", "suspended")  # vzlist's status sort order
DEFAULT_FIELDS = "ctid,numproc,status,ip,hostname"
NAME_FIELDS = "smart_name,numproc,status,ip,hostname"  # -n
LONG_MAX = 2**63 - 1  # how vzctl shows `unlimited`
UBC_SUFFIXES = ("", ".m", ".b", ".l", ".f")  # held, maxheld, barrier, limit, failcnt
UBC_KEYS = ("held", "maxheld", "barrier", "limit", "failcnt")
QUOTA_SUFFIXES = ("", ".s", ".h")  # usage, soft limit, hard limit
QUOTA_KEYS = ("usage", "softlimit", "hardlimit")
NOT_FOUND = "Container(s) not found"

Value = Any  # a field's value as JSON has it: None, bool, int, float, str, list or dict


class ListingError(VzError):
    """A vzlist error: bad field, sort field or CTID, or none of the CTs asked for exists."""

    exit_code = 1  # vzlist exits 1 on every error


# --- what vzpy knows of one CT


@dataclass
class Usage:
    """What the host measures of a live CT; None where it cannot tell."""

    numproc: int | None = None
    numproc_failcnt: int | None = None
    memory: tuple[int | None, int | None, int | None] = (None, None, None)  # pages: held, maxheld, failcnt
    swap: int | None = None  # pages held
    uptime: float | None = None  # seconds


@dataclass
class CtInfo:
    """One CT as vzlist shows it. `conf` is empty when CTID.conf could not be read (`broken`)."""

    ctid: str
    status: str
    conf: dict[str, str] = field(default_factory=dict)
    private: str | None = None
    root: str | None = None
    ips: list[str] = field(default_factory=list)
    hostname: str | None = None
    usage: Usage = field(default_factory=Usage)
    broken: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"

    def get(self, key: str) -> str | None:
        return self.conf.get(key) or None


# --- fields: vzlist's names, headers, column formats and JSON types


@dataclass(frozen=True)
class Field:
    name: str
    header: str
    header_format: str  # a str.format spec: ">10" right-aligned in 10, "<32" left-aligned in 32
    value_format: str
    value: Callable[[CtInfo], Value]  # the JSON value
    index: int = 0  # which part of a beancounter/quota value (vzlist's .m .b .l .f / .s .h suffixes)
    trim: bool = False  # cut to the column's width unless last (or -t)
    sortable: bool = True

    def cell(self, ct: CtInfo) -> Value:
        """The value this column shows (a part of a beancounter or quota object)."""
        value = self.value(ct)
        resource = self.name.split(".")[0]
        if not isinstance(value, dict) or resource not in (*UBC_HEADERS, "diskspace", "diskinodes"):
            return value
        if resource in UBC_HEADERS and self.index in (0, 1, 4) and not ct.running:
            return None  # vzlist's table: held, maxheld and failcnt of a CT that does not run are "-" (0 in JSON)
        return list(value.values())[self.index]


def _ctid_value(ct: CtInfo) -> Value:
    return int(ct.ctid) if ct.ctid.isdigit() else ct.ctid


def _conf_str(key: str) -> Callable[[CtInfo], Value]:
    return lambda ct: ct.get(key)


def _conf_list(key: str) -> Callable[[CtInfo], Value]:
    return lambda ct: (ct.get(key) or "").split()


def _conf_int(key: str, *, unset: int | None = None) -> Callable[[CtInfo], Value]:
    return lambda ct: _number(ct.get(key), unset)


def _number(text: str | None, unset: int | None = None) -> int | float | None:
    """A config number as vzlist shows it (CPULIMIT's "%" dropped); `unset` if absent or not a number."""
    if text is None:
        return unset
    try:
        value = float(text.removesuffix("%"))
    except ValueError:
        return unset
    if not math.isfinite(value):
        return unset
    return int(value) if value.is_integer() else value


def _yes_no(key: str) -> Callable[[CtInfo], Value]:
    def value(ct: CtInfo) -> Value:
        word = (ct.get(key) or "").lower()
        return True if word == "yes" else False if word == "no" else None

    return value


def _switches(key: str) -> Callable[[CtInfo], Value]:
    """FEATURES/CAPABILITY's "name:on name:off" as vzlist's JSON object of booleans (null if none)."""

    def value(ct: CtInfo) -> Value:
        pairs = [item.partition(":") for item in (ct.get(key) or "").split()]
        return {name.lower(): state == "on" for name, _, state in pairs if name} or None

    return value


def _smart_name(ct: CtInfo) -> Value:
    return ct.get("NAME") or _ctid_value(ct)


def _vswap(ct: CtInfo) -> Value:
    physpages = _ubc_pair(ct, "PHYSPAGES", "pages")
    return physpages is not None and physpages[1] not in (None, LONG_MAX)


def _uptime(ct: CtInfo) -> Value:
    return round(ct.usage.uptime, 3) if ct.usage.uptime is not None else 0.0


UNITS = {  # each beancounter's unit in CTID.conf
    "kmemsize": "bytes",
    "tcpsndbuf": "bytes",
    "tcprcvbuf": "bytes",
    "othersockbuf": "bytes",
    "dgramrcvbuf": "bytes",
    "dcachesize": "bytes",
    "lockedpages": "pages",
    "privvmpages": "pages",
    "shmpages": "pages",
    "physpages": "pages",
    "vmguarpages": "pages",
    "oomguarpages": "pages",
    "swappages": "pages",
}
UBC_HEADERS = {
    "kmemsize": "KMEMSIZE",
    "lockedpages": "LOCKEDP",
    "privvmpages": "PRIVVMP",
    "shmpages": "SHMP",
    "numproc": "NPROC",
    "physpages": "PHYSP",
    "vmguarpages": "VMGUARP",
    "oomguarpages": "OOMGUARP",
    "numtcpsock": "NTCPSOCK",
    "numflock": "NFLOCK",
    "numpty": "NPTY",
    "numsiginfo": "NSIGINFO",
    "tcpsndbuf": "TCPSNDB",
    "tcprcvbuf": "TCPRCVB",
    "othersockbuf": "OTHSOCKB",
    "dgramrcvbuf": "DGRAMRB",
    "numothersock": "NOTHSOCK",
    "dcachesize": "DCACHESZ",
    "numfile": "NFILE",
    "numiptent": "NIPTENT",
    "swappages": "SWAPP",
}


def _ubc_pair(ct: CtInfo, key: str, unit: str) -> tuple[int | None, int | None] | None:
    """CTID.conf's barrier:limit for `key` (LONG_MAX for unlimited or unset: vzpy limits nothing it is not
    told to); None if the file could not be read or the value is not a number."""
    if ct.broken:
        return None
    text = ct.get(key)
    if text is None:
        return LONG_MAX, LONG_MAX
    from vzpy import units

    scale = {"bytes": units.Unit("bytes", 1), "pages": units.PAGES}.get(unit, units.COUNT)
    try:
        barrier, limit = units.parse_pair(text, scale)
    except ValueError:
        return None
    return (LONG_MAX if barrier is None else barrier), (LONG_MAX if limit is None else limit)


def _held(ct: CtInfo, name: str) -> tuple[int | None, int | None, int | None]:
    """held, maxheld, failcnt: 0 for a CT that does not run (as vzlist shows), None where vzpy cannot tell."""
    if not ct.running:
        return 0, 0, 0
    usage = ct.usage
    if name == "numproc":
        return usage.numproc, None, usage.numproc_failcnt
    if name == "physpages":
        return usage.memory
    if name == "swappages":
        return usage.swap, None, None
    return None, None, None


def _ubc(name: str) -> Callable[[CtInfo], Value]:
    def value(ct: CtInfo) -> Value:
        pair = _ubc_pair(ct, name.upper(), UNITS.get(name, "count"))
        if pair is None:
            return None
        held, maxheld, failcnt = _held(ct, name)
        return dict(zip(UBC_KEYS, (held, maxheld, pair[0], pair[1], failcnt), strict=True))

    return value


def _quota(key: str) -> Callable[[CtInfo], Value]:
    """DISKSPACE/DISKINODES soft and hard limits from CTID.conf; the usage vzpy does not measure (null)."""

    def value(ct: CtInfo) -> Value:
        text = ct.get(key)
        if text is None:
            return None
        from vzpy import units

        try:
            soft, hard = units.parse_pair(text, units.KBLOCKS if key == "DISKSPACE" else units.COUNT)
        except ValueError:
            return None
        limits = [LONG_MAX if n is None else n for n in (soft, hard)]
        return dict(zip(QUOTA_KEYS, (None, *limits), strict=True))

    return value


def _fields() -> list[Field]:
    def text(name: str, header: str, width: int, key: str | None = None, align: str = "<") -> Field:
        getter = _conf_str(key) if key else getattr_value(name)
        return Field(name, header, f"{align}{width}", f"<{width}", getter, trim=True)

    def getattr_value(name: str) -> Callable[[CtInfo], Value]:
        return lambda ct: getattr(ct, name)

    ctid = [Field(name, "CTID", ">10", ">10", _ctid_value) for name in ("ctid", "veid", "vpsid")]
    ubc = [
        Field(name + suffix, header + suffix.upper(), ">10", ">10", _ubc(name), index=i)
        for name, header in UBC_HEADERS.items()
        for i, suffix in enumerate(UBC_SUFFIXES)
    ]
    quota = [
        Field(name + suffix, header + suffix.upper(), ">10", ">10", _quota(name.upper()), index=i)
        for name, header in (("diskspace", "DSPACE"), ("diskinodes", "DINODES"))
        for i, suffix in enumerate(QUOTA_SUFFIXES)
    ]
    return [
        *ctid,
        text("private", "PRIVATE", 32),
        text("root", "ROOT", 32),
        text("mount_opts", "MOUNT_OPTS", 16, "MOUNT_OPTS"),
        text("origin_sample", "ORIGIN_SAMPLE", 32, "ORIGIN_SAMPLE", align=">"),
        text("hostname", "HOSTNAME", 32),
        text("name", "NAME", 32, "NAME"),
        Field("smart_name", "SMARTNAME", ">10", ">10", _smart_name, trim=True),
        text("description", "DESCRIPTION", 32, "DESCRIPTION"),
        text("ostemplate", "OSTEMPLATE", 32, "OSTEMPLATE"),
        Field("ip", "IP_ADDR", "<15", "<15", lambda ct: ct.ips, trim=True),
        Field("nameserver", "NAMESERVER", "<15", "<15", _conf_list("NAMESERVER"), trim=True),
        Field("searchdomain", "SEARCHDOMAIN", "<15", "<15", _conf_list("SEARCHDOMAIN"), trim=True),
        Field("status", "STATUS", "<9", "<9", lambda ct: ct.status),
        *ubc,
        *quota,
        Field("laverage", "LAVERAGE", ">14", ">14", lambda ct: None),
        Field("uptime", "UPTIME", ">15", ">15", _uptime),
        Field("cpulimit", "CPULIM", ">7", ">7", _conf_int("CPULIMIT")),
        Field("cpuunits", "CPUUNI", ">7", ">7", _conf_int("CPUUNITS")),
        Field("cpus", "CPUS", ">5", ">5", _conf_int("CPUS", unset=0)),
        Field("ioprio", "IOP", ">3", ">3", _conf_int("IOPRIO", unset=0)),
        Field("iolimit", "IOLIMIT", ">10", ">10", _conf_int("IOLIMIT", unset=0)),
        Field("iopslimit", "IOPS", ">4", ">4", _conf_int("IOPSLIMIT", unset=0)),
        Field("onboot", "ONBOOT", ">6", ">6", _yes_no("ONBOOT"), sortable=False),
        Field("bootorder", "BOOTORDER", ">10", ">10", _conf_int("BOOTORDER")),
        Field("layout", "LAYOUT", ">6", "<6", lambda ct: "simfs"),  # a private area is a directory tree
        Field("features", "FEATURES", "<15", "<15", _switches("FEATURES"), trim=True, sortable=False),
        Field("vswap", "VSWAP", ">5", ">5", _vswap, sortable=False),
        Field("disabled", "DISABL", ">6", ">6", lambda ct: _yes_no("DISABLED")(ct) is True, sortable=False),
        Field("vm_overcommit", "VM_OVC", ">6", ">6", _conf_int("VM_OVERCOMMIT", unset=0), sortable=False),
        Field("netfilter", "NETFILTER", "<9", "<9", _conf_str("NETFILTER"), sortable=False),
        Field("capability", "CAPABILITY", "<15", "<15", _switches("CAPABILITY"), sortable=False),
    ]


FIELDS = _fields()
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def field_names_listing() -> list[str]:
    """`vzlist -L`: each field's name and header."""
    return [f"{f.name:<15} {f.header:<15}".rstrip() for f in FIELDS]


# --- the request: options parsed


@dataclass
class Request:
    fields: list[Field] | None  # None: JSON's every field
    sort: Field | None = None
    reverse: bool = False
    header: bool = True
    trim: bool = True
    as_json: bool = False
    show_all: bool = False
    only_stopped: bool = False
    ctids: tuple[str, ...] = ()
    hostname: str | None = None
    name: str | None = None
    description: str | None = None


def parse_fields(spec: str | None, *, as_json: bool) -> list[Field] | None:
    """-o's comma-separated names; vzlist's default columns without it (all fields for JSON: None)."""
    if spec is None:
        return None if as_json else parse_fields(DEFAULT_FIELDS, as_json=False)
    fields = []
    for name in spec.split(","):
        found = FIELDS_BY_NAME.get(name)
        if found is None:
            raise ListingError(f"Unknown field: {name} (`vzlist -L` lists them)")
        if as_json and found.index:
            raise ListingError(f"Field `{name}' is not available in JSON output")
        fields.append(found)
    return fields


def parse_sort(spec: str | None) -> tuple[Field | None, bool]:
    """-s [-]FIELD: the field and whether the order is reversed."""
    if spec is None:
        return None, False
    name = spec.removeprefix("-")
    found = FIELDS_BY_NAME.get(name)
    if found is None:
        raise ListingError(f"Invalid sort field name: {spec} (`vzlist -L` lists them)")
    return found, spec.startswith("-")


# --- selecting and sorting


def visible(cts: Iterable[CtInfo], request: Request) -> list[CtInfo]:
    """The CTs vzlist shows: running ones by default, all with -a or CTIDs, not running with -S; then -h -N -d."""
    return [
        ct
        for ct in cts
        if _status_shown(ct.status, request)
        and _matches(ct.hostname, request.hostname)
        and _matches(ct.get("NAME"), request.name)
        and _matches(ct.get("DESCRIPTION"), request.description)
    ]


def _matches(value: str | None, pattern: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and fnmatch.fnmatchcase(value, pattern)


def sort_cts(cts: Sequence[CtInfo], by: Field | None, *, reverse: bool) -> list[CtInfo]:
    """By CTID, then by the -s field (CTs without a value first); reversed as a whole for `-s -FIELD`."""
    ordered = sorted(cts, key=lambda ct: ctid_order(ct.ctid))
    if by is not None and by.sortable:
        ordered.sort(key=lambda ct: _sort_key(by, ct))
    return ordered[::-1] if reverse else ordered


def _sort_key(by: Field, ct: CtInfo) -> tuple[int, Any]:
    if by.name in ("ctid", "veid", "vpsid"):
        return 1, ctid_order(ct.ctid)
    if by.name == "status":
        return 1, STATUS_ORDER.index(ct.status) if ct.status in STATUS_ORDER else len(STATUS_ORDER)
    value = by.cell(ct)
    if isinstance(value, list):
        value = " ".join(value) or None
    if value is None:
        return 0, 0
    if isinstance(value, str):
        return 2, value
    return 1, value


# --- output


def table(cts: Sequence[CtInfo], request: Request) -> list[str]:
    fields = request.fields or []
    lines = [_header(fields)] if request.header else []
    lines.extend(_row(ct, fields, trim=request.trim) for ct in cts)
    return lines


def _header(fields: Sequence[Field]) -> str:
    return " ".join(format(f.header, f.header_format) for f in fields).rstrip()


def _row(ct: CtInfo, fields: Sequence[Field], *, trim: bool) -> str:
    cells = []
    for position, f in enumerate(fields):
        last = position == len(fields) - 1
        text = display.printable(_cell_text(f, f.cell(ct), full=last))
        cell = format(text, f.value_format)
        if f.trim and trim and not last:
            cell = cell[: _width(f.value_format)]
        cells.append(cell)
    return " ".join(cells).rstrip()


def _width(spec: str) -> int:
    return int(spec.lstrip("<>"))


def _cell_text(f: Field, value: Value, *, full: bool) -> str:
    """A value as vzlist's table shows it: "-" for none, yes/no, a list's first item unless it is the last column."""
    if f.name == "uptime":
        return _uptime_text(value) if value else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or (f.name in ("cpus", "iolimit", "iopslimit", "vm_overcommit") and value == 0):
        return "-"
    if f.name.startswith(("diskspace", "diskinodes")) and f.index == 0 and value == 0:
        return "-"
    if isinstance(value, list):
        return (" ".join(value) if full else value[0]) if value else "-"
    if isinstance(value, dict):
        return ",".join(f"{name}:{'on' if state else 'off'}" for name, state in value.items())
    return str(value)


def _uptime_text(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:03d}d{hours:02d}h:{minutes:02d}m:{secs:02d}s"


def json_rows(cts: Sequence[CtInfo], fields: Sequence[Field] | None) -> list[dict[str, Value]]:
    """vzlist -j's objects: the -o fields, or every field without a suffix, in vzlist's order."""
    chosen = fields if fields is not None else [f for f in FIELDS if not f.index]
    return [{f.name: f.value(ct) for f in chosen} for ct in cts]


def json_text(rows: Sequence[dict[str, Value]]) -> str:
    """vzlist -j's layout: one member a line, lists on one line, objects (beancounters, quotas) nested."""
    if not rows:
        return "[]\n"
    objects = []
    for row in rows:
        members = [f"    {json.dumps(name)}: {_json_value(value)}" for name, value in row.items()]
        objects.append("  {\n" + ",\n".join(members) + "\n  }")
    return "[\n" + ",\n".join(objects) + "\n]\n"


def _json_value(value: Value) -> str:
    if isinstance(value, dict):
        members = [f"      {json.dumps(name)}: {json.dumps(item)}" for name, item in value.items()]
        return "{\n" + ",\n".join(members) + "\n    }"
    return json.dumps(value)


# --- gathering: what the host and the CTs' files say


def gather(app: App, request: Request) -> list[CtInfo]:
    """The CTs the request may show, each read once; a CT whose files are broken is listed with a warning.

    A CT the status alone leaves out (a stopped one without -a) is not read further."""
    needs_usage = request.fields is None or any(_needs_usage(f) for f in (*request.fields, request.sort) if f)
    cts = []
    for ct in app.listed_containers(request.ctids):
        state, stage = _stage(ct)
        # which of vzlist's statuses a CT that does not run has matters only if such CTs are listed
        status = _status(ct, state, stage, detailed=request.show_all or request.only_stopped or bool(request.ctids))
        if not _status_shown(status, request):
            continue
        cts.append(_info(ct, status, state, needs_usage=needs_usage))
    return cts


def _status_shown(status: str, request: Request) -> bool:
    if request.only_stopped:
        return status != "running"
    return status == "running" or request.show_all or bool(request.ctids)


def _needs_usage(f: Field) -> bool:
    return f.name.split(".")[0] in ("numproc", "physpages", "swappages", "uptime")


def _stage(ct: Container) -> tuple[RunState | None, Stage | None]:
    """The CT's state and real stage; None, None (with a warning) if its state file is unreadable."""
    try:
        state = ct.load_state()
        return state, settled(state, ct.facts(state))
    except (VzError, OSError) as e:
        display.warning(f"CT {ct.ctid}: {_message(e)}")
        return None, None


def _info(ct: Container, status: str, state: RunState | None, *, needs_usage: bool) -> CtInfo:
    info = CtInfo(ctid=ct.ctid, status=status)
    try:
        # vzctl's merge: CTID.conf's keys over vz.conf's (CT defaults may live there)
        info.conf = {**ct.gconf.values, **ct.conf.values}
    except (VzError, OSError, ValueError) as e:
        problem = e.message if isinstance(e, VzError) else f"cannot read {ct.conf_path} ({e})"
        display.warning(f"CT {ct.ctid}: {problem}; listed without its configuration: fix or remove the file")
        info.broken = True
        return info
    info.private, info.root = _area(ct, "private"), _area(ct, "root")
    # as written: one bad value must not hide the rest
    info.hostname = info.get("HOSTNAME") or default_hostname(ct.ctid)
    live_ips = state.ips if state is not None and state.stage is not Stage.STOPPED else []
    info.ips = live_ips or (info.get("IP_ADDRESS") or "").split()
    if info.running and needs_usage and state is not None:
        info.usage = _usage(ct, state)
    return info


def _area(ct: Container, name: str) -> str | None:
    try:
        return str(getattr(ct, name))
    except (VzError, ValueError) as e:
        display.warning(f"CT {ct.ctid}: {_message(e)}")
        return None


def _message(e: BaseException) -> str:
    return e.message if isinstance(e, VzError) else str(e)


def _status(ct: Container, state: RunState | None, stage: Stage | None, *, detailed: bool = True) -> str:
    """vzlist's status: running; suspended while frozen or a dump waits; mounted; stopped (unknown if unreadable).

    Not `detailed`: all that is asked is whether it runs (no mount table or dump file read)."""
    if stage is None:
        return "unknown"
    if stage is Stage.RUNNING:
        return "running"
    if not detailed:
        return "stopped"
    if stage is not Stage.STOPPED or _dump_waits(state):
        return "suspended"
    from vzpy.host import mounts

    try:
        return "mounted" if mounts.is_mounted(ct.root) else "stopped"
    except (VzError, OSError, ValueError):
        return "stopped"


def _dump_waits(state: RunState | None) -> bool:
    """A stopped CT's recorded dump file (`chkpnt`, or `chkpnt --kill` after `--dump`) that no restore used
    since: vzctl's "suspended" (the rule of `vzpy status`'s sixth word)."""
    try:
        return state is not None and bool(state.dumpfile) and Path(state.dumpfile).is_file()
    except OSError:
        return False


def _usage(ct: Container, state: RunState) -> Usage:
    cgroups = ct.cgroups
    page = os.sysconf("SC_PAGE_SIZE")

    def number(controller: str, name: str, divisor: int = 1) -> int | None:
        try:
            return int(cgroups.read(controller, name)) // divisor
        except (OSError, ValueError, VzError):
            return None

    usage = Usage(numproc=len(_pids(cgroups)))
    usage.numproc_failcnt = _pids_failcnt(cgroups)
    memory = number("memory", "memory.usage_in_bytes", page)
    usage.memory = (memory, number("memory", "memory.max_usage_in_bytes", page), number("memory", "memory.failcnt"))
    with_swap = number("memory", "memory.memsw.usage_in_bytes", page)
    usage.swap = with_swap - memory if with_swap is not None and memory is not None else None
    usage.uptime = _uptime_seconds(state.init_start_ticks) if state.init_start_ticks else None
    return usage


def _pids(cgroups: CgroupSet) -> list[int]:
    try:
        return list(cgroups.pids())
    except (OSError, VzError):
        return []


def _pids_failcnt(cgroups: CgroupSet) -> int | None:
    try:
        for line in cgroups.read("pids", "pids.events").splitlines():
            name, _, count = line.partition(" ")
            if name == "max":
                return int(count)
    except (OSError, ValueError, VzError):
        pass
    return None


def _uptime_seconds(start_ticks: int) -> float | None:
    try:
        since_boot = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))


# --- running it


def run(app: App, request: Request) -> int:
    """List as vzlist does; its exit code (1 if CTIDs were named and none of them exists)."""
    cts = visible(gather(app, request), request)
    if not cts:
        if request.as_json:
            sys.stdout.write("[]\n")
        else:
            click.echo(NOT_FOUND, err=True)
        if request.ctids:
            return 1
        return 0
    cts = sort_cts(cts, request.sort, reverse=request.reverse)
    if request.as_json:
        sys.stdout.write(json_text(json_rows(cts, request.fields)))
    else:
        for line in table(cts, request):
            click.echo(line)
    return 0


def build_request(
    *,
    output: str | None,
    sort: str | None,
    ids_only: bool,
    names: bool,
    as_json: bool,
    **options: Any,
) -> Request:
    if ids_only:
        output, options["header"] = "ctid", False
    elif names and output is None:
        output = NAME_FIELDS
    sort_field, reverse = parse_sort(sort)
    for ctid in options.get("ctids", ()):
        if not CTID_RE.match(ctid):
            raise ListingError(f"CT ID {ctid} is invalid.")
    return Request(parse_fields(output, as_json=as_json), sort=sort_field, reverse=reverse, as_json=as_json, **options)


def _options(hostname_flags: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """vzlist's options, shared by `vzpy list` and `vzlist` (which differ only in -h)."""
    decorators = [
        click.option("-a", "--all", "show_all", is_flag=True, help="List all CTs, not only running ones."),
        click.option("-S", "--stopped", "only_stopped", is_flag=True, help="List only CTs that do not run."),
        click.option("-H", "--no-header", "no_header", is_flag=True, help="Suppress the header row."),
        click.option("-t", "--no-trim", "no_trim", is_flag=True, help="Do not cut long values to their column."),
        click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON (vzlist -j's keys and types)."),
        click.option("-o", "--output", metavar="FIELD[,FIELD...]", help="Show only these fields (see -L)."),
        click.option("-s", "--sort", metavar="[-]FIELD", help="Sort by FIELD; -FIELD reverses the order."),
        click.option("-1", "ids_only", is_flag=True, help="Only CTIDs, one a line (-H -o ctid)."),
        click.option("-n", "--name", "names", is_flag=True, help="Show CT names instead of CTIDs."),
        click.option(*hostname_flags, "hostname", metavar="PATTERN", help="Only CTs whose hostname matches."),
        click.option("-N", "--name_filter", "name", metavar="PATTERN", help="Only CTs whose name matches."),
        click.option("-d", "--description", metavar="PATTERN", help="Only CTs whose description matches."),
        click.option("-L", "--list", "list_fields", is_flag=True, help="List the field names and headers."),
        click.argument("ctids", nargs=-1, metavar="[CTID...]"),
    ]

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _run_options(app: App, list_fields: bool, no_header: bool, no_trim: bool, **options: Any) -> int:
    if list_fields:
        for line in field_names_listing():
            click.echo(line)
        return 0
    request = build_request(header=not no_header, trim=not no_trim, **options)
    return run(app, request)


@click.command(name="list")
@_options(("--hostname",))
@click.pass_obj
def list_(app: App, /, **options: Any) -> None:
    """List CTs as vzlist does: CTID, NPROC, STATUS, IP_ADDR, HOSTNAME (running ones without -a).

    Field names, -o, -s, -j and exit codes (1 on any error, or when none of the CTIDs given exists) are
    vzlist(8)'s; -L lists the fields; --hostname PATTERN is vzlist's -h. STATUS is running, stopped, mounted
    (not running, its root mounted) or suspended (frozen by `chkpnt --suspend`, or a dump of it waits in
    DUMPDIR); unknown if its state file is unreadable. A CT whose CTID.conf cannot be read is listed with a
    warning.

    \b
    --json is vzlist -j: ctid a number (a CTID of letters: a string), ip a list, beancounters
    {held, maxheld, barrier, limit, failcnt} objects (unlimited: 9223372036854775807), onboot a boolean;
    what vzpy cannot know (other beancounters' usage, disk usage, load average) is null.
    """
    code = _run_options(app, **options)
    if code:
        sys.exit(code)


@click.command(name="vzlist", context_settings={"help_option_names": ["--help"]})
@_options(("-h", "--hostname"))
def _vzlist(**options: Any) -> int:
    """vzlist: list containers."""
    return _run_options(App(), **options)


def vzlist_main(argv: list[str]) -> int:
    """vzpy invoked as `vzlist`: vzlist(8)'s syntax, messages and exit codes (1 on any error)."""
    try:
        code = _vzlist.main(argv, prog_name="vzlist", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        click.echo(f"vzlist: {e.format_message()}", err=True)
        return 1
    except ListingError as e:
        click.echo(e.message, err=True)
        return e.exit_code
    except VzError as e:
        display.error(e.message, e.detail)
        return e.exit_code
    return int(code or 0)
