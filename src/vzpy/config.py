"""vzctl-style configuration: the global vz.conf and per-CT CTID.conf, both `KEY="value"` lines.

Files are kept as a list of lines so that `set --save` rewrites only the keys it changes and leaves
comments, order and unknown keys exactly as the operator wrote them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vzpy import fileio, units
from vzpy.errors import BadConfig, GlobalConfigNotFound, InvalidValue

DEFAULT_GLOBAL_CONF = Path("/etc/vz/vz.conf")
CTID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_VEID_RE = re.compile(r"\$\{VEID\}|\$VEID(?![A-Za-z0-9_])")
_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")

# Every file vzpy names after a CT (".CTID.vzpy-restore-XXXXXXXX", ".Dump.CTID.XXXXXXXX.tmp", ...) must stay
# within NAME_MAX (255); numeric CTIDs are vzctl's unsigned 32-bit VEIDs.
MAX_CTID_LENGTH = 200
MAX_NUMERIC_CTID = 2**32 - 1
# RFC 1123 host names: labels of letters, digits and '-' (not at either end), at most 63 characters each. The
# kernel holds a hostname in 64 bytes (__NEW_UTS_LEN), below RFC 1123's 253, so 64 is the total limit.
MAX_HOSTNAME = 64
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# CPUS: the cgroup's CFS quota is CPUS x 100 ms and the kernel refuses a quota under 1 ms.
MIN_CPUS = 0.01
MAX_CPUS = 65536
_CPUS_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{0,6})?")
MIN_CPUUNITS, MAX_CPUUNITS = 8, 500000  # vzctl's bounds
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_DOMAIN_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
PID_MAX_LIMIT = 4194304  # the kernel's largest pid_max: pids.max takes nothing higher
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": PAGE_SIZE}
MAX_BYTES = 2**63 - 1  # a cgroup's memory limit is a signed 64-bit number
MIN_MEMORY = 4 << 20  # below it a CT's init cannot even start ("the starter process exited without a word")

DEFAULT_LOGFILE = "/var/log/vzpy.log"
# vzctl announces on every interface unless told `detect`; vzpy announces only where the CT's network is
DEFAULT_NEIGHBOUR_DEVS = "detect"
# Defaults as in vzctl's vz.conf; $VEID is replaced by the CT's ID.
GLOBAL_DEFAULTS: dict[str, str] = {
    "VE_ROOT": "/vz/root/$VEID",
    "VE_PRIVATE": "/vz/private/$VEID",
    "CONFDIR": "/etc/vz/conf",
    "DUMPDIR": "/vz/dump",
    "TEMPLATE": "/vz/template",
    "LOCKDIR": "/vz/lock",
    # vzpy's own keys
    "CGROUP_PARENT": "vzpy",
    "VETH_PREFIX": "veth",
}


# Keys vzctl (vz.conf(5), ctid.conf(5), OpenVZ 7's vz.conf) and vzpy know; any other is kept but warned about.
VZCTL_KEYS = frozenset(
    """
    ACTIONLOGDIR AVNUMPROC BANDWIDTH BOOTORDER CAPABILITY CONFIGFILE CONFIG_CUSTOMIZED CPULIMIT CPUMASK CPUS
    CPUUNITS CPUWEIGHT DCACHE DCACHESIZE DEF_OSTEMPLATE DESCRIPTION DEVICES DEVNODES DGRAMRCVBUF DISABLED
    DISKINODES DISKSPACE DISK_QUOTA DUMPDIR ERROR_ON_ARPFAIL FEATURES FORCE_ROUTE GOLDEN_IMAGE HOSTNAME IOLIMIT
    IOPRIO IOPSLIMIT IP6TABLES IPTABLES IPTABLES_MODULES IPTENTRIES IPV6 IP_ADDRESS KMEMSIZE LOCAL_GID LOCAL_UID
    LOCKDIR LOCKEDPAGES LOGFILE LOGGING LOG_LEVEL MEMINFO MODULES_DISABLED MOUNT_OPTS NAME NAMESERVER
    NEIGHBOUR_DEVS NETDEV NETFILTER NETIF NODEMASK NUMFILE NUMFLOCK NUMIPTENT NUMOTHERSOCK NUMPROC NUMPTY
    NUMSIGINFO NUMTCPSOCK ONBOOT ON_VE_FSERROR OOMGUARPAGES ORIGIN_SAMPLE OSTEMPLATE OTHERSOCKBUF PCI
    PHYSPAGES PRIVVMPAGES QUOTATIME QUOTAUGIDLIMIT RATE RATEMPU SEARCHDOMAIN SHMPAGES SKIP_ARPDETECT
    SKIP_SYSCTL_SETUP STOP_TIMEOUT SWAPPAGES TCPRCVBUF TCPSNDBUF TEMPLATE TOTALRATE TRAFFIC_SHAPING USE_NET_HWCSUM
    USE_NET_RPS USE_NET_TSO USE_VENET_MASK VE0CPUUNITS VEFSTYPE VEID VEIMAGEFORMAT VERBOSE VETH VE_LAYOUT
    VE_PARALLEL VE_PRIVATE VE_ROOT VE_ROUTE_SRC_DEV VE_STOP_MODE VE_TYPE VIRTUOZZO VM_OVERCOMMIT VMGUARPAGES
    VZFASTBOOT VZWDOG VZ_TOOLS_BCID VZ_TOOLS_IOLIMIT VZ_TOOLS_MEMLIMIT UUID
    CONFDIR CGROUP_PARENT VETH_PREFIX CRIU CRIU_TIMEOUT
    """.split()  # noqa: SIM905 - a list of ~120 names reads better as words
)
_seen_warnings: set[str] = set()


def warn(message: str) -> None:
    """A config warning on stderr, once per process (configs are read more than once per command)."""
    if message not in _seen_warnings:
        _seen_warnings.add(message)
        sys.stderr.write(f"vzpy: warning: {message}\n")


class _Unparsable(ValueError):
    pass


def parse_value(raw: str) -> str:
    """The value of KEY=raw as vzctl reads it: quoted ("..." or '...', up to the last such quote), or the
    rest of the line. An inline `# comment` after the value (a '#' after blanks) is dropped; `A=x#y` is "x#y".
    """
    if raw[:1] in ("'", '"'):
        end = raw.rfind(raw[0])
        if end == 0:
            raise _Unparsable(f"unmatched quote in {raw!r}")
        rest = raw[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise _Unparsable(f"text after the closing quote in {raw!r}")
        return raw[1:end]
    comment = _COMMENT_RE.search(raw)
    return (raw[: comment.start()] if comment else raw).rstrip()


_COMMENT_RE = re.compile(r"\s#")


def _parses(raw: str) -> bool:
    try:
        parse_value(raw.strip())
    except _Unparsable:
        return False
    return True


@dataclass
class ConfFile:
    """A KEY="value" file; `values` is the parsed view, `lines` the text as written."""

    path: Path
    lines: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    # lines vzctl would skip (not KEY=value, unmatched quotes) and unknown keys: "file:line: what", ignored
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path, text: str) -> ConfFile:
        conf = cls(path=path, lines=text.splitlines())
        for number, line in enumerate(conf.lines, start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            match = _LINE_RE.match(line)
            where = f"{path}:{number}"
            if not match:
                conf.warnings.append(f"{where}: not a KEY=value line, ignored: {shown(stripped)}")
                continue
            key = match.group(1)
            try:
                conf.values[key] = parse_value(match.group(2))
            except _Unparsable as e:
                conf.warnings.append(f"{where}: {e}, line ignored")
                continue
            if key not in VZCTL_KEYS and not key.startswith("VZPY_"):
                conf.warnings.append(f"{where}: unknown parameter {key}, ignored")
        return conf

    @classmethod
    def load(cls, path: Path) -> ConfFile:
        """Parse the file; its warnings go to stderr (once per process)."""
        conf = cls.parse(path, path.read_text())
        for message in conf.warnings:
            warn(message)
        return conf

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def where(self, key: str) -> str:
        """The "path:line" of the line that sets key (the last one, as parsing keeps), or the path alone."""
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=(.*)$")
        numbers = [n for n, line in enumerate(self.lines, start=1) if (m := pattern.match(line)) and _parses(m[1])]
        return f"{self.path}:{numbers[-1]}" if numbers else str(self.path)

    def checked(self, key: str) -> str | None:
        """The key's value, or None when unset or empty; BadConfig naming file:line when VALUE_CHECKS refuse it."""
        value = self.values.get(key)
        if not value:
            return None
        if problem := value_problem(key, value):
            raise BadConfig(f"{self.where(key)}: invalid {key} value {shown(value)}: {problem}; fix the line")
        return value

    def set(self, key: str, value: str | None) -> None:
        """Set (or with None, remove) a key, editing its line in place or appending one.

        With the key on several lines the last one counts (as when parsing): it is edited, the others go.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidValue(f"invalid config key {key!r}")
        if value is not None and ('"' in value or any(ord(c) < 32 or c in "\x85\u2028\u2029" for c in value)):
            raise InvalidValue(f"{key}: value may not contain quotes, line breaks or control characters: {value!r}")
        if value and (problem := value_problem(key, value)):
            raise InvalidValue(f"invalid {key} value {shown(value)}: {problem}")
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        indexes = [i for i, line in enumerate(self.lines) if pattern.match(line)]
        keep = indexes[-1] if indexes and value is not None else None
        for index in reversed(indexes):
            if index != keep:
                del self.lines[index]
        if value is None:
            self.values.pop(key, None)
            return
        self.values[key] = value
        line = f'{key}="{value}"'
        if keep is None:
            self.lines.append(line)
        else:
            self.lines[keep - sum(1 for i in indexes if i < keep)] = line

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def save(self) -> None:
        """Write atomically and durably (fileio), 0644 as vzctl leaves CT configs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_atomic(self.path, self.text(), mode=0o644)


