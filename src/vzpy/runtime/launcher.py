"""Start a CT's init: new PID, mount, UTS, IPC and network namespaces, root entered with pivot_root.

Three processes take part:
- the caller (vzpy) forks a *holder*, which unshares the namespaces and waits;
- the caller puts the holder into the CT's cgroups and configures the network in its netns, then
  lets it go;
- the holder forks the CT's *init* (PID 1 of the new PID namespace) and exits. The init mounts /proc,
  /sys (read-only) and a minimal /dev, makes the host-wide parts of /proc read-only or hides them,
  pivots into the root, becomes a session leader, puts its stdio on the CT's own /dev/null, closes every
  other fd, drops the capabilities of runtime/caps.py from its bounding set and execs the CT's /sbin/init.
All three report on one pipe; the init's end is close-on-exec, so EOF after its pid means exec worked.
What CRIU needs (no fd or mount pointing outside the CT, init a session leader inside) holds by
construction.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vzpy.errors import VzError
from vzpy.runtime import caps, linux
from vzpy.runtime.ctfs import CtRoot

CT_NAMESPACES = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET | linux.CLONE_NEWPID
CT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "linux",
    "container": "vzpy",
}
# name, major, minor: the character devices every CT gets
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
NOSUID_NODEV_NOEXEC = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
START_TIMEOUT = 15.0
KERNEL_DIRS = ("proc", "sys", "dev")  # where the init mounts proc, sysfs and the CT's /dev
# Parts of /proc that act on the whole host (kernel.core_pattern runs a host program as root, sysrq reboots
# the host, ...): read-only in the CT, as LXC and Docker make them. /proc/sys/net is the CT's own network
# namespace's and stays writable, as with LXC's proc:mixed.
READ_ONLY_PROC = ("sys", "sysrq-trigger", "irq", "bus", "fs")
WRITABLE_PROC = ("sys/net",)
# What only tells about or acts on the host's hardware and kernel: hidden (/dev/null over a file, an
# empty read-only tmpfs over a directory). Only those this kernel has are covered.
MASKED = (
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/latency_stats",
    "proc/acpi",
    "proc/scsi",
    "proc/asound",
    "sys/firmware",
)


class StartFailed(VzError):
    exit_code = 3


@dataclass(frozen=True)
class InitSpec:
    root: Path  # the CT root, already a mount point on the host (bind of the private area)
    hostname: str
    init: str = "/sbin/init"


def launch(spec: InitSpec, prepare: Callable[[int], None]) -> int:
    """Start the CT; `prepare(holder_pid)` runs once its namespaces exist. Returns init's host pid."""
    _check_root(spec)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    holder = os.fork()
    if holder == 0:
        os.close(report_r)
        os.close(go_w)
        _run_child(lambda: _holder(spec, go_r, report_w), report_w)
    os.close(report_w)
    os.close(go_r)
    try:
        return _supervise(holder, report_r, go_w, prepare)
    finally:
        os.close(report_r)
        _reap(holder)


def _check_root(spec: InitSpec) -> None:
    """The init and the mount points of /proc, /sys, /dev as the CT sees them (links never lead out of it)."""
    with CtRoot(spec.root) as root:
        if root.stat(spec.init) is None:
            raise StartFailed(f"{spec.init} not found in the CT root {spec.root}; is the private area complete?")
        for sub in KERNEL_DIRS:
            try:
                mode = os.lstat(sub, dir_fd=root.fd).st_mode
            except FileNotFoundError:
                continue  # made by the init before mounting
            if not stat.S_ISDIR(mode):
                raise StartFailed(
                    f"/{sub} in the CT root {spec.root} is not a directory of the CT; make it an empty directory"
                )


def _supervise(holder: int, report_r: int, go_w: int, prepare: Callable[[int], None]) -> int:
    reader = _LineReader(report_r)
    try:
        _expect(reader.line(), "ready")
        prepare(holder)
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
    init_pid = int(_expect(reader.line(), "pid"))
    rest = reader.line()  # None: the init's end closed on exec
    if rest is not None:
        _kill(init_pid)
        _expect(rest, "never")
    return init_pid


