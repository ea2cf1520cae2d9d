"""Paths, addresses, sizes and time limits of the VM lab, and its errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The built images, the .deb cache and the lab's ssh key: kept across runs, outside shared scratch space.
CACHE_ROOT = Path(os.environ.get("VZPY_LAB_CACHE") or "/var/cache/vzpy-lab")
# One directory per running lab (overlays, serial logs, owner.json for the reaper).
STATE_ROOT = Path(os.environ.get("VZPY_LAB_STATE") or Path(tempfile.gettempdir()) / "vzpy-lab")

SUITE = "bookworm"
MIRROR = os.environ.get("VZPY_LAB_MIRROR") or "http://deb.debian.org/debian"

SUBNET = "10.232.0."
PREFIX_LEN = 24
CLIENT_OCTET = 254  # the lab netns itself, on the bridge
VM_OCTETS = range(1, 17)
CT_OCTETS = range(100, 200)
BRIDGE = "br0"

GUEST_RAM_MIB = 1024
GUEST_CPUS = 2
GUEST_DISK = "6G"  # virtual size of the root fs (sparse; the qcow2 overlays grow on write)

# Where things live inside a guest.
GUEST_VENV = "/opt/vzpy/venv"
GUEST_CRIU_PREFIX = "/opt/vzpy/criu"
GUEST_CHECKOUT = "/opt/vzpy/checkout"
GUEST_PYTHON = "python3.11"

BOOT_TIMEOUT = float(os.environ.get("VZPY_LAB_BOOT_TIMEOUT") or 420)
BUILD_TIMEOUT = 3600.0
COMMAND_TIMEOUT = 300.0
CLEANUP_TIMEOUT = 20.0


class LabError(RuntimeError):
    """The lab (image, network or VMs) could not be built or started."""


class LabCleanupError(RuntimeError):
    """Some teardown step failed; the message lists each failed step."""


def vm_address(octet: int) -> str:
    return f"{SUBNET}{octet}"


def vm_mac(octet: int) -> str:
    return f"02:00:0a:e8:00:{octet:02x}"
