"""Shared helpers for vzpy's tests (importable as `helpers`; conftest.py holds only hooks and fixtures)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
import urllib.request
from functools import cache
from pathlib import Path

from vzpy.host import mounts

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


# --- an isolated vzpy root (VZPY_CONF) with real CTs, for integration tests

VZPY = shutil.which("vzpy") or "/usr/local/sbin/vzpy"
_ip_counter = iter(range(10, 250))


def write_vz_conf(conf: Path, base: Path, **keys: str) -> Path:
    """A vz.conf at `conf` whose CT areas and vzpy directories all lie under `base`; `keys` add or override."""
    values = {
        "VE_ROOT": f"{base}/root/$VEID",
        "VE_PRIVATE": f"{base}/private/$VEID",
        "CONFDIR": f"{base}/conf",
        "DUMPDIR": f"{base}/dump",
        "TEMPLATE": f"{base}/template",
        "LOCKDIR": f"{base}/lock",
        **keys,
    }
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("".join(f'{key}="{value}"\n' for key, value in values.items()))
    return conf


class VzRoot:
    """A private vz.conf and /vz tree; `run` calls the real `vzpy` command line against it."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.cgroup_parent = f"vzpy-test-{name}-{os.getpid()}"
        # unique per test process: parallel test runs on one machine never share a host veth name
        self.veth_prefix = f"vt{os.getpid() % 100000}x"
        self.conf = base / "etc" / "vz.conf"
        write_vz_conf(
            self.conf,
            base,
            CONFDIR=f"{base}/etc/conf",
            CGROUP_PARENT=self.cgroup_parent,
            VETH_PREFIX=self.veth_prefix,
        )
        self.env = {**os.environ, "VZPY_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = False, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess:
        result = subprocess.run([VZPY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"vzpy {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def stage(self, ctid: str) -> str:
        """The CT's stage as `vzpy status --json` gives it (running, suspended, undumped, stopped, ...)."""
        return str(json.loads(self.run("status", "--json", ctid, check=True).stdout)["status"])

    def veth(self, ctid: str) -> str:
        return f"{self.veth_prefix}{ctid}.0"

    def private(self, ctid: str) -> Path:
        return self.base / "private" / ctid

    def state(self, ctid: str) -> dict:
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
        # a test that mounted a CT root by hand (or failed half-way) must not leave it behind
        for mount in sorted(mounts.mounts_below(self.base), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        for controller in ("freezer", "memory", "cpu", "pids", "devices"):
            parent = Path("/sys/fs/cgroup") / controller / self.cgroup_parent
            for child in parent.glob("*/") if parent.is_dir() else []:
                child.rmdir()
            if parent.is_dir():
                parent.rmdir()


def http_get(ip: str, timeout: float = 10.0) -> str:
    """GET http://ip/ from the host, retrying while the CT's service comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{ip}/", timeout=2) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def ns_pids(pid: int) -> list[int]:
    """The pid of `pid` in each nested PID namespace, outermost first (the NSpid line)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("NSpid:"))
    return [int(value) for value in line.split()[1:]]


def read_pty(fd: int, until: bytes | None, timeout: float = 20) -> str:
    """Read from a pty master until `until` shows up (failing the test after `timeout`), or until EOF/EIO
    when it is None."""
    chunks = b""
    deadline = time.monotonic() + timeout
    while until is None or until not in chunks:
        if time.monotonic() > deadline:
            if until is None:
                break
            raise AssertionError(f"no {until!r} from the pty; got {chunks!r}")
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks += data
    return chunks.decode(errors="replace")
