"""Where a CT's files live on the host (VE_PRIVATE, VE_ROOT), checked before vzpy mounts, writes or deletes.

vzpy binds VE_PRIVATE onto VE_ROOT, runs the init found there, writes into VE_ROOT and deletes both on
destroy: a value naming a host directory, or another CT's area, would hand that directory to the CT (or
to `destroy`). Such values are refused with the file:line they come from, before anything is touched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vzpy.config import GLOBAL_DEFAULTS, ConfFile, GlobalConfig, expand_veid, validate_ctid
from vzpy.errors import BadConfig, VzError

AREA_KEYS = ("VE_PRIVATE", "VE_ROOT")
VZ_DIR_KEYS = ("CONFDIR", "DUMPDIR", "LOCKDIR", "TEMPLATE")
# Host directories an area may not be, nor contain (an area inside one, e.g. /var/lib/vz/private/101, is fine).
SYSTEM_DIRS = tuple(
    Path(path)
    for path in (
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
        "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/include",
        "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/sbin", "/usr/share", "/usr/src",
        "/var", "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt",
        "/var/run", "/var/spool", "/var/tmp",
    )
)  # fmt: skip
# Kernel filesystems: nothing inside them is a place for a CT either.
VIRTUAL_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass(frozen=True)
class Area:
    """One of a CT's area paths and where its value was written."""

    key: str
    raw: str  # the value as written, before $VEID expansion
    path: Path
    where: str  # "file:line", or the file whose built-in default applies

    def forms(self) -> set[Path]:
        """The path as written and as it resolves now (a symlink to / counts as /)."""
        try:
            return {self.path, Path(os.path.realpath(self.path))}
        except OSError:  # a link it passes cannot be read (e.g. /proc/1/root): the path as written must do
            return {self.path}


def check_ct(ct_conf: ConfFile | None, ctid: str, gconf: GlobalConfig) -> None:
    """Raise BadConfig unless CT `ctid`'s private and root areas are its own (`ct_conf` None: not created yet)."""
    private, root = (area_of(key, ctid, ct_conf, gconf) for key in AREA_KEYS)
    for area in (private, root):
        _check_alone(area, ctid, gconf)
    if _overlap(private, root):
        raise BadConfig(
            f'{root.where}: VE_ROOT "{root.raw}" and VE_PRIVATE "{private.raw}" ({private.where}) are the same '
            "directory or one is inside the other; give each its own directory"
        )
    _check_other_cts(ctid, (private, root), gconf)


def area_of(key: str, ctid: str, ct_conf: ConfFile | None, gconf: GlobalConfig) -> Area:
    """As Container resolves it: CTID.conf's value if set, else vz.conf's (or its built-in default)."""
    raw = ct_conf.get(key) if ct_conf is not None else None
    if ct_conf is not None and raw:
        where = _where(ct_conf, key)
    else:
        raw, where = gconf.values[key], _global_where(gconf, key)
    try:
        path = expand_veid(key, raw, ctid)
    except VzError as e:
        raise BadConfig(f"{where}: {e.message}") from e
    return Area(key=key, raw=raw, path=path, where=where)


def _where(conf: ConfFile, key: str) -> str:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    numbers = [number for number, line in enumerate(conf.lines, start=1) if pattern.match(line)]
    return f"{conf.path}:{numbers[-1]}" if numbers else str(conf.path)


def _global_where(gconf: GlobalConfig, key: str) -> str:
    try:
        conf = ConfFile.load(gconf.path) if gconf.exists else None
    except (OSError, VzError):
        conf = None
    if conf is not None and key in conf.values:
        return _where(conf, key)
    return f"{gconf.path} (built-in default)"


def _check_alone(area: Area, ctid: str, gconf: GlobalConfig) -> None:
    """The checks needing no other area: absolute, plain, not a system or vzpy directory."""
    fix = f"set it to a directory of the CT's own, e.g. {GLOBAL_DEFAULTS[area.key].replace('$VEID', ctid)}"
    head = f'{area.where}: {area.key} "{area.raw}"'
    if not area.raw.startswith("/"):
        raise BadConfig(f"{head} is not an absolute path; {fix}")
    if ".." in area.path.parts:
        raise BadConfig(f"{head} contains '..'; {fix}")
    for form in sorted(area.forms()):
        clash = _host_dir_clash(form)
        if clash is not None:
            raise BadConfig(f"{head} {clash}; {fix}")
        for key in VZ_DIR_KEYS:
            vz_dir = _vz_dir(gconf, key)
            if vz_dir is not None and _nested(form, vz_dir):
                raise BadConfig(f"{head} overlaps vz.conf's {key} {vz_dir}; {fix}")


def _host_dir_clash(path: Path) -> str | None:
    """How `path` clashes with the host's own directories (is or contains one, is inside /proc ...), or None."""
    if path == Path("/"):
        return "is the host's root directory"
    system = next((system for system in SYSTEM_DIRS if system.is_relative_to(path)), None)
    if system is None and path.parent == Path("/") and path.name.startswith("lib"):
        system = path
    if system is not None:
        return f"{'is' if system == path else 'contains'} the host directory {system}"
    virtual = next((virtual for virtual in VIRTUAL_DIRS if path.is_relative_to(virtual)), None)
    return f"is inside the kernel filesystem {virtual}" if virtual is not None else None


def _vz_dir(gconf: GlobalConfig, key: str) -> Path | None:
    try:
        return gconf.expand(key)
    except VzError:
        return None  # a global dir with $VEID in it is per CT: nothing global to collide with


def _nested(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def _overlap(a: Area, b: Area) -> bool:
    return any(_nested(x, y) for x in a.forms() for y in b.forms())


def _check_other_cts(ctid: str, mine: tuple[Area, ...], gconf: GlobalConfig) -> None:
    for other_id, other_conf in _other_confs(ctid, gconf):
        for key in AREA_KEYS:
            try:
                theirs = area_of(key, other_id, other_conf, gconf)
            except VzError:
                continue
            for area in mine:
                if _overlap(area, theirs):
                    raise BadConfig(
                        f'{area.where}: {area.key} "{area.raw}" overlaps CT {other_id}\'s {key} "{theirs.path}" '
                        f"({theirs.where}); each CT needs directories of its own: change one of the two"
                    )


def _other_confs(ctid: str, gconf: GlobalConfig) -> list[tuple[str, ConfFile]]:
    """Every other CTID.conf in CONFDIR; one that does not parse is skipped (it breaks only its own CT)."""
    confdir = gconf.confdir
    found: list[tuple[str, ConfFile]] = []
    for path in sorted(confdir.glob("*.conf")) if confdir.is_dir() else []:
        other = path.name.removesuffix(".conf")
        try:
            if validate_ctid(other) != ctid:
                found.append((other, ConfFile.load(path)))
        except (OSError, UnicodeError, VzError):
            continue
    return found