@dataclass(frozen=True)
class GlobalConfig:
    """The global vz.conf with defaults applied. `VZPY_CONF` selects another file."""

    path: Path
    values: dict[str, str]
    exists: bool
    conf: ConfFile | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, path: Path | None = None) -> GlobalConfig:
        from_env = os.environ.get("VZPY_CONF") or None  # an empty VZPY_CONF counts as unset
        explicit = path is not None or from_env is not None
        path = path or Path(from_env or DEFAULT_GLOBAL_CONF)
        if not path.exists():
            if explicit:
                raise GlobalConfigNotFound(
                    f"global config {path} not found; create it or unset VZPY_CONF to use {DEFAULT_GLOBAL_CONF}"
                )
            return cls(path=path, values=dict(GLOBAL_DEFAULTS), exists=False)
        conf = ConfFile.load(path)
        return cls(path=path, values={**GLOBAL_DEFAULTS, **conf.values}, exists=True, conf=conf)

    def expand(self, key: str, ctid: str | None = None) -> Path:
        return expand_veid(key, self.values[key], ctid)

    def ve_root(self, ctid: str) -> Path:
        return self.expand("VE_ROOT", ctid)

    def ve_private(self, ctid: str) -> Path:
        return self.expand("VE_PRIVATE", ctid)

    @property
    def confdir(self) -> Path:
        return self.expand("CONFDIR")

    @property
    def dumpdir(self) -> Path:
        return self.expand("DUMPDIR")

    @property
    def template_dir(self) -> Path:
        return self.expand("TEMPLATE")

    @property
    def lockdir(self) -> Path:
        return self.expand("LOCKDIR")

    def ct_conf_path(self, ctid: str) -> Path:
        return self.confdir / f"{ctid}.conf"

    def where(self, key: str) -> str:
        return self.conf.where(key) if self.conf else str(self.path)

    def checked(self, key: str) -> str | None:
        """A CT default set here (NAMESERVER, CPUUNITS, ...): its value, or None; BadConfig at file:line if bad."""
        if self.conf is not None:
            return self.conf.checked(key)
        value = self.values.get(key)
        if value and (problem := value_problem(key, value)):
            raise BadConfig(f"{self.path}: invalid {key} value {shown(value)}: {problem}; fix the line")
        return value or None

    def _lenient(self, key: str, default: str) -> str:
        """A host-wide key whose bad value must not stop every CT: vzctl's way, a warning and the default."""
        value = self.values.get(key) or default
        if problem := value_problem(key, value):
            warn(f"{self.where(key)}: invalid {key} value {shown(value)}: {problem}; using {default!r}")
            return default
        return value

    @property
    def logging(self) -> bool:
        """LOGGING=yes|no (default yes): whether the operation log is written."""
        return parse_yesno(self._lenient("LOGGING", "yes"))

    @property
    def logfile(self) -> Path:
        """LOGFILE, the operation log (default /var/log/vzpy.log: vzctl's own log is not vzpy's to write)."""
        return Path(self.values.get("LOGFILE") or DEFAULT_LOGFILE)

    @property
    def ve_stop_mode(self) -> str:
        """VE_STOP_MODE: "suspend" (vzctl's default: checkpoint running CTs at host shutdown) or "stop"."""
        return self._lenient("VE_STOP_MODE", "suspend")

    @property
    def neighbour_devs(self) -> NeighbourDevs:
        """NEIGHBOUR_DEVS: where a CT's addresses are announced (see NeighbourDevs)."""
        return NeighbourDevs.parse(self._lenient("NEIGHBOUR_DEVS", DEFAULT_NEIGHBOUR_DEVS))


