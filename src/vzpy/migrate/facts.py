"""This host's facts for the source's preflight, sent in the agent's hello reply."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from vzpy.config import GlobalConfig
from vzpy.criu import Criu, detect_capabilities, require_criu
from vzpy.criu.features import DEFAULT_CACHE_DIR
from vzpy.errors import VzError
from vzpy.host.cpu import host_cpu
from vzpy.runtime.cgroups import CGROUP_ROOT, CONTROLLERS

CONFIG_KEYS = ("VE_PRIVATE", "VE_ROOT", "CONFDIR", "DUMPDIR", "LOCKDIR", "CGROUP_PARENT", "VETH_PREFIX")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fs_facts(path: Path) -> dict[str, Any]:
    existing = _existing_ancestor(path)
    st = os.statvfs(existing)
    return {"path": str(path), "free": st.f_bavail * st.f_frsize, "dev": os.stat(existing).st_dev}


def _criu_facts(gconf: GlobalConfig) -> dict[str, Any]:
    try:
        binary = require_criu(gconf.values.get("CRIU"))
    except VzError as e:
        return {"ok": False, "path": None, "version": None, "error": e.message, "features": {}}
    try:
        features = Criu(binary).feature_check()
    except VzError:
        features = {}
    try:  # cached per kernel and CRIU: the lazy-pages probe runs once
        migration = detect_capabilities(binary, DEFAULT_CACHE_DIR).migration_facts()
    except (VzError, OSError) as e:
        migration = {"error": str(e)}
    return {
        "ok": True,
        "path": str(binary.path),
        "version": str(binary.version),
        "error": None,
        "features": features,
        "migration": migration,
    }


def cgroup_controllers(root: Path = CGROUP_ROOT) -> list[str]:
    """The cgroup v1 controllers vzpy needs that are mounted here."""
    return [name for name in CONTROLLERS if (root / name / "cgroup.procs").exists()]


def cpu_facts() -> dict[str, Any]:
    """This CPU as vzpy.host.cpu reads it: the source judges it with the same policy restore uses."""
    cpu = host_cpu()
    return {"machine": os.uname().machine, "model": cpu["model_name"], "flags": cpu["flags"]}


def host_facts(gconf: GlobalConfig) -> dict[str, Any]:
    private_base = gconf.expand("VE_PRIVATE", "0").parent
    return {
        "hostname": socket.gethostname(),
        "kernel": os.uname().release,
        "criu": _criu_facts(gconf),
        "cpu": cpu_facts(),
        "cgroups": cgroup_controllers(),
        "config": {"path": str(gconf.path), **{key: gconf.values[key] for key in CONFIG_KEYS}},
        "disk": {"private": _fs_facts(private_base), "dump": _fs_facts(gconf.dumpdir)},
    }
