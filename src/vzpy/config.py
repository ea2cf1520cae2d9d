"""vzctl-style configuration: the global vz.conf and per-CT CTID.conf, both `KEY="value"` lines.

Files are kept as a list of lines so that `set --save` rewrites only the keys it changes and leaves
comments, order and unknown keys exactly as the operator wrote them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from vzpy.errors import BadConfig, GlobalConfigNotFound, InvalidValue

DEFAULT_GLOBAL_CONF = Path("/etc/vz/vz.conf")
CTID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")

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

    def set(self, key: str, value: str | None) -> None:
        """Set (or with None, remove) a key, editing its line in place or appending one."""
        if value is not None and ('"' in value or "\n" in value):
            raise InvalidValue(f"{key}: value may not contain quotes or newlines: {value!r}")
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        index = next((i for i, line in enumerate(self.lines) if pattern.match(line)), None)
        if value is None:
            self.values.pop(key, None)
            if index is not None:
                del self.lines[index]
            return
        self.values[key] = value
        line = f'{key}="{value}"'
        if index is None:
            self.lines.append(line)
        else:
            self.lines[index] = line

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def save(self) -> None:
        """Write atomically: a temp file beside the target, fsync, rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(self.text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class GlobalConfig:
    """The global vz.conf with defaults applied. `VZPY_CONF` selects another file."""

    path: Path
    values: dict[str, str]
    exists: bool

    @classmethod
    def load(cls, path: Path | None = None) -> GlobalConfig:
        explicit = path is not None or "VZPY_CONF" in os.environ
        path = path or Path(os.environ.get("VZPY_CONF", DEFAULT_GLOBAL_CONF))
        if not path.exists():
            if explicit:
                raise GlobalConfigNotFound(
                    f"global config {path} not found; create it or unset VZPY_CONF to use {DEFAULT_GLOBAL_CONF}"
                )
            return cls(path=path, values=dict(GLOBAL_DEFAULTS), exists=False)
        conf = ConfFile.load(path)
        return cls(path=path, values={**GLOBAL_DEFAULTS, **conf.values}, exists=True)

    def expand(self, key: str, ctid: str | None = None) -> Path:
        value = self.values[key]
        if "$VEID" in value or "${VEID}" in value:
            if ctid is None:
                raise InvalidValue(f"{key}={value} needs a CTID")
            value = value.replace("${VEID}", ctid).replace("$VEID", ctid)
        return Path(value)

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


def validate_ctid(ctid: str) -> str:
    if not CTID_RE.match(ctid) or ctid in {".", ".."}:
        raise InvalidValue(f"invalid CTID {ctid!r}: use a number or a name of letters, digits, '_', '.', '-'")
    return ctid
