"""The capabilities a CT's processes never get: dropped from the bounding set before anything of the CT runs.

A CT shares the host's kernel and has no user namespace of its own, so a capability held in the CT is held
against the whole host wherever the kernel does not scope it to a namespace. The CT's init drops these
before it execs, and `vzpy exec`/`enter` drop them before they fork the command: everything in the CT
descends from one of the two, and the bounding set is inherited and can only shrink. CRIU dumps and
restores the bounding set with each task's credentials.

Without CAP_SYS_ADMIN a CT cannot mount: nothing undoes the read-only /proc and /sys (a fresh proc or sysfs
mount, a remount, an umount of an overmount), no cgroupfs mount moves a task out of its cgroups. The CT's
init and services, `vzpy exec`/`enter`, chkpnt/restore and migration need none of it (vzpy mounts the CT's
/proc, /sys and /dev before the drop, and sets the hostname from the host). Inside a CT, `mount`,
`hostname NAME`, `unshare -m`/`ip netns add` therefore fail with EPERM until CTs get a user namespace.

Kept, as LXC and Docker keep them: CAP_NET_ADMIN (the CT's own network namespace), CAP_MKNOD (the devices
cgroup decides which nodes open), CAP_SYS_PTRACE and CAP_KILL (only tasks of the CT's PID namespace are
visible), CAP_SYS_NICE (real-time scheduling is already off by the cpu cgroup), CAP_SYS_RESOURCE,
CAP_AUDIT_WRITE (sshd and login write audit records), CAP_SYS_CHROOT, CAP_SETPCAP, CAP_SETFCAP.
"""

from __future__ import annotations

import ctypes
import os

# capability number -> why a CT must never use it
DROPPED: dict[int, str] = {
    2: "CAP_DAC_READ_SEARCH: open_by_handle_at() opens any file of a host filesystem, bypassing the CT's root",
    9: "CAP_LINUX_IMMUTABLE: immutable files in the private area block the host's destroy and migration",
    16: "CAP_SYS_MODULE: loads code into the host kernel",
    17: "CAP_SYS_RAWIO: I/O ports, /dev/mem, raw SCSI commands",
    20: "CAP_SYS_PACCT: process accounting, not needed in a CT",
    21: "CAP_SYS_ADMIN: mount() of a fresh proc or sysfs writes the host's kernel settings (core_pattern ...)",
    22: "CAP_SYS_BOOT: kexec_load() replaces the host's (crash) kernel; the CT's init never calls reboot()",
    25: "CAP_SYS_TIME: sets the host's clock",
    29: "CAP_AUDIT_CONTROL: the host's audit rules",
    32: "CAP_MAC_OVERRIDE: bypasses the host's LSM policy",
    33: "CAP_MAC_ADMIN: changes the host's LSM policy",
    34: "CAP_SYSLOG: reads and clears the host's kernel log",
    35: "CAP_WAKE_ALARM: wakes the host from suspend",
    36: "CAP_BLOCK_SUSPEND: keeps the host from suspending",
    37: "CAP_AUDIT_READ: reads the host's audit log",
    38: "CAP_PERFMON: system-wide performance monitoring reads the host's kernel and other tasks",
    39: "CAP_BPF: BPF programs that read kernel memory",
}

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)  # the libc Python runs on; find_library would run ldconfig
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def dropped_mask() -> int:
    return sum(1 << cap for cap in DROPPED)


def drop_from_bounding_set() -> None:
    """Drop DROPPED from this task's bounding set, and clear its inheritable and ambient sets.

    An inheritable or ambient capability would survive exec even outside the bounding set.
    """
    for cap in DROPPED:
        _prctl(PR_CAPBSET_DROP, cap, "drop capability {cap} from the bounding set")
    _clear_inheritable()
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capabilities")


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        if err == 22 and option == PR_CAPBSET_DROP:  # EINVAL: a capability this kernel does not know
            return
        raise OSError(err, f"{what.format(cap=arg)}: {os.strerror(err)}")


def _clear_inheritable() -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    for word in data:
        word.inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
