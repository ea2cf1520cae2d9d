"""A CT's root cannot reach the host through the kernel: no host devices, no host-wide /proc knobs, no
capability that acts on the whole host. Each holds for the CT's init, for what `vzpy exec` starts, and
after chkpnt/restore.

Real CTs, real CRIU, the real `vzpy` command line. The host's kernel settings are only read, never written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers import VzRoot, http_get

pytestmark = pytest.mark.root

# capability numbers the CT must not have (runtime/caps.py says why for each)
NEVER = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_TIME": 25,
    "CAP_AUDIT_CONTROL": 29,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
}
# what the CT's services need and keep
KEPT = {"CAP_CHOWN": 0, "CAP_SETUID": 7, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_MKNOD": 27}
PLANTED_DISK = "hostdisk"  # a block device node of the host's disk, put into the private area by the host


def exec_sh(vz: VzRoot, ctid: str, script: str) -> tuple[int, str]:
    result = vz.run("exec", ctid, "sh", "-c", script)
    return result.returncode, result.stdout + result.stderr


def host_disk() -> int:
    """st_rdev of a block device of this host: the one holding / when it is a real one."""
    root_dev = os.stat("/").st_dev
    if os.major(root_dev) != 0:
        return root_dev
    first = sorted(Path("/sys/dev/block").iterdir())[0].name
    major, minor = first.split(":")
    return os.makedev(int(major), int(minor))


def plant_disk_node(vz: VzRoot, ctid: str) -> None:
    os.mknod(vz.private(ctid) / PLANTED_DISK, 0o600 | stat.S_IFBLK, host_disk())


def capabilities(status: str, field: str) -> int:
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")), 16)


def assert_no_host_devices(vz: VzRoot, ctid: str) -> None:
    major, minor = os.major(host_disk()), os.minor(host_disk())
    code, out = exec_sh(vz, ctid, f"mknod /tmp/disk b {major} {minor}")
    assert code != 0 and "Operation not permitted" in out, f"the CT made a block device node: {out}"
    code, out = exec_sh(vz, ctid, f"head -c 1 /{PLANTED_DISK} >/dev/null")
    assert code != 0 and "Operation not permitted" in out, f"the CT opened the host's disk: {out}"
    # what a CT needs still works: its own memory devices and terminals
    code, out = exec_sh(vz, ctid, "mknod /tmp/null c 1 3 && echo x >/tmp/null && head -c 4 /dev/urandom | wc -c")
    assert code == 0 and out.strip() == "4", out


def assert_host_proc_read_only(vz: VzRoot, ctid: str) -> None:
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    # the value already set, so that a kernel which takes the write (the bug) leaves the host as it was
    code, out = exec_sh(
        vz, ctid, "cat /proc/sys/kernel/core_pattern >/tmp/same; cat /tmp/same >/proc/sys/kernel/core_pattern"
    )
    assert code != 0 and "Read-only file system" in out, f"the CT wrote kernel.core_pattern: {out}"
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
    code, out = exec_sh(vz, ctid, "cat /proc/timer_list | wc -c")
    assert code == 0 and out.strip() == "0", f"the host's timers are visible in the CT: {out}"
    # the CT's own network namespace stays its to configure
    code, out = exec_sh(vz, ctid, "echo 1 >/proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward")
    assert code == 0 and out.strip() == "1", out


def assert_capabilities_dropped(vz: VzRoot, ctid: str) -> None:
    init = vz.state(ctid)["init_pid"]
    statuses = {
        "the CT's init": Path(f"/proc/{init}/status").read_text(),
        "a command of vzpy exec": exec_sh(vz, ctid, "cat /proc/self/status")[1],
        "a grandchild of vzpy exec": exec_sh(vz, ctid, "sh -c 'cat /proc/self/status'")[1],
    }
    for who, status in statuses.items():
        for field in ("CapBnd", "CapEff", "CapInh", "CapAmb"):
            held = capabilities(status, field)
            leaked = [name for name, cap in NEVER.items() if held >> cap & 1]
            assert not leaked, f"{who} has {', '.join(leaked)} in {field}"
        missing = [name for name, cap in KEPT.items() if not capabilities(status, "CapEff") >> cap & 1]
        assert not missing, f"{who} lacks {', '.join(missing)}"


def test_ct_cannot_make_or_open_host_block_devices(running_ct) -> None:
    vz, ctid, _ = running_ct
    plant_disk_node(vz, ctid)
    assert_no_host_devices(vz, ctid)


def test_host_wide_proc_files_are_read_only_in_the_ct(running_ct) -> None:
    vz, ctid, _ = running_ct
    assert_host_proc_read_only(vz, ctid)


def test_ct_cannot_undo_the_read_only_proc_and_sys(running_ct) -> None:
    vz, ctid, _ = running_ct
    attempts = (
        "mkdir -p /tmp/p && mount -t proc proc /tmp/p",
        "mkdir -p /tmp/s && mount -t sysfs sysfs /tmp/s",
        "mount -o remount,rw /proc/sys",
        "mount -o remount,rw /sys",
        "umount /proc/sys",
    )
    for attempt in attempts:
        code, out = exec_sh(vz, ctid, attempt)
        refused = "Operation not permitted" in out or "permission denied" in out  # busybox: EPERM
        assert code != 0 and refused, f"`{attempt}` in the CT: {out}"


def test_sysrq_trigger_is_read_only_in_the_ct(running_ct) -> None:
    if not Path("/proc/sysrq-trigger").exists():
        pytest.skip("this kernel has no /proc/sysrq-trigger (CONFIG_MAGIC_SYSRQ off)")
    vz, ctid, _ = running_ct
    code, out = exec_sh(vz, ctid, "echo h >/proc/sysrq-trigger")
    assert code != 0 and "Read-only file system" in out, f"the CT wrote /proc/sysrq-trigger: {out}"


def test_ct_processes_lack_host_wide_capabilities(running_ct) -> None:
    vz, ctid, _ = running_ct
    assert_capabilities_dropped(vz, ctid)


def test_confinement_survives_chkpnt_and_restore(running_ct) -> None:
    vz, ctid, ip = running_ct
    plant_disk_node(vz, ctid)
    devices = Path(f"/sys/fs/cgroup/devices/{vz.cgroup_parent}/{ctid}/devices.list")
    rules = devices.read_text()
    assert "a *:* rwm" not in rules, "the CT's devices cgroup allows every device"

    vz.run("chkpnt", ctid, timeout=120, check=True)
    vz.run("restore", ctid, timeout=120, check=True)

    assert devices.read_text() == rules
    assert http_get(ip) == "hello from 101\n", "the restored CT does not serve"
    assert_no_host_devices(vz, ctid)
    assert_host_proc_read_only(vz, ctid)
    assert_capabilities_dropped(vz, ctid)