@dataclass(frozen=True)
class NeighbourDevs:
    """vz.conf's NEIGHBOUR_DEVS: `detect` (interfaces with a connected route to a network holding the CT's
    address; vzpy's default), `all` (every interface that is up, ARP-capable, not a slave or loopback;
    vzctl's default) or `list:DEV1 DEV2` (those)."""

    mode: str
    devices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NeighbourDevs:
        if text.startswith("list:"):
            return cls("list", tuple(text.removeprefix("list:").split()))
        return cls(text or "all")


def expand_veid(key: str, value: str, ctid: str | None) -> Path:
    """Replace $VEID / ${VEID} (not $VEIDX) by the CT's ID, as vzctl does in both config files."""
    if not _VEID_RE.search(value):
        return Path(value)
    if ctid is None:
        raise InvalidValue(f"{key}={value} needs a CTID")
    return Path(_VEID_RE.sub(lambda _: ctid, value))


def validate_ctid(ctid: str) -> str:
    if not CTID_RE.fullmatch(ctid) or ctid in {".", ".."} or ctid.startswith("-"):
        raise InvalidValue(f"invalid CTID {shown(ctid)}: use a number or a name of letters, digits, '_', '.', '-'")
    if len(ctid) > MAX_CTID_LENGTH:
        raise InvalidValue(f"invalid CTID {shown(ctid)}: {len(ctid)} characters, at most {MAX_CTID_LENGTH}")
    if ctid.isdigit() and int(ctid) > MAX_NUMERIC_CTID:
        raise InvalidValue(f"invalid CTID {shown(ctid)}: a numeric CTID is at most {MAX_NUMERIC_CTID}")
    return ctid


