"""Test hosts for live-migration tests: several "hosts" and a client on one machine.

One TestNetwork (per pytest session) is:

    switch netns  vzt-sw-<tok>      bridge br0, one veth port v<N> per host and v200 for the client
    client netns  vzt-client-<tok>  eth0 10.231.0.200/24, runs external clients (ssh, TCP)

and each TestHost on it is:

    netns         vzt-<name>-<tok>  eth0 10.231.0.N/24 (N = 1..99), lo up, ip_forward, proxy_arp
    mount + UTS namespaces, held by the host's sshd, in which /etc/vz, /vz, /var/lib/vzpy,
                  /var/cache/vzpy, /run/vzpy, /run/netns and /root/.ssh are bind mounts of per-host
                  temp dirs and the hostname is the netns name; /sys is a sysfs of the host's netns
                  with the machine's /sys/fs/cgroup moved under it
    sshd          listening on 10.231.0.N:22, root by key only; its sessions live in the namespaces

Everything a network creates lives under STATE_ROOT/<tok>/, with owner.json naming the owning
process; `reap_stale()` tears down networks whose owner died before its teardown ran.

This module is stdlib-only on purpose: run as `python -I -S testhosts.py launch SPEC` it is the
launcher that enters a host's netns, makes its mount and UTS namespaces and execs sshd there.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1

NsId = tuple[int, int]
Step = tuple[str, Callable[[], object]]

_libc = ctypes.CDLL(None, use_errno=True)


class HostSetupError(RuntimeError):
    """A test host or network could not be built."""


class HostCleanupError(RuntimeError):
    """Some teardown step failed; the message lists each failed step."""


# --- small system helpers -------------------------------------------------------------------------


def _libc_call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _libc_call("mount", _b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), None)


def setns(fd: int, nstype: int) -> None:
    _libc_call("setns", fd, nstype)


def ns_id(path: str | Path) -> NsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pid + start = identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _run_checked(argv: Sequence[str], *, input: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise HostSetupError(f"{' '.join(argv)}: timed out after {SETUP_TIMEOUT:g}s") from e
    if result.returncode != 0:
        raise HostSetupError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _ip_batch(netns: str, commands: Iterable[str]) -> None:
    _run_checked(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def add_netns(name: str) -> None:
    _run_checked(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    if netns_path(name).exists():
        _run_checked(["ip", "netns", "delete", name])


def delete_link(netns: str, link: str) -> None:
    """Best effort: the link also goes away with its netns, just not synchronously."""
    if netns_path(netns).exists():
        subprocess.run(["ip", "-n", netns, "link", "del", link], capture_output=True, timeout=SETUP_TIMEOUT)


def mac_for(octet: int) -> str:
    """A fixed MAC per address, so a reused address never meets a stale ARP entry elsewhere."""
    return f"02:00:0a:e7:00:{octet:02x}"


def _write_file(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _ensure_mountpoints() -> None:
    for path, mode in MOUNTPOINT_MODES.items():
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode, exist_ok=True)


def generate_keys(*paths: Path) -> None:
    """ed25519 key pairs (PATH and PATH.pub), generated in parallel."""
    procs = [
        subprocess.Popen(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vzpy-test-{path.name}", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for path in paths
    ]
    for path, proc in zip(paths, procs, strict=True):
        _, err = proc.communicate(timeout=SETUP_TIMEOUT)
        if proc.returncode != 0:
            raise HostSetupError(f"ssh-keygen {path} failed: {err.decode(errors='replace').strip()}")


def public_key(private_key: Path) -> str:
    """'ssh-ed25519 AAAA...' without the comment."""
    return " ".join(Path(f"{private_key}.pub").read_text().split()[:2])


def netns_socket(netns: str | Path, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside a network namespace (a name under /run/netns, or an nsfs path).

    A dedicated thread joins the netns and creates the socket; a socket stays in the netns it was
    created in, so it can be used from any thread afterwards.
    """
    path = netns if isinstance(netns, Path) or "/" in str(netns) else netns_path(str(netns))
    box: dict[str, Any] = {}

    def create() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            box["sock"] = socket.socket(family, kind)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=create, name=f"setns-{Path(path).name}", daemon=True)
    thread.start()
    thread.join(SETUP_TIMEOUT)
    if "error" in box:
        raise box["error"]
    if "sock" not in box:
        raise TimeoutError(f"creating a socket in {path} timed out")
    return box["sock"]


