"""What goes into the lab's guest image: Debian packages, the files written into it, the host-side inputs
copied in (CRIU's private prefix, vzpy's Python dependencies), and the hash of all of it that names a build."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from vzpy_lab.vm.layout import (
    CT_OCTETS,
    GUEST_CHECKOUT,
    GUEST_CRIU_PREFIX,
    GUEST_PYTHON,
    GUEST_VENV,
    MIRROR,
    SUITE,
    VM_OCTETS,
    vm_address,
)

# Bump when the build steps change in a way the inputs below do not show.
RECIPE_VERSION = 2
CHECKOUT = Path(__file__).resolve().parents[3]
HOST_CRIU_PREFIX = Path("/opt/vzpy/criu")

PACKAGES = (
    # boot: the stock cloud kernel (soft-dirty, userfaultfd) with its initramfs, systemd
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "kmod",
    "e2fsprogs",
    # what vzpy runs (scripts/install-apt-deps.sh lists the host's)
    "openssh-server",
    "openssh-client",
    "rsync",
    "iproute2",
    "nftables",
    "iptables",
    "util-linux",
    "procps",
    "busybox-static",
    "zstd",
    "tar",
    "xz-utils",
    "python3",
    "python3-venv",
    "gcc",
    "libc6-dev",
    # for tests poking at the guest
    "iputils-ping",
    "netcat-openbsd",
)
VZCTL_NAMES = ("vzctl", "vzlist", "vzmigrate")  # links to /usr/local/sbin/vzpy in the guest
# Background jobs that would only compete with the tests for the emulated CPU.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
)

NET_SCRIPT = """\
#!/bin/sh
# vzpy lab: eth0's static address from the kernel command line (vzpy_lab.ip=ADDR/LEN).
set -e
addr=
for word in $(cat /proc/cmdline); do
  case "$word" in
    vzpy_lab.ip=*) addr=${word#vzpy_lab.ip=} ;;
  esac
done
ip link set lo up
ip link set eth0 up
if [ -n "$addr" ]; then ip addr replace "$addr" dev eth0; fi
"""

NET_UNIT = """\
[Unit]
Description=vzpy lab: static address from the kernel command line
DefaultDependencies=no
BindsTo=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Before=network.target ssh.service
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vzpy-lab-net

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = """\
# vzpy lab: root by key only; every guest has the same host key (the lab's known_hosts names it).
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
"""

SYSCTL = """\
# vzpy lab: CTs' addresses are on the lab subnet; the guest routes and answers ARP for them.
net.ipv4.ip_forward = 1
net.ipv4.conf.all.proxy_arp = 1
net.ipv4.conf.default.proxy_arp = 1
net.ipv4.neigh.default.proxy_delay = 0
"""

VZ_CONF = """\
# Global vzpy config of a lab VM (vzpy_lab.vm)
VE_ROOT="/vz/root/$VEID"
VE_PRIVATE="/vz/private/$VEID"
CONFDIR="/etc/vz/conf"
DUMPDIR="/vz/dump"
TEMPLATE="/vz/template"
LOCKDIR="/vz/lock"
CGROUP_PARENT="vzpy"
"""

VZPY_LAUNCHER = f"""\
#!{GUEST_VENV}/bin/python3
# vzpy from the checkout synced to {GUEST_CHECKOUT} (vzpy_lab.vm.Lab.sync_checkout)
import sys

from vzpy.cli import main

sys.exit(main())
"""


@dataclass(frozen=True)
class PythonDist:
    name: str
    version: str


def _requirement_name(requirement: str) -> str | None:
    """The distribution a requirement names, or None if its marker (an extra, another platform) rules it out."""
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate({"extra": ""}):
        return None
    return parsed.name


def vzpy_dependencies(checkout: Path = CHECKOUT) -> list[importlib.metadata.Distribution]:
    """The installed distributions vzpy needs at run time (its pyproject's dependencies and theirs)."""
    project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
    todo = [name for name in (_requirement_name(r) for r in project["dependencies"]) if name]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        dist = importlib.metadata.distribution(name)
        found[key] = dist
        todo += [n for n in (_requirement_name(r) for r in dist.requires or ()) if n]
    return [found[key] for key in sorted(found)]


def criu_fingerprint(prefix: Path = HOST_CRIU_PREFIX) -> str:
    digest = hashlib.sha256((prefix / "bin" / "criu").read_bytes())
    source = prefix / "SOURCE"
    digest.update(source.read_bytes() if source.exists() else b"")
    return digest.hexdigest()


def known_hosts_text(host_public_key: str) -> str:
    """Every VM address with the guests' shared host key (paramiko does not match wildcards)."""
    return "".join(f"{vm_address(octet)} {host_public_key}\n" for octet in VM_OCTETS)


@dataclass(frozen=True)
class Recipe:
    """Everything an image is built from; its digest names the build in the cache."""

    lab_public_key: str
    host_public_key: str
    criu: str
    python: tuple[PythonDist, ...]

    @classmethod
    def current(cls, lab_public_key: str, host_public_key: str) -> Recipe:
        dists = tuple(PythonDist(d.metadata["Name"], d.version) for d in vzpy_dependencies())
        return cls(lab_public_key, host_public_key, criu_fingerprint(), dists)

    def description(self) -> dict[str, object]:
        return {
            "version": RECIPE_VERSION,
            "suite": SUITE,
            "mirror": MIRROR,
            "packages": list(PACKAGES),
            "masked": list(MASKED_UNITS),
            "vzctl_names": list(VZCTL_NAMES),
            "files": {path: text for path, (text, _) in self.guest_files().items()},
            "criu": self.criu,
            "python": [f"{d.name}=={d.version}" for d in self.python],
            "guest_python": GUEST_PYTHON,
            "ct_octets": [CT_OCTETS.start, CT_OCTETS.stop],
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.description(), sort_keys=True).encode()).hexdigest()[:16]

    def guest_files(self) -> dict[str, tuple[str, int]]:
        """Path in the guest -> (text, mode). The private keys are copied separately."""
        return {
            "/etc/hostname": ("vzpy-lab\n", 0o644),
            "/etc/fstab": ("/dev/vda / ext4 rw,errors=remount-ro 0 1\n", 0o644),
            "/usr/local/sbin/vzpy-lab-net": (NET_SCRIPT, 0o755),
            "/etc/systemd/system/vzpy-lab-net.service": (NET_UNIT, 0o644),
            "/etc/ssh/sshd_config.d/vzpy-lab.conf": (SSHD_CONFIG, 0o644),
            "/etc/ssh/ssh_host_ed25519_key.pub": (f"{self.host_public_key} vzpy-lab-guest\n", 0o644),
            "/etc/sysctl.d/90-vzpy-lab.conf": (SYSCTL, 0o644),
            "/root/.ssh/authorized_keys": (f"{self.lab_public_key} vzpy-lab\n", 0o600),
            "/root/.ssh/id_ed25519.pub": (f"{self.lab_public_key} vzpy-lab\n", 0o644),
            "/root/.ssh/known_hosts": (known_hosts_text(self.host_public_key), 0o644),
            "/etc/vz/vz.conf": (VZ_CONF, 0o644),
            "/usr/local/sbin/vzpy": (VZPY_LAUNCHER, 0o755),
            f"{GUEST_VENV}/lib/{GUEST_PYTHON}/site-packages/vzpy-checkout.pth": (f"{GUEST_CHECKOUT}/src\n", 0o644),
            f"{GUEST_VENV}/lib/{GUEST_PYTHON}/site-packages/vzpy-pycriu.pth": (f"{GUEST_CRIU_PREFIX}/pycriu\n", 0o644),
        }