def shown(value: str, width: int = 40) -> str:
    """A value as an error message shows it: quoted, and cut short when long."""
    return repr(value) if len(value) <= width else repr(value[:width]) + f"... ({len(value)} characters)"


# --- values of CTID.conf keys


def hostname_problem(name: str) -> str | None:
    if len(name) > MAX_HOSTNAME:
        return f"{len(name)} characters, the kernel holds at most {MAX_HOSTNAME}"
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            return f"label {label!r} is not 1-63 letters, digits and '-' (not first or last); use e.g. web.example.com"
    return None


def default_hostname(ctid: str) -> str:
    """ctCTID, made a valid hostname: one label, '-' for what a label cannot hold, at most 63 characters."""
    return ("ct" + re.sub(r"[^A-Za-z0-9-]", "-", ctid))[:63].rstrip("-")


def parse_size(value: str, *, what: str = "size") -> int:
    """vzctl sizes: a number of bytes with K/M/G/T, or pages with P (PHYSPAGES="0:256M")."""
    text = value.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(unit)]
    if not (number.isascii() and number.isdigit()):
        raise InvalidValue(f"invalid {what} {shown(value)}: use e.g. 512M or 2G")
    if len(number.lstrip("0")) > len(str(MAX_BYTES)) or (size := int(number) * _SUFFIXES[unit]) > MAX_BYTES:
        raise InvalidValue(f"invalid {what} {shown(value)}: more than {MAX_BYTES} bytes")
    return size


def pair_problem(text: str, unit: units.Unit) -> str | None:
    try:
        units.parse_pair(text, unit)
    except units.BadNumber as e:
        return f"{e}; use e.g. 0:262144 ({unit.name}) or 0:1G"
    return None


def physpages_problem(text: str) -> str | None:
    """vzctl's "barrier:limit" or one value, in pages (or a size: 256M); the limit is the one applied."""
    if problem := pair_problem(text, units.PAGES):
        return problem
    limit = units.pair_limit_bytes(text, units.PAGES)
    if limit is not None and limit < MIN_MEMORY:
        return f"a limit below {MIN_MEMORY >> 20}M leaves a CT no room to start; use e.g. 0:512M or 0:unlimited"
    return None


def pages_problem(text: str) -> str | None:
    return pair_problem(text, units.PAGES)


def diskspace_problem(text: str) -> str | None:
    return pair_problem(text, units.KBLOCKS)


def diskinodes_problem(text: str) -> str | None:
    return pair_problem(text, units.COUNT)


def yesno_problem(text: str) -> str | None:
    return None if text.lower() in ("yes", "no") else "use yes or no"


def parse_yesno(text: str) -> bool:
    return text.lower() == "yes"


def cpuunits_problem(text: str) -> str | None:
    if not (text.isascii() and text.isdigit()) or not MIN_CPUUNITS <= int(text) <= MAX_CPUUNITS:
        return f"use a number from {MIN_CPUUNITS} to {MAX_CPUUNITS} (1000 is a default share)"
    return None


