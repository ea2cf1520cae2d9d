"""The VM lab: QEMU guests running Debian 12's stock kernel on a bridge inside a network namespace.

    lab netns  vzl-<tok>   bridge br0 10.232.0.254/24 (the "client": ssh and TCP to guests and CTs),
                           one tap device per VM; the qemu processes run in it
    VM n       10.232.0.n  (n = 1, 2, ...), root by the lab key, sshd, vzpy + CRIU, proxy ARP for CTs
                           (CT addresses 10.232.0.100-199 from Lab.new_ct_address())

Each VM boots a qcow2 overlay over the cached read-only base image (image.py), TCG only (this machine's
/dev/kvm runs PVM guests only). Everything a lab creates lives under STATE_ROOT/<tok>/ with owner.json
naming the owning process: reap_stale_labs() tears down labs whose owner died; qemu also gets SIGKILL when
the thread that started it exits (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vzpy_lab.netns.layout import netns_path
from vzpy_lab.netns.reaper import Residents, kill_residents, orphaned, reap
from vzpy_lab.netns.system import (
    Step,
    add_netns,
    connect_from,
    delete_netns,
    ip_batch,
    netns_socket,
    ns_id,
    remove_tree,
    run_steps,
    start_time,
    write_file,
)
from vzpy_lab.vm.image import Image, LabKeys, Log, ensure_image
from vzpy_lab.vm.layout import (
    BOOT_TIMEOUT,
    BRIDGE,
    CACHE_ROOT,
    CLEANUP_TIMEOUT,
    CLIENT_OCTET,
    COMMAND_TIMEOUT,
    CT_OCTETS,
    GUEST_CHECKOUT,
    GUEST_CPUS,
    GUEST_RAM_MIB,
    PREFIX_LEN,
    STATE_ROOT,
    VM_OCTETS,
    LabCleanupError,
    LabError,
    vm_address,
    vm_mac,
)
from vzpy_lab.vm.recipe import CHECKOUT
from vzpy_lab.workload.client import Connector

PR_SET_PDEATHSIG = 1
CTID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SSH_PORT = 22
# What the checkout sync leaves out: caches and anything not needed to run vzpy.
SYNC_EXCLUDES = ("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class LabVM:
    """One guest. `run` executes a command in it over ssh (as root, from the lab netns)."""

    __test__ = False

    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.octet = VM_OCTETS[index]
        self.name = f"vm{index + 1}"
        self.directory = lab.state_dir / self.name
        self._qemu: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return vm_address(self.octet)

    @property
    def ssh_target(self) -> str:
        return f"root@{self.address}"

    @property
    def overlay(self) -> Path:
        return self.directory / "overlay.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu.pid if self._qemu else None

    def serial_tail(self, lines: int = 40) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return "(no serial log)"
        return "".join(text.splitlines(True)[-lines:])

    # running things inside

    def ssh_argv(self, command: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
        """argv (for subprocess, from this machine) running `command` in the guest: ssh from the lab netns."""
        remote = [shlex.join(os.fspath(arg) for arg in command)] if command else []
        return self.lab.client_argv([*self.lab.ssh_client_argv(), self.ssh_target, *remote])

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the guest as root (ssh; a login-less root session, PATH includes /usr/local/sbin)."""
        result = subprocess.run(
            self.ssh_argv(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{self.name}: {shlex.join(os.fspath(a) for a in argv)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """Popen of ssh running argv in the guest (stdin /dev/null unless given); killed at lab teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.ssh_argv(argv), **kw)
        self.lab._children.append(proc)
        return proc

    def copy_in(self, source: str | os.PathLike[str], dest: str, *options: str) -> None:
        """rsync -a SOURCE to DEST in the guest (rsync's trailing-slash rules apply; extra rsync options)."""
        self.lab._rsync([*options, os.fspath(source), f"{self.ssh_target}:{dest}"])

    def copy_out(self, source: str, dest: str | os.PathLike[str], *options: str) -> None:
        """rsync -a SOURCE in the guest to DEST on this machine."""
        self.lab._rsync([*options, f"{self.ssh_target}:{source}", os.fspath(dest)])

    def remove_ct(self, ctid: str) -> None:
        """Whatever a test left of CT `ctid` in this guest: stopped, destroyed, and its configs, migration
        marker, private areas and dumps removed (the VMs live for the whole session)."""
        if not CTID_RE.fullmatch(ctid):
            raise LabError(f"unexpected CTID {ctid!r} (letters, digits, '_', '.', '-')")
        self.run(["vzpy", "stop", "--fast", ctid], timeout=COMMAND_TIMEOUT)
        self.run(["vzpy", "destroy", ctid], timeout=COMMAND_TIMEOUT)
        leftovers = [
            f"/etc/vz/conf/{ctid}.conf*",
            f"/vz/lock/{ctid}.migration.json",
            f"/vz/private/{ctid}.migrated",
            f"/vz/private/{ctid}",
            f"/vz/dump/Migrate.{ctid}",
            f"/vz/dump/Dump.{ctid}",
        ]
        self.run(["sh", "-c", f"rm -rf {' '.join(leftovers)}"], check=True)

    def sync_checkout(self) -> None:
        """The checkout's src/ and pyproject.toml to GUEST_CHECKOUT (what the guest's `vzpy` runs)."""
        excludes = [f"--exclude={pattern}" for pattern in SYNC_EXCLUDES]
        self.run(["mkdir", "-p", GUEST_CHECKOUT], check=True)
        self.copy_in(CHECKOUT / "src", f"{GUEST_CHECKOUT}/", "--delete", *excludes)
        self.copy_in(CHECKOUT / "pyproject.toml", f"{GUEST_CHECKOUT}/pyproject.toml")

    # boot

    def _qemu_argv(self, image: Image) -> list[str]:
        cmdline = (
            f"root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off systemd.unified_cgroup_hierarchy=0 "
            f"systemd.hostname=vzpy-lab-{self.name} vzpy_lab.ip={self.address}/{PREFIX_LEN}"
        )
        return [
            "qemu-system-x86_64",
            *("-name", f"vzpy-lab-{self.lab.token}-{self.name}"),
            *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
            *("-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(GUEST_CPUS), "-m", str(GUEST_RAM_MIB)),
            *("-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline),
            *("-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap"),
            *("-netdev", f"tap,id=net0,ifname=tap{self.octet},script=no,downscript=no"),
            *("-device", f"virtio-net-pci,netdev=net0,mac={vm_mac(self.octet)}"),
            *("-device", "virtio-rng-pci"),
            *("-serial", f"file:{self.serial_log}"),
            *("-pidfile", str(self.directory / "qemu.pid")),
        ]

    def _start(self, image: Image) -> None:
        self.directory.mkdir(mode=0o700)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.base), str(self.overlay)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        with open(self.directory / "qemu.log", "ab") as log:
            self._qemu = subprocess.Popen(
                self.lab.client_argv(self._qemu_argv(image)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_for_ssh(self, deadline: float) -> None:
        assert self._qemu is not None
        while True:
            if self._qemu.poll() is not None:
                qemu_log = (self.directory / "qemu.log").read_text(errors="replace").strip()
                raise LabError(
                    f"{self.name}: qemu exited ({self._qemu.returncode}) before ssh answered: {qemu_log}\n"
                    f"serial log {self.serial_log}, last lines:\n{self.serial_tail()}"
                )
            if self._port_open() and self._ssh_answers():
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{self.name} ({self.address}) did not answer ssh within {self.lab.boot_timeout:g}s "
                    f"(emulated CPU; a busy machine boots slower: VZPY_LAB_BOOT_TIMEOUT); serial log "
                    f"{self.serial_log}, last lines:\n{self.serial_tail()}"
                )
            time.sleep(2)

    def _port_open(self) -> bool:
        try:
            connect_from(netns_path(self.lab.netns), self.address, SSH_PORT, timeout=3).close()
        except OSError:
            return False
        return True

    def _ssh_answers(self) -> bool:
        try:
            return self.run(["true"], timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False


class Lab:
    """n VMs on a bridge in a lab netns. `with Lab(n=2) as lab: lab.vms[0].run(["vzpy", "check"])`."""

    __test__ = False

    def __init__(
        self,
        n: int = 2,
        *,
        boot_timeout: float = BOOT_TIMEOUT,
        cache: Path = CACHE_ROOT,
        state_root: Path = STATE_ROOT,
        log: Log | None = None,
    ) -> None:
        if not 1 <= n <= len(VM_OCTETS):
            raise LabError(f"a lab has 1 to {len(VM_OCTETS)} VMs, not {n}")
        self.token = secrets.token_hex(3)
        self.state_dir = state_root / self.token
        self.netns = f"vzl-{self.token}"
        self.boot_timeout = boot_timeout
        self.cache = cache
        self.say: Log = log or (lambda message: None)
        self.vms = [LabVM(self, index) for index in range(n)]
        self.client_address = vm_address(CLIENT_OCTET)
        self.keys = LabKeys.at(cache)
        self.image: Image | None = None
        self.timings: dict[str, float] = {}
        self._children: list[subprocess.Popen[Any]] = []
        self._next_ct_octet = CT_OCTETS.start
        self._started = False
        self._stopped = False

    # lifecycle

    def start(self) -> Lab:
        """Build or verify the image, make the network, boot every VM, sync the checkout into them."""
        for message in reap_stale_labs(self.state_dir.parent):
            self.say(message)
        started = time.monotonic()
        self.image, self.keys = ensure_image(self.cache, self.say)
        self.timings["image"] = time.monotonic() - started
        self.state_dir.mkdir(mode=0o700, parents=True)
        owner = {"pid": os.getpid(), "start": start_time(os.getpid()), "netns": self.netns}
        write_file(self.state_dir / "owner.json", json.dumps(owner))
        self._started = True
        _LIVE_LABS.add(self)
        try:
            self._boot()
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self) -> None:
        assert self.image is not None
        self._make_network()
        started = time.monotonic()
        for vm in self.vms:
            vm._start(self.image)
        self.say(f"lab {self.token}: booting {len(self.vms)} VMs (TCG; about a minute or more)")
        deadline = started + self.boot_timeout
        for vm in self.vms:
            vm._wait_for_ssh(deadline)
        self.timings["boot"] = time.monotonic() - started
        started = time.monotonic()
        self.sync_checkout()
        self.timings["sync"] = time.monotonic() - started
        self.say(f"lab {self.token}: up ({', '.join(f'{k} {v:.0f}s' for k, v in self.timings.items())})")

    def _make_network(self) -> None:
        add_netns(self.netns)
        taps = [
            command
            for vm in self.vms
            for command in (f"tuntap add dev tap{vm.octet} mode tap", f"link set tap{vm.octet} master {BRIDGE} up")
        ]
        ip_batch(
            self.netns,
            [
                "link set lo up",
                f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0",
                f"addr add {self.client_address}/{PREFIX_LEN} dev {BRIDGE}",
                f"link set {BRIDGE} up",
                *taps,
            ],
        )

    def sync_checkout(self) -> None:
        """Copy the checkout's current code into every VM (rsync: only what changed; seconds)."""
        for vm in self.vms:
            vm.sync_checkout()

    def stop(self) -> None:
        """Kill the VMs and everything else in the lab netns, delete it, delete the overlays. The serial
        logs stay in the state dir (reap_stale_labs removes them a day later)."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        _LIVE_LABS.discard(self)
        errors = run_steps(self._teardown_steps())
        if errors:
            raise LabCleanupError(f"cleanup of lab {self.token} incomplete:\n" + "\n".join(errors))

    def _teardown_steps(self) -> list[Step]:
        residents = Residents.of([("net", ns_id(netns_path(self.netns)))])
        qemus = [vm._qemu for vm in self.vms if vm._qemu is not None]
        return [
            *lab_teardown(self.state_dir, self.netns, residents),
            ("reap children", lambda: reap([*qemus, *self._children])),
        ]

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the client: the lab netns

    def client_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", f"--net={netns_path(self.netns)}", "--", *(os.fspath(arg) for arg in argv)]

    def client_run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in the lab netns (this machine's mount ns). Defaults: capture_output, text, timeout."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", COMMAND_TIMEOUT)
        return subprocess.run(self.client_argv(argv), **kw)

    def client_popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.client_argv(argv), **kw)
        self._children.append(proc)
        return proc

    def client_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return netns_socket(netns_path(self.netns), family, kind)

    def client_connect(self, address: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP socket from the lab netns to address:port (a VM or a CT in one), connected."""
        return connect_from(netns_path(self.netns), address, port, timeout)

    def connector(self) -> Connector:
        """client_connect as vzpy_lab.workload.client's clients take it."""
        return lambda address, timeout: self.client_connect(address[0], address[1], timeout)

    def ssh_client_argv(self) -> list[str]:
        """`ssh OPTIONS` with the lab key and strict host keys, multiplexed per lab (add the target)."""
        options = {
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.keys.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "20",
            "ServerAliveInterval": "15",
            "ServerAliveCountMax": "4",
            "LogLevel": "ERROR",
            "ControlMaster": "auto",
            "ControlPath": f"{self.state_dir}/ssh-%C",
            "ControlPersist": "600",
        }
        flags = [f"-o{key}={value}" for key, value in options.items()]
        return ["ssh", "-F", "/dev/null", "-i", str(self.keys.private_key), *flags]

    def _rsync(self, args: Sequence[str]) -> None:
        rsh = " ".join(self.ssh_client_argv())
        result = self.client_run(["rsync", "-a", "-e", rsh, *args])
        if result.returncode != 0:
            raise LabError(f"rsync {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")

    def new_ct_address(self) -> str:
        """A fresh CT address on the lab subnet (10.232.0.100-199), never handed out twice in one lab."""
        if self._next_ct_octet not in CT_OCTETS:
            raise LabError("all CT addresses of this lab are used")
        self._next_ct_octet += 1
        return vm_address(self._next_ct_octet - 1)


# --- teardown and reaping --------------------------------------------------------------------------------


def _remove_overlays_and_sockets(state_dir: Path) -> None:
    for leftover in [*state_dir.glob("vm*/overlay.qcow2"), *state_dir.glob("ssh-*")]:
        leftover.unlink(missing_ok=True)


def _mark_done(state_dir: Path) -> None:
    owner = state_dir / "owner.json"
    if owner.exists():
        os.replace(owner, state_dir / "done.json")


def lab_teardown(state_dir: Path, netns: str, residents: Residents) -> list[Step]:
    return [
        ("kill qemu and clients", lambda: kill_residents(residents, CLEANUP_TIMEOUT)),
        ("delete lab netns", lambda: delete_netns(netns)),
        ("remove overlays", lambda: _remove_overlays_and_sockets(state_dir)),
        ("mark done", lambda: _mark_done(state_dir)),
    ]


def reap_stale_labs(state_root: Path = STATE_ROOT, keep_logs: float = 86400.0) -> list[str]:
    """Tear down labs whose owning process is gone, and remove finished labs' logs after `keep_logs` s."""
    messages = []
    for state_dir, owner in orphaned(state_root):
        residents = Residents.of([("net", ns_id(netns_path(owner["netns"])))])
        errors = run_steps(lab_teardown(state_dir, owner["netns"], residents))
        messages.append(f"reaped stale lab {state_dir.name}" + "".join(f"\n  {e}" for e in errors))
    for done_file in state_root.glob("*/done.json"):
        if time.time() - done_file.stat().st_mtime > keep_logs:
            remove_tree(done_file.parent)
    return messages


_LIVE_LABS: set[Lab] = set()


@atexit.register
def _stop_forgotten_labs() -> None:
    for lab in list(_LIVE_LABS):
        try:
            lab.stop()
        except LabCleanupError as e:
            print(e, file=sys.stderr)


# --- `make lab-up` / `make lab-down` ------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _up(n: int) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Lab(n=n, log=lambda message: print(message, flush=True)) as lab:
            for vm in lab.vms:
                print(f"{vm.name} {vm.address}: {shlex.join(vm.ssh_argv())}")
            print(f"client: nsenter --net={netns_path(lab.netns)}; stop with ^C or `make lab-down`", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("lab: stopped")
    return 0


def _down(state_root: Path = STATE_ROOT) -> int:
    """SIGTERM every `lab up` of this machine (its teardown runs), then reap labs whose owner is gone."""
    for owner_file in state_root.glob("*/owner.json"):
        try:
            owner = json.loads(owner_file.read_text())
            cmdline = Path(f"/proc/{owner['pid']}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if start_time(owner["pid"]) == owner["start"] and b"vzpy_lab.vm.lab\0up" in cmdline:
            os.kill(owner["pid"], signal.SIGTERM)
            deadline = time.monotonic() + 60
            while start_time(owner["pid"]) == owner["start"] and time.monotonic() < deadline:
                time.sleep(0.5)
    for message in reap_stale_labs(state_root):
        print(message)
    return 0


def main(argv: Sequence[str]) -> int:
    if os.geteuid() != 0:
        print("lab: run as root", file=sys.stderr)
        return 12
    if argv[:1] == ["up"]:
        return _up(int(argv[1]) if len(argv) > 1 else 2)
    if argv[:1] == ["down"]:
        return _down()
    print("usage: python -m vzpy_lab.vm.lab up [N] | down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
