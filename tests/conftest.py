"""Markers shared by every test.

- `@pytest.mark.root`: needs root, real namespaces and cgroups; skipped with the reason otherwise.
- `@pytest.mark.requires_criu_feature("name")`: skipped unless `criu check --feature name` passes here.

With VZPY_REQUIRE_REAL=1 (set by .ci/run) such a skip is a failure instead: CI has root and CRIU, so a
real test that would skip there means the environment is broken, not that the test passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

CRIU_CANDIDATES = ("/opt/vzpy/criu/bin/criu",)


def require_real() -> bool:
    return os.environ.get("VZPY_REQUIRE_REAL") == "1"


@cache
def criu_binary() -> str | None:
    for path in (os.environ.get("VZPY_CRIU"), *CRIU_CANDIDATES, shutil.which("criu")):
        if path and os.access(path, os.X_OK):
            return path
    return None


@cache
def criu_has_feature(name: str) -> bool:
    criu = criu_binary()
    if criu is None or os.geteuid() != 0:
        return False
    result = subprocess.run([criu, "check", "--feature", name], capture_output=True, text=True)
    return result.returncode == 0


def _skip_or_fail(reason: str, *, real: bool = True) -> None:
    if real and require_real():
        pytest.fail(f"VZPY_REQUIRE_REAL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        _skip_or_fail("needs root (namespaces, cgroups, CRIU)")
    for marker in item.iter_markers("requires_criu_feature"):
        name = marker.args[0]
        if not criu_has_feature(name):
            # A kernel lacking a feature is a fact of the host, not a broken CI: skip even in CI.
            pytest.skip(f"criu check --feature {name} fails on this host")


# --- an isolated vzpy root (VZPY_CONF) with real CTs, for integration tests

VZPY = shutil.which("vzpy") or "/usr/local/sbin/vzpy"
_ip_counter = iter(range(10, 250))


class VzRoot:
    """A private vz.conf and /vz tree; `run` calls the real `vzpy` command line against it."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.cgroup_parent = f"vzpy-test-{name}-{os.getpid()}"
        self.conf = base / "etc" / "vz.conf"
        self.conf.parent.mkdir(parents=True)
        keys = {
            "VE_ROOT": f"{base}/root/$VEID",
            "VE_PRIVATE": f"{base}/private/$VEID",
            "CONFDIR": f"{base}/etc/conf",
            "DUMPDIR": f"{base}/dump",
            "TEMPLATE": f"{base}/template",
            "LOCKDIR": f"{base}/lock",
            "CGROUP_PARENT": self.cgroup_parent,
        }
        self.conf.write_text("".join(f'{k}="{v}"\n' for k, v in keys.items()))
        self.env = {**os.environ, "VZPY_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = False, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess:
        result = subprocess.run([VZPY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"vzpy {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def private(self, ctid: str) -> Path:
        return self.base / "private" / ctid

    def state(self, ctid: str) -> dict:
        import json

        return json.loads((self.base / "lock" / f"{ctid}.state.json").read_text())

    @staticmethod
    def new_ip() -> str:
        return f"10.77.{os.getpid() % 200}.{next(_ip_counter)}"

    def add_service(self, ctid: str, name: str, script: str) -> None:
        service = self.private(ctid) / "etc" / "vzpy" / "services" / name
        service.write_text("#!/bin/sh\n" + script + "\n")
        service.chmod(0o755)

    def cleanup(self) -> None:
        confdir = self.base / "etc" / "conf"
        for conf in confdir.glob("*.conf") if confdir.is_dir() else []:
            self.run("stop", "--fast", conf.stem)
        for controller in ("freezer", "memory", "cpu", "pids"):
            parent = Path("/sys/fs/cgroup") / controller / self.cgroup_parent
            for child in parent.glob("*/") if parent.is_dir() else []:
                child.rmdir()
            if parent.is_dir():
                parent.rmdir()


@pytest.fixture
def vzroot(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VzRoot]:
    root = VzRoot(tmp_path / "vz", request.node.name[:20].replace("[", "_").replace("]", "_"))
    try:
        yield root
    finally:
        root.cleanup()


@pytest.fixture
def running_ct(vzroot: VzRoot) -> Iterator[tuple[VzRoot, str, str]]:
    """CT 101 from the minimal template, with an httpd on port 80 serving its CTID, started."""
    ip = vzroot.new_ip()
    vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "ct101.test", check=True)
    www = vzroot.private("101") / "var" / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("hello from 101\n")
    vzroot.add_service("101", "httpd", "exec httpd -f -p 80 -h /var/www")
    vzroot.run("start", "101", check=True)
    yield vzroot, "101", ip
