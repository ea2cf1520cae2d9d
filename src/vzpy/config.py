"""vzctl-style configuration: the global vz.conf and per-CT CTID.conf, both `KEY="value"` lines.

Files are kept as a list of lines so that `set --save` rewrites only the keys it changes and leaves
comments, order and unknown keys exactly as the operator wrote them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vzpy import fileio
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
PID_MAX_LIMIT = 4194304  # the kernel's largest pid_max: pids.max takes nothing higher
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": PAGE_SIZE}
MAX_BYTES = 2**63 - 1  # a cgroup's memory limit is a signed 64-bit number
MIN_MEMORY = 4 << 20  # below it a CT's init cannot even start ("the starter process exited without a word")

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


def parse_value(raw: str, where: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    if raw and (raw[0] in "\"'" or raw[-1] in "\"'"):
        raise BadConfig(f'{where}: unbalanced quotes in value {raw!r}; write KEY="value"')
    if re.search(r"\s", raw):
        raise BadConfig(f'{where}: value with spaces must be quoted: {raw!r}; write KEY="value"')
    return raw


@dataclass
class ConfFile:
    """A KEY="value" file; `values` is the parsed view, `lines` the text as written."""

    path: Path
    lines: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)

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
                raise BadConfig(f'{where}: not a KEY="value" line: {stripped!r}')
            conf.values[match.group(1)] = parse_value(match.group(2), where)
        return conf

    @classmethod
    def load(cls, path: Path) -> ConfFile:
        return cls.parse(path, path.read_text())

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def where(self, key: str) -> str:
        """The "path:line" of the line that sets key (the last one, as parsing keeps), or the path alone."""
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        numbers = [number for number, line in enumerate(self.lines, start=1) if pattern.match(line)]
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
        return cls(path=path, values={**GLOBAL_DEFAULTS, **conf.values}, exists=True)

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


def physpages_problem(text: str) -> str | None:
    """vzctl's "barrier:limit" or one size; the limit is the one applied."""
    parts = text.split(":")
    if len(parts) > 2:
        return "use a size or barrier:limit, e.g. 0:512M"
    for part in parts:
        try:
            parse_size(part)
        except InvalidValue as e:
            return e.message.split(": ", 1)[1]
    if parse_size(parts[-1]) < MIN_MEMORY:
        return f"a limit below {MIN_MEMORY >> 20}M leaves a CT no room to start; use e.g. 512M or 2G"
    return None


def cpus_problem(text: str) -> str | None:
    if not _CPUS_RE.fullmatch(text):
        return "not a number of CPUs like 1.5"
    value = float(text)
    if value and not MIN_CPUS <= value <= MAX_CPUS:
        return f"use 0 (no limit) or {MIN_CPUS:g} to {MAX_CPUS} CPUs"
    return None


def numproc_problem(text: str) -> str | None:
    """vzctl's "barrier:limit" or one number; 0 means no limit."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return "use a number of processes or barrier:limit, e.g. 512:512"
    if any(len(p.lstrip("0")) > len(str(PID_MAX_LIMIT)) or int(p) > PID_MAX_LIMIT for p in parts):
        return f"at most {PID_MAX_LIMIT} processes (the kernel's limit)"
    return None


VALUE_CHECKS: dict[str, Callable[[str], str | None]] = {
    "HOSTNAME": hostname_problem,
    "CPUS": cpus_problem,
    "NUMPROC": numproc_problem,
    "PHYSPAGES": physpages_problem,
}


def value_problem(key: str, value: str) -> str | None:
    """What is wrong with a value of a key vzpy applies (VALUE_CHECKS); None when it is fine or unchecked."""
    check = VALUE_CHECKS.get(key)
    return check(value) if check else None


def validate_hostname(name: str) -> str:
    if problem := hostname_problem(name):
        raise InvalidValue(f"invalid hostname {shown(name)}: {problem}")
    return name
