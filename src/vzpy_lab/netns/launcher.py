"""The launcher that becomes a test host's sshd, and the raw Linux calls the rest of the lab shares.

Stdlib-only and free of package imports on purpose: host.py runs this file by its path as
`python -I -S launcher.py launch SPEC_JSON` (no site, no environment, so nothing outside the standard
library is imported before it enters the host's namespaces), and the process then execs sshd there:

    setns(host netns); unshare(mount, UTS); make / private; sethostname;
    remount /sys for the host's netns (its submounts, e.g. /sys/fs/cgroup, kept); bind the per-host dirs
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def libc_call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    libc_call("mount", _b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), None)


def umount_detach(target: str) -> None:
    libc_call("umount2", _b(target), MNT_DETACH)


def setns(fd: int, nstype: int) -> None:
    libc_call("setns", fd, nstype)


def unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (\\040 for a space, ...) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _sys_submounts() -> list[str]:
    """Mount points whose parent is the topmost /sys mount (e.g. /sys/fs/cgroup)."""
    entries = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    sys_ids = [fields[0] for fields in entries if unescape(fields[4]) == "/sys"]
    if not sys_ids:
        return []
    return [unescape(fields[4]) for fields in entries if fields[1] == sys_ids[-1]]


def _remount_sysfs(hold_dir: Path) -> None:
    """Give /sys the view of the current netns (as `ip netns exec` does) but keep its submounts,
    above all /sys/fs/cgroup, by moving them aside and back."""
    submounts = _sys_submounts()
    hold_dir.mkdir(exist_ok=True)
    held = []
    for index, point in enumerate(submounts):
        spot = hold_dir / str(index)
        spot.mkdir()
        mount(point, str(spot), None, MS_MOVE)
        held.append((spot, point))
    umount_detach("/sys")
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for spot, point in held:
        if os.path.isdir(point):
            mount(str(spot), point, None, MS_MOVE)
        else:
            umount_detach(str(spot))
        spot.rmdir()
    hold_dir.rmdir()


def _launch(spec: dict[str, Any]) -> None:
    if spec["parent_pid"]:
        libc_call("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != spec["parent_pid"]:
            raise SystemExit("launcher: parent already gone")
    fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
    setns(fd, CLONE_NEWNET)
    os.close(fd)
    libc_call("unshare", CLONE_NEWNS | CLONE_NEWUTS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    hostname = spec["hostname"].encode()
    libc_call("sethostname", hostname, len(hostname))
    _remount_sysfs(Path(spec["hold_dir"]))
    for source, target in spec["binds"]:
        mount(source, target, None, MS_BIND | MS_REC)
    os.execv(spec["argv"][0], spec["argv"])


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "launch":
        print(f"usage: {argv[0]} launch SPEC_JSON", file=sys.stderr)
        return 2
    try:
        _launch(json.loads(argv[2]))
    except OSError as e:
        print(f"test host launcher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
