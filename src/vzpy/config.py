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
_VEID_RE = re.compile(r"\$\{VEID\}|\$VEID(?![A-Za-z0-9_])")
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
        """Set (or with None, remove) a key, editing its line in place or appending one.

        With the key on several lines the last one counts (as when parsing): it is edited, the others go.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidValue(f"invalid config key {key!r}")
        if value is not None and ('"' in value or any(ord(c) < 32 or c in "\x85\u2028\u2029" for c in value)):
            raise InvalidValue(f"{key}: value may not contain quotes, line breaks or control characters: {value!r}")
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
        """Write atomically: a temp file beside the target, fsync, rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(self.text())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


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
        raise InvalidValue(f"invalid CTID {ctid!r}: use a number or a name of letters, digits, '_', '.', '-'")
    return ctid
