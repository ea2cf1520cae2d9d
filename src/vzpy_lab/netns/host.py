"""A test host: one "host" on the test network, made by TestNetwork.add_host(). It has

- a netns vzt-<name>-<tok>: eth0 10.231.0.N/24 (N = 1..99), lo up, ip_forward, proxy_arp;
- mount and UTS namespaces, held by its sshd, in which /etc/vz, /vz, /var/lib/vzpy, /var/cache/vzpy, /run/vzpy,
  /run/netns and /root/.ssh are bind mounts of per-host temp dirs, the hostname is the netns name, and /sys is a
  sysfs of the host's netns with the machine's /sys/fs/cgroup moved under it;
- an sshd listening on 10.231.0.N:22, root by key only, whose sessions live in those namespaces (launcher.py
  enters them and execs sshd).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzpy_lab.netns import launcher
from vzpy_lab.netns.keys import generate_keys, public_key
from vzpy_lab.netns.layout import (
    BRIDGE,
    DEFAULT_TIMEOUT,
    HOST_IFACE,
    HOST_MOUNTS,
    MOUNTPOINT_MODES,
    PREFIX_LEN,
    SETUP_TIMEOUT,
    SSH_PORT,
    SSHD,
    SUBNET,
    SUPERUSER_PATH,
    VZ_SUBDIRS,
    HostCleanupError,
    HostSetupError,
    mac_for,
    netns_path,
)
from vzpy_lab.netns.reaper import HostRecord, Residents, host_teardown, reap
from vzpy_lab.netns.system import (
    Step,
    add_netns,
    ip_batch,
    listening,
    netns_socket,
    run_checked,
    run_steps,
    start_time,
    write_file,
)

if TYPE_CHECKING:
    from vzpy_lab.netns.network import TestNetwork

# Run by its path with -I -S (see launcher.py): the file of the installed package, wherever that is.
LAUNCHER = os.fspath(Path(launcher.__file__).resolve())
SILENCE_TABLE = "vzpy_lab_silence"


def _ensure_mountpoints() -> None:
    for path, mode in MOUNTPOINT_MODES.items():
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode, exist_ok=True)


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
    lines = [f"# Global vzpy config of test host {hostname} (vzpy_lab.netns)"]
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
        return ["nsenter", *entries, *wd, "--", *(os.fspath(arg) for arg in argv)]

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

    def remove_ct(self, ctid: str) -> None:
        """Whatever a test or a failed migration left of CT `ctid` on this host: stopped, destroyed, and its
        configs, in-doubt marker, private areas and incoming migration data removed."""
        self.run(["vzpy", "stop", "--fast", ctid], timeout=120)
        self.run(["vzpy", "destroy", ctid], timeout=120)
        for conf in self.path("/etc/vz/conf").glob(f"{ctid}.conf*"):
            conf.unlink()
        self.path(f"/vz/lock/{ctid}.migration.json").unlink(missing_ok=True)
        for leftover in (f"/vz/private/{ctid}.migrated", f"/vz/private/{ctid}", f"/vz/dump/Migrate.{ctid}"):
            shutil.rmtree(self.path(leftover), ignore_errors=True)

    def drop_ssh_sessions(self) -> int:
        """SIGKILL this host's sshd session processes (not its listener), as a lost network link would end
        them. Returns how many there were."""
        if self.sshd_pid is None:
            return 0
        netns = os.stat(f"/proc/{self.sshd_pid}/ns/net").st_ino
        killed = 0
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
                same_ns = os.stat(pid_dir / "ns" / "net").st_ino == netns
            except OSError:
                continue
            if same_ns and cmdline.startswith(b"sshd") and int(pid_dir.name) != self.sshd_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                    killed += 1
        return killed

    def silence(self) -> None:
        """Drop every packet this host sends or receives, but on loopback, without a word (no RST, no ICMP):
        a link gone silent. Its connections stay open and wait; unsilence() lifts it."""
        rules = (
            f"table inet {SILENCE_TABLE} {{\n"
            '  chain input { type filter hook input priority -400; policy accept; iifname "lo" accept; drop; }\n'
            '  chain output { type filter hook output priority -400; policy accept; oifname "lo" accept; drop; }\n'
            "}\n"
        )
        result = self.run(["nft", "-f", "-"], input=rules)
        if result.returncode != 0:
            raise HostSetupError(f"cannot silence {self.hostname}: {result.stderr.strip()}")

    def unsilence(self) -> None:
        self.run(["nft", "delete", "table", "inet", SILENCE_TABLE])

    # setup

    def _setup(self, vz_conf: Mapping[str, str] | None) -> None:
        self._make_dirs(vz_conf)
        generate_keys(self.sshd_dir / "ssh_host_ed25519_key", self.path("/root/.ssh/id_ed25519"))
        write_file(self.sshd_dir / "sshd_config", sshd_config_text(self.address, self.sshd_dir, self.env))
        self._make_netns()
        self.network.refresh_keys()
        self._start_sshd()

    def _make_dirs(self, vz_conf: Mapping[str, str] | None) -> None:
        for target, sub in HOST_MOUNTS.items():
            (self.base_dir / sub).mkdir(mode=MOUNTPOINT_MODES[target])
        for sub in VZ_SUBDIRS:
            (self.vz_root / sub).mkdir()
        (self.etc_vz / "conf").mkdir()
        write_file(self.etc_vz / "vz.conf", vz_conf_text(self.hostname, vz_conf))
        self.sshd_dir.mkdir(mode=0o700)

    def _make_netns(self) -> None:
        add_netns(self.netns)
        port = f"v{self.record.octet}"
        ip_batch(
            self.network.switch_netns,
            [
                f"link add {port} type veth peer name {HOST_IFACE} address {mac_for(self.record.octet)} "
                f"netns {self.netns}",
                f"link set {port} master {BRIDGE} up",
            ],
        )
        ip_batch(
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
        run_checked(["nsenter", f"--net={netns_path(self.netns)}", "--", "sysctl", "-q", "-w", *sysctls])

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
        launcher = [sys.executable, "-I", "-S", LAUNCHER, "launch"]
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
        self._waitlistening()
        self._open_ns_fds()

    def _waitlistening(self) -> None:
        assert self._sshd is not None
        deadline = time.monotonic() + SETUP_TIMEOUT
        while not listening(self._sshd.pid, self.address, SSH_PORT):
            if self._sshd.poll() is not None:
                raise HostSetupError(f"sshd of {self.hostname} exited ({self._sshd.returncode}):\n{self.sshd_log()}")
            if time.monotonic() > deadline:
                raise HostSetupError(f"sshd of {self.hostname} not listening after {SETUP_TIMEOUT:g}s")
            time.sleep(0.005)

    def _open_ns_fds(self) -> None:
        assert self._sshd is not None
        pid = self._sshd.pid
        paths = {"net": str(netns_path(self.netns)), "mount": f"/proc/{pid}/ns/mnt", "uts": f"/proc/{pid}/ns/uts"}
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
        steps = host_teardown(self.record, self.network.switch_netns, self._residents(), extra)
        errors = run_steps(steps)
        self.network.forget(self)
        if errors:
            raise HostCleanupError(f"cleanup of test host {self.hostname} incomplete:\n" + "\n".join(errors))

    def __repr__(self) -> str:
        return f"<TestHost {self.name} {self.hostname} {self.address}>"