def connect_from(netns: str | Path, address: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = netns_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _listening(pid: int, address: str, port: int) -> bool:
    """Whether PID's netns has a TCP socket listening on address:port (per /proc/PID/net/tcp)."""
    local = f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(fields[1] == local and fields[3] == "0A" for fields in (line.split() for line in lines))


def _run_steps(steps: Iterable[Step]) -> list[str]:
    """Run every step even if earlier ones failed; return the failures."""
    errors = []
    for what, action in steps:
        try:
            action()
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {e}")
    return errors


# --- cgroups ---------------------------------------------------------------------------------------


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory of a CGROUP_PARENT, in all hierarchies, parents before children."""
    tops = sorted({*CGROUP_ROOT.glob(name), *CGROUP_ROOT.glob(f"*/{name}")})
    return [Path(root) for top in tops if top.is_dir() for root, _, _ in os.walk(top)]


def _write_quietly(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)


def thaw_and_kill_cgroups(name: str) -> None:
    """Thaw frozen cgroups (v1 freezer, v2 cgroup.freeze) and use v2 cgroup.kill where there is one."""
    for directory in cgroup_dirs(name):
        for control, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0"), ("cgroup.kill", "1")):
            if (directory / control).exists():
                _write_quietly(directory / control, value)


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(name):
        try:
            pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


def remove_cgroups(name: str, timeout: float = CLEANUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for directory in reversed(cgroup_dirs(name)):
        _rmdir_when_empty(directory, deadline)


def _rmdir_when_empty(directory: Path, deadline: float) -> None:
    """rmdir a cgroup, retrying while it is still busy with exiting tasks."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _cgroup_segments(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return set()
    return {segment for line in lines for segment in line.split(":", 2)[-1].split("/")}


# --- finding and killing a host's processes --------------------------------------------------------


@dataclass(frozen=True)
class Residents:
    """The processes that belong to a test host: in one of its namespaces or in its cgroup parent.

    Namespaces of this process (the machine's own) are never matched, whatever a caller passes.
    """

    namespaces: frozenset[tuple[str, NsId]]
    cgroup_name: str | None = None

    @classmethod
    def of(cls, namespaces: Iterable[tuple[str, NsId | None]], cgroup_name: str | None = None) -> Residents:
        own = {(kind, ns_id(f"/proc/{pid}/ns/{kind}")) for kind in ("net", "mnt") for pid in ("self", "1")}
        chosen = {(kind, ident) for kind, ident in namespaces if ident is not None and (kind, ident) not in own}
        return cls(frozenset(chosen), cgroup_name)

    def owns(self, pid: int) -> bool:
        if pid == os.getpid() or _gone_or_zombie(pid):
            return False
        if any(ns_id(f"/proc/{pid}/ns/{kind}") == ident for kind, ident in self.namespaces):
            return True
        return self.cgroup_name is not None and self.cgroup_name in _cgroup_segments(pid)

    def find(self) -> list[int]:
        candidates = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
        if self.cgroup_name:
            candidates |= cgroup_pids(self.cgroup_name)
        return sorted(pid for pid in candidates if self.owns(pid))


def _kill_if(pid: int, still_matches: Callable[[int], bool]) -> None:
    """SIGKILL via a pidfd, re-checking after opening it so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if still_matches(pid):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def kill_residents(residents: Residents, timeout: float = CLEANUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while victims := residents.find():
        if residents.cgroup_name:
            thaw_and_kill_cgroups(residents.cgroup_name)
        for pid in victims:
            _kill_if(pid, residents.owns)
        if time.monotonic() > deadline:
            raise HostCleanupError(f"still alive {timeout:g}s after SIGKILL: pids {victims}")
        time.sleep(0.01)


def reap(procs: Iterable[subprocess.Popen[Any]]) -> None:
    """Kill (if still running), wait for and close the pipes of our own child processes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=CLEANUP_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _mounts_under(path: Path) -> list[str]:
    prefix = f"{path}/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == str(path) or point.startswith(prefix):
            points.append(point)
    return points


def remove_tree(path: Path) -> None:
    """rm -rf, first detaching anything mounted below it here (there should be nothing)."""
    for point in reversed(_mounts_under(path)):
        _libc_call("umount2", _b(point), MNT_DETACH)
    if path.exists():
        shutil.rmtree(path)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# --- per-host state on disk ------------------------------------------------------------------------


@dataclass
class HostRecord:
    """What teardown needs, saved as host.json so a later run can reap a host whose owner died."""

    name: str
    octet: int
    netns: str
    base: str
    sshd_pid: int | None = None
    sshd_start: int | None = None

    @property
    def hostname(self) -> str:
        return self.netns

    @property
    def cgroup_parent(self) -> str:
        return f"vzpy-{self.hostname}"

    def save(self) -> None:
        _write_file(Path(self.base) / "host.json", json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> HostRecord:
        return cls(**json.loads(path.read_text()))

    def live_sshd(self) -> int | None:
        """The sshd's pid, only if that very process is still running."""
        if self.sshd_pid is None or start_time(self.sshd_pid) != self.sshd_start:
            return None
        return self.sshd_pid

    def namespaces(self) -> list[tuple[str, NsId | None]]:
        """Its netns; while its sshd runs, also its mount ns and the netns named in its /run/netns
        (as made by `ip netns add` inside the host, which `ip netns exec` processes live in)."""
        found = [("net", ns_id(netns_path(self.netns)))]
        pid = self.live_sshd()
        if pid is None:
            return found
        found.append(("mnt", ns_id(f"/proc/{pid}/ns/mnt")))
        inner = Path(f"/proc/{pid}/root/run/netns")
        with contextlib.suppress(OSError):
            found += [("net", ns_id(inner / name)) for name in os.listdir(inner)]
        return found

    def residents(self, *extra: tuple[str, NsId | None]) -> Residents:
        return Residents.of([*self.namespaces(), *extra], self.cgroup_parent)


def _host_teardown(record: HostRecord, switch_netns: str, residents: Residents, extra: list[Step]) -> list[Step]:
    return [
        ("kill processes", lambda: kill_residents(residents)),
        *extra,
        ("remove cgroups", lambda: remove_cgroups(record.cgroup_parent)),
        ("delete veth", lambda: delete_link(switch_netns, f"v{record.octet}")),
        ("delete netns", lambda: delete_netns(record.netns)),
        ("remove temp dir", lambda: remove_tree(Path(record.base))),
    ]


def vz_conf_text(hostname: str, extra: Mapping[str, str] | None = None) -> str:
    values = {
        "VE_ROOT": "/vz/root/$VEID",
        "VE_PRIVATE": "/vz/private/$VEID",
        "CONFDIR": "/etc/vz/conf",
        "DUMPDIR": "/vz/dump",
        "TEMPLATE": "/vz/template",
        "LOCKDIR": "/vz/lock",
        "CGROUP_PARENT": f"vzpy-{hostname}",
        **(extra or {}),
    }
    lines = [f"# Global vzpy config of test host {hostname} (tests/integration/testhosts.py)"]
    return "\n".join([*lines, *(f'{key}="{value}"' for key, value in values.items())]) + "\n"


def sshd_config_text(address: str, sshd_dir: Path, env: Mapping[str, str]) -> str:
    set_env = f"SetEnv {' '.join(f'{key}={value}' for key, value in env.items())}\n" if env else ""
    return (
        set_env
        + f"""\
ListenAddress {address}:{SSH_PORT}
HostKey {sshd_dir / "ssh_host_ed25519_key"}
PidFile {sshd_dir / "sshd.pid"}
AuthorizedKeysFile {sshd_dir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
# The temp dirs live below the world-writable /tmp, which StrictModes would refuse.
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
LoginGraceTime 30
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""
    )


# --- a test host -----------------------------------------------------------------------------------


class TestHost:
    """One "host": netns + mount/UTS namespaces + sshd. Made by TestNetwork.add_host()."""

    __test__ = False

    def __init__(self, network: TestNetwork, record: HostRecord, env: Mapping[str, str] | None = None) -> None:
        self.network = network
        self.record = record
        self.env = dict(env or {})
        self._sshd: subprocess.Popen[bytes] | None = None
        self._ns_fds: dict[str, int] = {}
        self._children: list[subprocess.Popen[Any]] = []
        self._stopped = False

    # identity and paths

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def hostname(self) -> str:
        """Its UTS hostname and netns name, e.g. vzt-a-1f2e3d."""
        return self.record.hostname

    @property
    def netns(self) -> str:
        return self.record.netns

    @property
    def cgroup_parent(self) -> str:
        return self.record.cgroup_parent

    @property
    def address(self) -> str:
        return f"{SUBNET}{self.record.octet}"

    @property
    def ssh_target(self) -> str:
        return f"root@{self.address}"

    @property
    def base_dir(self) -> Path:
        return Path(self.record.base)

    @property
    def vz_root(self) -> Path:
        """The directory that is /vz inside the host."""
        return self.base_dir / HOST_MOUNTS["/vz"]

    @property
    def etc_vz(self) -> Path:
        """The directory that is /etc/vz inside the host."""
        return self.base_dir / HOST_MOUNTS["/etc/vz"]

    @property
    def sshd_dir(self) -> Path:
        return self.base_dir / "sshd"

    @property
    def sshd_pid(self) -> int | None:
        return self._sshd.pid if self._sshd else None

    def path(self, inside: str) -> Path:
        """Where a path inside the host (under one of HOST_MOUNTS) is from the outside."""
        for target in sorted(HOST_MOUNTS, key=len, reverse=True):
            if inside == target or inside.startswith(f"{target}/"):
                return self.base_dir / HOST_MOUNTS[target] / inside[len(target) :].lstrip("/")
        raise ValueError(f"{inside} is not under a per-host mount ({', '.join(HOST_MOUNTS)})")

    def host_public_key(self) -> str:
        return public_key(self.sshd_dir / "ssh_host_ed25519_key")

    def identity_public_key(self) -> str:
        """The key root uses from inside this host (its /root/.ssh/id_ed25519)."""
        return public_key(self.base_dir / HOST_MOUNTS["/root/.ssh"] / "id_ed25519")

    def known_hosts_line(self) -> str:
        return f"{self.address} {self.host_public_key()}"

    def sshd_log(self) -> str:
        try:
            return (self.sshd_dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    # running things inside

    def nsenter_argv(self, argv: Sequence[str | os.PathLike[str]], cwd: str | None = None) -> list[str]:
        """argv wrapped in nsenter; needs pass_fds=host.ns_fds()."""
        if not self._ns_fds:
            raise HostSetupError(f"{self.hostname} is not running")
        entries = [f"--{kind}=/proc/self/fd/{fd}" for kind, fd in self._ns_fds.items()]
        wd = [f"--wd={cwd}"] if cwd else []
        return ["nsenter", *entries, *wd, "--", *map(os.fspath, argv)]

    def ns_fds(self) -> tuple[int, ...]:
        return tuple(self._ns_fds.values())

    def _subprocess_kwargs(self, kw: dict[str, Any]) -> dict[str, Any]:
        env = {"PATH": SUPERUSER_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8"}
        kw["env"] = {**env, **self.env, **(kw.get("env") or {})}
        kw["pass_fds"] = (*kw.get("pass_fds", ()), *self.ns_fds())
        return kw

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the host's net, mount and UTS namespaces, as an ssh session would.

        Defaults: capture_output=True, text=True, timeout=DEFAULT_TIMEOUT, check=False. `cwd` is a
        path inside the host; `env` is added to a clean root environment (PATH=SUPERUSER_PATH).
        """
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEFAULT_TIMEOUT)
        full = self.nsenter_argv(argv, kw.pop("cwd", None))
        return subprocess.run(full, **self._subprocess_kwargs(kw))

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the host (stdin defaults to /dev/null); stop() kills and reaps it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        full = self.nsenter_argv(argv, kw.pop("cwd", None))
        proc = subprocess.Popen(full, **self._subprocess_kwargs(kw))
        self._children.append(proc)
        return proc

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in the host's netns (it keeps the netns alive until closed)."""
        return netns_socket(netns_path(self.netns), family, kind)

    # setup

    def _setup(self, vz_conf: Mapping[str, str] | None) -> None:
        self._make_dirs(vz_conf)
        generate_keys(self.sshd_dir / "ssh_host_ed25519_key", self.path("/root/.ssh/id_ed25519"))
        _write_file(self.sshd_dir / "sshd_config", sshd_config_text(self.address, self.sshd_dir, self.env))
        self._make_netns()
        self.network.refresh_keys()
        self._start_sshd()

    def _make_dirs(self, vz_conf: Mapping[str, str] | None) -> None:
        for target, sub in HOST_MOUNTS.items():
            (self.base_dir / sub).mkdir(mode=MOUNTPOINT_MODES[target])
        for sub in VZ_SUBDIRS:
            (self.vz_root / sub).mkdir()
        (self.etc_vz / "conf").mkdir()
        _write_file(self.etc_vz / "vz.conf", vz_conf_text(self.hostname, vz_conf))
        self.sshd_dir.mkdir(mode=0o700)

    def _make_netns(self) -> None:
        add_netns(self.netns)
        port = f"v{self.record.octet}"
        _ip_batch(
            self.network.switch_netns,
            [
                f"link add {port} type veth peer name {HOST_IFACE} address {mac_for(self.record.octet)} "
                f"netns {self.netns}",
                f"link set {port} master {BRIDGE} up",
            ],
        )
        _ip_batch(
            self.netns,
            ["link set lo up", f"addr add {self.address}/{PREFIX_LEN} dev {HOST_IFACE}", f"link set {HOST_IFACE} up"],
        )
        sysctls = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.proxy_arp=1",
            f"net.ipv4.conf.{HOST_IFACE}.proxy_arp=1",
            # Answer proxy ARP at once, not after a random delay of up to 0.8 s.
            f"net.ipv4.neigh.{HOST_IFACE}.proxy_delay=0",
        ]
        _run_checked(["nsenter", f"--net={netns_path(self.netns)}", "--", "sysctl", "-q", "-w", *sysctls])

    def _launch_spec(self) -> dict[str, Any]:
        main_thread = threading.current_thread() is threading.main_thread()
        return {
            "netns": str(netns_path(self.netns)),
            "hostname": self.hostname,
            "hold_dir": str(self.base_dir / "sys-hold"),
            "binds": [[str(self.base_dir / sub), target] for target, sub in HOST_MOUNTS.items()],
            # Die with the creating thread; only the main thread lives as long as the session.
            "parent_pid": os.getpid() if main_thread else 0,
            "argv": [SSHD, "-D", "-e", "-f", str(self.sshd_dir / "sshd_config")],
        }

    def _start_sshd(self) -> None:
        _ensure_mountpoints()
        launcher = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "launch"]
        with open(self.sshd_dir / "sshd.log", "ab") as log:
            self._sshd = subprocess.Popen(
                [*launcher, json.dumps(self._launch_spec())],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": SUPERUSER_PATH, "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        self.record.sshd_pid = self._sshd.pid
        self.record.sshd_start = start_time(self._sshd.pid)
        self.record.save()
        self._wait_listening()
        self._open_ns_fds()

    def _wait_listening(self) -> None:
        assert self._sshd is not None
        deadline = time.monotonic() + SETUP_TIMEOUT
        while not _listening(self._sshd.pid, self.address, SSH_PORT):
            if self._sshd.poll() is not None:
                raise HostSetupError(f"sshd of {self.hostname} exited ({self._sshd.returncode}):\n{self.sshd_log()}")
            if time.monotonic() > deadline:
                raise HostSetupError(f"sshd of {self.hostname} not listening after {SETUP_TIMEOUT:g}s")
            time.sleep(0.005)

    def _open_ns_fds(self) -> None:
        assert self._sshd is not None
        paths = {"net": netns_path(self.netns), "mount": f"/proc/{self._sshd.pid}/ns/mnt"}
        paths["uts"] = f"/proc/{self._sshd.pid}/ns/uts"
        self._ns_fds = {kind: os.open(path, os.O_RDONLY | os.O_CLOEXEC) for kind, path in paths.items()}
        if os.fstat(self._ns_fds["mount"]).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            raise HostSetupError(f"sshd of {self.hostname} runs in the machine's mount namespace")

    # teardown

    def _residents(self) -> Residents:
        if "mount" in self._ns_fds:
            st = os.fstat(self._ns_fds["mount"])
            return self.record.residents(("mnt", (st.st_dev, st.st_ino)))
        return self.record.residents()

    def _reap_children(self) -> None:
        reap([*self._children, *([self._sshd] if self._sshd else [])])

    def _close_ns_fds(self) -> None:
        while self._ns_fds:
            os.close(self._ns_fds.popitem()[1])

    def stop(self) -> None:
        """Kill everything of the host (sshd, sessions, popen'ed processes, CTs in its cgroup parent,
        anything in its net or mount namespace; frozen cgroups are thawed first), then remove its
        cgroups, veth, netns and temp dir. Every step runs even if an earlier one failed; failures
        are raised together as HostCleanupError. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        extra: list[Step] = [("reap children", self._reap_children), ("close ns fds", self._close_ns_fds)]
        steps = _host_teardown(self.record, self.network.switch_netns, self._residents(), extra)
        errors = _run_steps(steps)
        self.network.forget(self)
        if errors:
            raise HostCleanupError(f"cleanup of test host {self.hostname} incomplete:\n" + "\n".join(errors))

    def __repr__(self) -> str:
        return f"<TestHost {self.name} {self.hostname} {self.address}>"


# --- the network -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientKey:
    """The client's ssh key, authorized on every host, and a known_hosts naming every host."""

    private_key: Path
    public_key: Path
    known_hosts: Path


class TestNetwork:
    """The switch netns with the bridge, the client netns, and the hosts on them."""

    __test__ = False

    def __init__(self, token: str, state_dir: Path) -> None:
        self.token = token
        self.state_dir = state_dir
        self.switch_netns = f"vzt-sw-{token}"
        self.client_netns = f"vzt-client-{token}"
        self.client_address = f"{SUBNET}{CLIENT_OCTET}"
        client_dir = state_dir / "client"
        self.client_key = ClientKey(
            client_dir / "id_ed25519", client_dir / "id_ed25519.pub", client_dir / "known_hosts"
        )
        self.hosts: dict[str, TestHost] = {}
        self._client_children: list[subprocess.Popen[Any]] = []
        self._next_ct_octet = CT_OCTETS.start
        self._stopped = False

    @classmethod
    def create(cls, state_root: Path = STATE_ROOT) -> TestNetwork:
        state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(3)
        state_dir = state_root / token
        state_dir.mkdir(mode=0o700)
        network = cls(token, state_dir)
        owner = {"pid": os.getpid(), "start": start_time(os.getpid())}
        _write_file(
            state_dir / "owner.json",
            json.dumps({**owner, "switch": network.switch_netns, "client": network.client_netns}),
        )
        _LIVE_NETWORKS.add(network)
        try:
            network._setup()
        except BaseException:
            network.stop()
            raise
        return network

    def _setup(self) -> None:
        (self.state_dir / "hosts").mkdir()
        self.client_key.private_key.parent.mkdir(mode=0o700)
        generate_keys(self.client_key.private_key)
        _write_file(self.client_key.known_hosts, "")
        add_netns(self.switch_netns)
        add_netns(self.client_netns)
        port = f"v{CLIENT_OCTET}"
        _ip_batch(
            self.switch_netns,
            [
                "link set lo up",
                f"link add {BRIDGE} type bridge stp_state 0",
                f"link set {BRIDGE} up",
                f"link add {port} type veth peer name {HOST_IFACE} address {mac_for(CLIENT_OCTET)} "
                f"netns {self.client_netns}",
                f"link set {port} master {BRIDGE} up",
            ],
        )
        _ip_batch(
            self.client_netns,
            [
                "link set lo up",
                f"addr add {self.client_address}/{PREFIX_LEN} dev {HOST_IFACE}",
                f"link set {HOST_IFACE} up",
            ],
        )

    def add_host(
        self, name: str, vz_conf: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> TestHost:
        """Create and start a host. `vz_conf` adds or overrides keys of its /etc/vz/vz.conf; `env` is
        set in its ssh sessions (sshd SetEnv) and in host.run/popen."""
        if not NAME_RE.match(name) or name in self.hosts:
            raise HostSetupError(f"bad or duplicate host name {name!r} (want {NAME_RE.pattern}, unused)")
        for key, value in (env or {}).items():
            if not ENV_KEY_RE.match(key) or not ENV_VALUE_RE.match(value):
                raise HostSetupError(f"unsupported session variable {key}={value!r} (no spaces or quotes)")
        netns = f"vzt-{name}-{secrets.token_hex(3)}"
        base = self.state_dir / "hosts" / name
        base.mkdir(mode=0o700)
        record = HostRecord(name=name, octet=self._free_octet(), netns=netns, base=str(base))
        record.save()
        host = TestHost(self, record, env)
        self.hosts[name] = host
        try:
            host._setup(vz_conf)
        except BaseException:
            host.stop()
            raise
        return host

    def _free_octet(self) -> int:
        used = {host.record.octet for host in self.hosts.values()}
        for octet in HOST_OCTETS:
            if octet not in used:
                return octet
        raise HostSetupError(f"no free host address in {SUBNET}{HOST_OCTETS.start}-{HOST_OCTETS.stop - 1}")

    def forget(self, host: TestHost) -> None:
        if self.hosts.get(host.name) is host:
            del self.hosts[host.name]
            self.refresh_keys()

    def refresh_keys(self) -> None:
        """Rewrite known_hosts (client's and every host's /root/.ssh) and every authorized_keys."""
        hosts = [host for host in self.hosts.values() if (host.sshd_dir / "ssh_host_ed25519_key.pub").exists()]
        known = "".join(f"{host.known_hosts_line()}\n" for host in hosts)
        keys = [public_key(self.client_key.private_key), *(host.identity_public_key() for host in hosts)]
        authorized = "".join(f"{key}\n" for key in keys)
        _write_file(self.client_key.known_hosts, known)
        for host in hosts:
            _write_file(host.path("/root/.ssh/known_hosts"), known)
            _write_file(host.sshd_dir / "authorized_keys", authorized, mode=0o600)

    def new_ct_address(self) -> str:
        """A fresh CT address in 10.231.0.100-199, never handed out twice in one network."""
        if self._next_ct_octet not in CT_OCTETS:
            raise HostSetupError("all CT addresses of this test network are used")
        self._next_ct_octet += 1
        return f"{SUBNET}{self._next_ct_octet - 1}"

    # the client

    def _client_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", f"--net={netns_path(self.client_netns)}", "--", *map(os.fspath, argv)]

    def client_run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in the client netns (machine's mount ns and environment).
        Defaults: capture_output=True, text=True, timeout=DEFAULT_TIMEOUT, check=False."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEFAULT_TIMEOUT)
        return subprocess.run(self._client_argv(argv), **kw)

    def client_popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen in the client netns; stop() kills whatever is left in it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._client_argv(argv), **kw)
        self._client_children.append(proc)
        return proc

    def client_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return netns_socket(netns_path(self.client_netns), family, kind)

    def client_connect(self, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP socket from the client to address:port, connected, with `timeout` set on it."""
        return connect_from(netns_path(self.client_netns), address, port, timeout)

    def ssh_argv(self, host: TestHost, *command: str) -> list[str]:
        """OpenSSH client argv (run it with client_run) for `command` on host, strict host keys."""
        options = {
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.client_key.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "5",
        }
        flags = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
        return ["ssh", "-F", "/dev/null", "-i", str(self.client_key.private_key), *flags, host.ssh_target, *command]

    # teardown

    def _teardown_steps(self) -> list[Step]:
        namespaces = [("net", ns_id(netns_path(name))) for name in (self.client_netns, self.switch_netns)]
        residents = Residents.of(namespaces)
        steps = _network_teardown(self.state_dir, self.switch_netns, self.client_netns, residents)
        return [steps[0], ("reap client children", self._reap_client_children), *steps[1:]]

    def _reap_client_children(self) -> None:
        reap(self._client_children)

    def stop(self) -> None:
        """Stop every host, then kill what is left in the client netns, delete both namespaces and
        the state dir. Failures are collected and raised together as HostCleanupError."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE_NETWORKS.discard(self)
        errors = []
        for host in list(self.hosts.values()):
            try:
                host.stop()
            except HostCleanupError as e:
                errors.append(str(e))
        errors += _run_steps(self._teardown_steps())
        if errors:
            raise HostCleanupError(f"cleanup of test network {self.token} incomplete:\n" + "\n".join(errors))

    def __enter__(self) -> TestNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE_NETWORKS: set[TestNetwork] = set()


@atexit.register
def _stop_forgotten_networks() -> None:
    """Last resort for scripts that exit without stopping their networks (pytest fixtures do)."""
    for network in list(_LIVE_NETWORKS):
        try:
            network.stop()
        except HostCleanupError as e:
            print(e, file=sys.stderr)


def _network_teardown(state_dir: Path, switch: str, client: str, residents: Residents) -> list[Step]:
    return [
        ("kill client processes", lambda: kill_residents(residents)),
        ("delete client netns", lambda: delete_netns(client)),
        ("delete switch netns", lambda: delete_netns(switch)),
        ("remove state dir", lambda: remove_tree(state_dir)),
    ]


# --- reaping what killed runs left behind ----------------------------------------------------------


def _reap_network(state_dir: Path, owner: dict[str, Any]) -> list[str]:
    switch, client = owner["switch"], owner["client"]
    errors = []
    for host_file in sorted(state_dir.glob("hosts/*/host.json")):
        record = HostRecord.load(host_file)
        errors += _run_steps(_host_teardown(record, switch, record.residents(), []))
    residents = Residents.of([("net", ns_id(netns_path(name))) for name in (client, switch)])
    return errors + _run_steps(_network_teardown(state_dir, switch, client, residents))


def reap_stale(state_root: Path = STATE_ROOT) -> list[str]:
    """Tear down networks whose owning process is gone (a run killed before its teardown).

    Networks of live processes (other sessions running now) are left alone. Returns one message
    per reaped network, plus any cleanup failures.
    """
    messages = []
    for owner_file in sorted(state_root.glob("*/owner.json")):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if start_time(owner["pid"]) == owner["start"]:
            continue
        errors = _reap_network(owner_file.parent, owner)
        messages.append(f"reaped stale test network {owner_file.parent.name}" + "".join(f"\n  {e}" for e in errors))
    return messages


# --- the launcher: runs as its own process, becomes sshd --------------------------------------------


def _sys_submounts() -> list[str]:
    """Mount points whose parent is the topmost /sys mount (e.g. /sys/fs/cgroup)."""
    entries = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    sys_ids = [fields[0] for fields in entries if _unescape(fields[4]) == "/sys"]
    if not sys_ids:
        return []
    return [_unescape(fields[4]) for fields in entries if fields[1] == sys_ids[-1]]


def _remount_sysfs(hold_dir: Path) -> None:
    """Give /sys the view of the current netns (as `ip netns exec` does) but keep its submounts,
    above all /sys/fs/cgroup, by moving them aside and back."""
    submounts = _sys_submounts()
    hold_dir.mkdir(exist_ok=True)
    held = []
    for index, point in enumerate(submounts):
        spot = hold_dir / str(index)
        spot.mkdir()
        _mount(point, str(spot), None, MS_MOVE)
        held.append((spot, point))
    _libc_call("umount2", b"/sys", MNT_DETACH)
    _mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for spot, point in held:
        if os.path.isdir(point):
            _mount(str(spot), point, None, MS_MOVE)
        else:
            _libc_call("umount2", _b(str(spot)), MNT_DETACH)
        spot.rmdir()
    hold_dir.rmdir()


def _launch(spec: dict[str, Any]) -> None:
    if spec["parent_pid"]:
        _libc_call("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != spec["parent_pid"]:
            raise SystemExit("launcher: parent already gone")
    fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
    setns(fd, CLONE_NEWNET)
    os.close(fd)
    _libc_call("unshare", CLONE_NEWNS | CLONE_NEWUTS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    hostname = spec["hostname"].encode()
    _libc_call("sethostname", hostname, len(hostname))
    _remount_sysfs(Path(spec["hold_dir"]))
    for source, target in spec["binds"]:
        _mount(source, target, None, MS_BIND | MS_REC)
    os.execv(spec["argv"][0], spec["argv"])


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "launch":
        print(f"usage: {argv[0]} launch SPEC_JSON", file=sys.stderr)
        return 2
    try:
        _launch(json.loads(argv[2]))
    except OSError as e:
        print(f"testhosts launcher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
