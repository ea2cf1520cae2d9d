"""Addresses, names, paths and time limits of a test network, and its two errors."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SUBNET = "10.231.0."
PREFIX_LEN = 24
CLIENT_OCTET = 200
HOST_OCTETS = range(1, 100)
CT_OCTETS = range(100, 200)
BRIDGE = "br0"
HOST_IFACE = "eth0"
SSH_PORT = 22
SSHD = "/usr/sbin/sshd"
# What root's ssh sessions get (Debian's sshd superuser path); host.run uses the same.
SUPERUSER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TIMEOUT = 60.0
SETUP_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 10.0
STATE_ROOT = Path(os.environ.get("VZPY_TESTHOSTS_DIR") or Path(tempfile.gettempdir()) / "vzpy-testhosts")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_VALUE_RE = re.compile(r"^[^\s\"'\\]*$")

# Path inside a host -> its directory under the host's temp dir.
HOST_MOUNTS: dict[str, str] = {
    "/etc/vz": "etc-vz",
    "/vz": "vz",
    "/var/lib/vzpy": "var-lib-vzpy",
    "/var/cache/vzpy": "var-cache-vzpy",
    "/run/vzpy": "run-vzpy",
    "/run/netns": "run-netns",
    "/root/.ssh": "root-ssh",
}
# Mount points that must exist on the machine (empty directories; created once, never removed).
MOUNTPOINT_MODES: dict[str, int] = {**dict.fromkeys(HOST_MOUNTS, 0o755), "/root/.ssh": 0o700, "/run/sshd": 0o755}
VZ_SUBDIRS = ("private", "root", "dump", "template", "lock")


class HostSetupError(RuntimeError):
    """A test host or network could not be built."""


class HostCleanupError(RuntimeError):
    """Some teardown step failed; the message lists each failed step."""


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def mac_for(octet: int) -> str:
    """A fixed MAC per address, so a reused address never meets a stale ARP entry elsewhere."""
    return f"02:00:0a:e7:00:{octet:02x}"