def _expect(line: str | None, word: str) -> str:
    if line is None:
        raise StartFailed("CT start failed: the starter process exited without a word")
    key, _, value = line.partition(" ")
    if key == "error":
        raise StartFailed(f"CT start failed: {value.splitlines()[0]}", detail=value)
    if key != word:
        raise StartFailed(f"CT start failed: unexpected message {line!r}")
    return value


class _LineReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.deadline = time.monotonic() + START_TIMEOUT

    def line(self) -> str | None:
        while b"\n" not in self.buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise StartFailed(f"CT start timed out after {START_TIMEOUT:g}s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().replace("\\n", "\n")


def _say(fd: int, message: str) -> None:
    os.write(fd, message.replace("\n", "\\n").encode() + b"\n")


def _run_child(body: Callable[[], None], report_w: int) -> None:
    """Run `body` in a forked child: never return into the caller's code."""
    try:
        body()
        os._exit(0)
    except BaseException as e:
        text = f"{e}\n{traceback.format_exc()}" if not isinstance(e, OSError) else str(e)
        try:
            _say(report_w, f"error {text}")
        finally:
            os._exit(1)


def _holder(spec: InitSpec, go_r: int, report_w: int) -> None:
    linux.unshare(CT_NAMESPACES)
    _say(report_w, "ready")
    if os.read(go_r, 1) != b"g":
        raise StartFailed("start aborted by vzpy")
    init = os.fork()
    if init == 0:
        _run_child(lambda: _init(spec, report_w), report_w)
    _say(report_w, f"pid {init}")


def _init(spec: InitSpec, report_w: int) -> None:
    os.setsid()
    socket.sethostname(spec.hostname)
    _mount_root(str(spec.root))
    _pivot(str(spec.root))
    _stdio_to_dev_null()
    _close_fds_except(report_w)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    os.umask(0o022)
    caps.drop_from_bounding_set()
    os.execve(spec.init, [spec.init], CT_ENV)


def _mount_root(root: str) -> None:
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    for sub in KERNEL_DIRS:
        os.makedirs(f"{root}/{sub}", exist_ok=True)
    linux.mount("proc", f"{root}/proc", "proc", NOSUID_NODEV_NOEXEC)
    linux.mount("sysfs", f"{root}/sys", "sysfs", NOSUID_NODEV_NOEXEC | linux.MS_RDONLY)
    linux.mount("tmpfs", f"{root}/dev", "tmpfs", linux.MS_NOSUID, "mode=755,size=4m")
    old_umask = os.umask(0)
    try:
        for name, major, minor in DEVICES:
            os.mknod(f"{root}/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.mkdir(f"{root}/dev/pts", 0o755)
        os.mkdir(f"{root}/dev/shm", 0o1777)
    finally:
        os.umask(old_umask)
    linux.mount(
        "devpts",
        f"{root}/dev/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    linux.mount("shm", f"{root}/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    _confine_proc(root)


def _confine_proc(root: str) -> None:
    for sub in READ_ONLY_PROC:
        _bind_self(f"{root}/proc/{sub}", read_only=True)
    for sub in WRITABLE_PROC:
        _bind_self(f"{root}/proc/{sub}", read_only=False)
    for sub in MASKED:
        _mask(f"{root}/{sub}", f"{root}/dev/null")


def _bind_self(path: str, *, read_only: bool) -> None:
    if not os.path.lexists(path):
        return
    linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    flags = linux.MS_BIND | linux.MS_REMOUNT | NOSUID_NODEV_NOEXEC
    linux.mount(None, path, None, flags | (linux.MS_RDONLY if read_only else 0))


def _mask(path: str, dev_null: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        linux.mount("tmpfs", path, "tmpfs", NOSUID_NODEV_NOEXEC | linux.MS_RDONLY, "mode=555")
    else:
        linux.mount(dev_null, path, None, linux.MS_BIND)


def _pivot(root: str) -> None:
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only the CT.
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")


def _stdio_to_dev_null() -> None:
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _close_fds_except(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