def cpulimit_problem(text: str) -> str | None:
    """vzctl's CPULIMIT: percent of one CPU (200: two CPUs), or N% of the whole host (N at most 100); 0: none."""
    number = text.removesuffix("%")
    if not (number.isascii() and number.isdigit()) or len(number) > 9:
        return "use a percentage of one CPU like 150, or of all CPUs like 50%"
    if text.endswith("%") and int(number) > 100:
        return "a share of all CPUs is at most 100%"
    return None


def cpulimit_percent(text: str) -> float:
    """CPULIMIT as a percentage of one CPU (vzctl multiplies N% by the host's CPU count)."""
    if text.endswith("%"):
        return float(int(text[:-1]) * (os.cpu_count() or 1))
    return float(int(text))


def stop_timeout_problem(text: str) -> str | None:
    return None if text.isascii() and text.isdigit() and len(text) <= 9 else "use a number of seconds"


def ve_stop_mode_problem(text: str) -> str | None:
    return None if text in ("suspend", "stop") else "use suspend or stop"


def neighbour_devs_problem(text: str) -> str | None:
    if text in ("", "all", "detect"):
        return None
    devices = text.removeprefix("list:").split() if text.startswith("list:") else None
    if not devices or not all(_IFNAME_RE.fullmatch(dev) for dev in devices):
        return "use all, detect or list:DEV1 DEV2"
    return None


def nameserver_problem(text: str) -> str | None:
    if text == "inherit":
        return None
    for word in text.split():
        try:
            ipaddress.ip_address(word)
        except ValueError:
            return f"{word!r} is not an IP address; use addresses separated by spaces, or inherit"
    return None


def searchdomain_problem(text: str) -> str | None:
    if text == "inherit":
        return None
    for word in text.split():
        if not _DOMAIN_RE.fullmatch(word):
            return f"{word!r} is not a domain name; use domains separated by spaces, or inherit"
    return None


def cpus_problem(text: str) -> str | None:
    if not _CPUS_RE.fullmatch(text):
        return "not a number of CPUs like 1.5"
    value = float(text)
    if value and not MIN_CPUS <= value <= MAX_CPUS:
        return f"use 0 (no limit) or {MIN_CPUS:g} to {MAX_CPUS} CPUs"
    return None


def numproc_problem(text: str) -> str | None:
    """vzctl's "barrier:limit" or one number, each may be `unlimited`; 0 means no limit too."""
    parts = [part for part in text.split(":") if part != "unlimited"]
    if text.count(":") > 1 or not all(p.isascii() and p.isdigit() for p in parts):
        return "use a number of processes, unlimited, or barrier:limit, e.g. 512:512"
    if any(len(p.lstrip("0")) > len(str(PID_MAX_LIMIT)) or int(p) > PID_MAX_LIMIT for p in parts):
        return f"at most {PID_MAX_LIMIT} processes (the kernel's limit)"
    return None


def numproc_limit(text: str) -> int:
    """The pids.max NUMPROC asks for (its limit): 0 for none, as for `unlimited`."""
    limit = text.split(":")[-1]
    return 0 if limit == "unlimited" else int(limit)


VALUE_CHECKS: dict[str, Callable[[str], str | None]] = {
    "HOSTNAME": hostname_problem,
    "CPUS": cpus_problem,
    "NUMPROC": numproc_problem,
    "PHYSPAGES": physpages_problem,
    "SWAPPAGES": pages_problem,
    "DISKSPACE": diskspace_problem,
    "DISKINODES": diskinodes_problem,
    "CPUUNITS": cpuunits_problem,
    "CPULIMIT": cpulimit_problem,
    "ONBOOT": yesno_problem,
    "DISABLED": yesno_problem,
    "DISK_QUOTA": yesno_problem,
    "LOGGING": yesno_problem,
    "STOP_TIMEOUT": stop_timeout_problem,
    "VE_STOP_MODE": ve_stop_mode_problem,
    "NEIGHBOUR_DEVS": neighbour_devs_problem,
    "NAMESERVER": nameserver_problem,
    "SEARCHDOMAIN": searchdomain_problem,
}


def value_problem(key: str, value: str) -> str | None:
    """What is wrong with a value of a key vzpy applies (VALUE_CHECKS); None when it is fine or unchecked."""
    check = VALUE_CHECKS.get(key)
    return check(value) if check else None


def validate_hostname(name: str) -> str:
    if problem := hostname_problem(name):
        raise InvalidValue(f"invalid hostname {shown(name)}: {problem}")
    return name
