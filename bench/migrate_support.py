"""Helpers of bench/migrate: the TCP prober, and the two halves of the raw-CRIU floor.

The prober runs in bench/migrate's own process (its socket lives in the test network's client netns).
The floor halves run inside the test hosts, started by bench/migrate with host.run/host.popen:

    python bench/migrate_support.py floor-dst SPEC_JSON   on the destination: mount the CT root, make its
        cgroups, start `criu page-server` and a listener for the small images, print "ready {...}", then
        receive the images, `criu restore` (host side of the veth set up and announced from CRIU's
        pre-resume action script, before CRIU unlocks the network) and print "result {...}"
    python bench/migrate_support.py floor-src SPEC_JSON   on the source: `criu dump --page-server` straight
        to that page server (no SSH), then the non-page images as a tar stream over plain TCP; prints
        "result {...}"

Every time printed is time.monotonic(): CLOCK_MONOTONIC is one clock for the whole machine (the test hosts
have no time namespace), so bench/migrate can line the halves up with its prober.
"""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from vzpy.runtime.cgroups import CONTROLLERS

REMAPS_DIR = "ct-link-remaps"  # in the floor's images: CRIU's link-remap files, for the CT's tree on b

MSG = struct.Struct("!Q")  # one probe: an 8-byte sequence number, echoed back as is


# --- the prober ------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    replies: list[float]  # monotonic time of every echoed probe, in order
    sent: int
    error: str | None  # why the prober ended early (a broken echo stream), None if it was stopped
    reconnects: list[tuple[float, float]] = field(default_factory=list)  # (connection lost, new one up)

    def gaps_after(self, since: float) -> list[tuple[float, float]]:
        """(start, length) of each interval between consecutive replies that ends after `since`."""
        r = self.replies
        return [(a, b - a) for a, b in pairwise(r) if b > since]

    def longest_gap(self, since: float = 0.0) -> tuple[float, float]:
        gaps = self.gaps_after(since)
        return max(gaps, key=lambda g: g[1]) if gaps else (0.0, 0.0)

    def first_reply_after(self, t: float) -> float | None:
        return next((x for x in self.replies if x > t), None)


class Prober:
    """One TCP connection to an echo service; every `interval` s it writes one 8-byte sequence number and
    records the monotonic time at which each echo comes back whole and in order.

    Bounded: it stops by itself after `max_seconds` (and so after max_seconds/interval probes). If the
    connection breaks (EOF, reset) and `reconnect` is set, it opens a new one (counted in `reconnects`);
    otherwise it ends with `error` set.
    """

    def __init__(
        self,
        connect: Callable[[float], socket.socket],
        *,
        interval: float = 0.001,
        max_seconds: float = 300.0,
        reconnect: bool = True,
    ) -> None:
        self._connect = connect
        self.interval = interval
        self.max_seconds = max_seconds
        self.max_count = int(max_seconds / interval)
        self.reconnect = reconnect
        self.replies: list[float] = []
        self.sent = 0
        self.error: str | None = None
        self.reconnects: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._sock = self._open(5.0)
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def _open(self, timeout: float) -> socket.socket:
        sock = self._connect(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def start(self) -> Prober:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> ProbeResult:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = self.error or f"prober thread did not stop within {timeout:g}s"
        with contextlib.suppress(OSError):
            self._sock.close()
        return ProbeResult(list(self.replies), self.sent, self.error, list(self.reconnects))

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # the thread must never die silently
            self.error = f"prober: {type(e).__name__}: {e}"

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        seq = expect = 0
        out, inbuf = b"", b""
        next_send = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now > deadline or self.sent >= self.max_count:
                return
            if now >= next_send:
                if len(out) < 65536:  # during an outage the kernel's send buffer takes the backlog
                    out += MSG.pack(seq)
                    seq += 1
                    self.sent += 1
                next_send = next_send + self.interval if next_send + self.interval > now else now + self.interval
            try:
                if out:
                    out = out[self._sock.send(out) :]
                ready, _, _ = select.select([self._sock], [], [], max(0.0, next_send - time.monotonic()))
                if not ready:
                    continue
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionResetError("EOF from the echo service")
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if not self.reconnect:
                    self.error = f"connection lost: {e}"
                    return
                lost = time.monotonic()
                self._reopen(deadline)
                if self._stop.is_set() or time.monotonic() > deadline:
                    self.error = f"connection lost ({e}) and not re-established"
                    return
                self.reconnects.append((lost, time.monotonic()))
                # the new connection starts a fresh echo stream
                seq = expect = 0
                out, inbuf = b"", b""
                next_send = time.monotonic()
                continue
            got = time.monotonic()
            inbuf += data
            whole = len(inbuf) // MSG.size
            for i in range(whole):
                (value,) = MSG.unpack_from(inbuf, i * MSG.size)
                if value != expect:
                    self.error = f"echo out of order: got probe {value}, expected {expect}"
                    return
                expect += 1
                self.replies.append(got)
            inbuf = inbuf[whole * MSG.size :]

    def _reopen(self, deadline: float) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._sock = self._open(0.2)
                return
            except OSError:
                time.sleep(0.01)


# --- the raw-CRIU floor: small helpers -------------------------------------------------------------------


def _say(kind: str, data: dict[str, Any]) -> None:
    print(f"{kind} {json.dumps(data)}", flush=True)


def _listening(port: int, address: str) -> bool:
    """Whether this netns has a TCP socket listening on address:port (or on 0.0.0.0:port)."""
    wanted = {f"{int.from_bytes(socket.inet_aton(a), 'little'):08X}:{port:04X}" for a in (address, "0.0.0.0")}
    lines = Path("/proc/self/net/tcp").read_text().splitlines()[1:]
    return any(f[1] in wanted and f[3] == "0A" for f in (line.split() for line in lines))


def _wait(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g}s")
        time.sleep(0.002)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


def _run(argv: list[str], timeout: float, log: Path | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip()
        if log is not None:
            detail += f"\n--- {log} (last lines) ---\n{_tail(log)}"
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{detail}")


def _pages_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.glob("pages-*.img"))


# The pre-resume action script: every task is restored but none runs yet, and the network is still locked
# (CRIU unlocks it right after this point). What vzpy does on the destination host, minus its Python: the
# veth end up with proxy ARP and forwarding, a /32 route per CT address, and a gratuitous ARP from eth0.
ACTION_SCRIPT = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = pre-resume ] || exit 0
set -e
ip link set dev {veth} up
echo 1 > /proc/sys/net/ipv4/conf/{veth}/proxy_arp
echo 1 > /proc/sys/net/ipv4/conf/{veth}/forwarding
{routes}
{unlock}
exec /usr/bin/python3 -I -S -c '{garp}' {uplink} {ips}
"""
GARP = (
    'import socket,sys;i=sys.argv[1];m=bytes.fromhex(open(f"/sys/class/net/{i}/address").read().strip()'
    '.replace(":",""));s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);s.bind((i,0))\n'
    "for a in sys.argv[2:]:\n"
    ' p=socket.inet_aton(a);s.send(b"\\xff"*6+m+b"\\x08\\x06\\x00\\x01\\x08\\x00\\x06\\x04\\x00\\x01"'
    "+m+p+bytes(6)+p)"
)


# --- the raw-CRIU floor: destination half ------------------------------------------------------------------


def floor_dst(spec: dict[str, Any]) -> None:
    """Runs inside the destination host. Everything before "ready" is preparation that a tool can do
    while the CT still runs on the source; everything after it is in the timed, frozen part."""
    from vzpy import netlock
    from vzpy.config import GlobalConfig
    from vzpy.container import Container
    from vzpy.lifecycle import mount_root

    ctid, criu, address = spec["ctid"], spec["criu"], spec["address"]
    images, logs = Path(spec["images"]), Path(spec["logs"])
    images.mkdir(mode=0o700, parents=True)
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    ct = Container(ctid, GlobalConfig.load())
    mount_root(ct)  # bind mount of the private area on VE_ROOT, private propagation
    ct.cgroups.create()
    ct.cgroups.apply(ct.limits)
    script = logs / "action-script"
    # with network_lock skip the CT carries vzpy's own lock table (vzpy.netlock), restored with its netns
    unlock = (
        f'nsenter --net=/proc/"$CRTOOLS_INIT_PID"/ns/net -- nft delete table inet {netlock.TABLE}'
        if spec["network_lock"] == "skip"
        else ""
    )
    routes = "\n".join(f"ip route replace {ip}/32 dev {ct.veth} scope link" for ip in ct.ips)
    script.write_text(
        ACTION_SCRIPT.format(
            veth=ct.veth, routes=routes, garp=GARP, uplink=spec["uplink"], ips=" ".join(ct.ips), unlock=unlock
        )
    )
    script.chmod(0o755)

    server = subprocess.Popen(
        [criu, "page-server", "-D", str(images), "-W", str(logs), "-o", "page-server.log", "-v4",
         "--address", address, "--port", str(spec["page_server_port"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    listener = socket.create_server((address, spec["images_port"]))
    try:
        _wait(lambda: _listening(spec["page_server_port"], address), 10, "criu page-server listening", server)
        _say("ready", {"veth": ct.veth, "ips": ct.ips})

        listener.settimeout(spec["timeout"])
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(True)  # tar reads the fd itself: no O_NONBLOCK (the run() timeout bounds it)
            received = time.monotonic()
            # the source sends a tar stream of its images dir, then closes
            untar = subprocess.run(["tar", "-x", "-C", str(images)], stdin=conn, capture_output=True, timeout=60)
            if untar.returncode != 0:
                raise RuntimeError(f"tar -x of the images failed: {untar.stderr.decode(errors='replace')}")
        images_in = time.monotonic()
        try:
            server.wait(timeout=spec["timeout"])
        except subprocess.TimeoutExpired:
            raise RuntimeError("criu page-server did not finish") from None
        if server.returncode != 0:
            raise RuntimeError(f"criu page-server failed ({server.returncode}):\n{_tail(logs / 'page-server.log')}")
        pages_in = time.monotonic()

        restore_start = time.monotonic()
        remaps = images / REMAPS_DIR
        for path in (p for p in remaps.rglob("*") if p.is_file()) if remaps.is_dir() else []:
            shutil.move(path, ct.private / path.relative_to(remaps))
        pidfile = logs / "restored.pid"
        argv = [criu, "restore", "-D", str(images), "-W", str(logs), "-o", "restore.log", "-v4",
                "--root", str(ct.root), "--tcp-established", "--file-locks",
                "--network-lock", spec["network_lock"], "--manage-cgroups=soft",
                "--veth-pair", f"eth0={ct.veth}", "--action-script", str(script),
                "--restore-detached", "--pidfile", str(pidfile)]  # fmt: skip
        for controller in CONTROLLERS:  # this host's CGROUP_PARENT, not the source's
            argv += ["--cgroup-root", f"{controller}:/{ct.cgroups.parent}/{ctid}"]
        _run(argv, spec["timeout"], logs / "restore.log")
        restore_end = time.monotonic()
        _say(
            "result",
            {
                "images_connected": received,
                "images_in": images_in,
                "pages_in": pages_in,
                "restore_start": restore_start,
                "restore_end": restore_end,
                "pages_bytes": _pages_bytes(images),
                "pid": int(pidfile.read_text()),
            },
        )
    finally:
        listener.close()
        if server.poll() is None:
            server.kill()
            server.wait(5)


# --- the raw-CRIU floor: source half -----------------------------------------------------------------------


def floor_src(spec: dict[str, Any]) -> None:
    """Runs inside the source host: criu dump with pages to the destination's page server, then the other
    images (tiny) to the destination's listener as a tar stream."""
    criu, images, logs = spec["criu"], Path(spec["images"]), Path(spec["logs"])
    images.mkdir(mode=0o700, parents=True)
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = spec["network_lock"]
    start = time.monotonic()
    if lock == "skip":  # vzpy's own lock: an nftables table in the CT's netns, dumped with it
        from vzpy import netlock

        netlock.lock(spec["pid"])
    argv = [criu, "dump", "-t", str(spec["pid"]), "-D", str(images), "-W", str(logs), "-o", "dump.log", "-v4",
            "--tcp-established", "--file-locks", "--link-remap", "--network-lock", lock,
            *_freeze_cgroup(spec["freezer"]),
            "--manage-cgroups=soft",
            "--page-server", "--address", spec["dst_address"], "--port", str(spec["page_server_port"])]  # fmt: skip
    _run(argv, spec["timeout"], logs / "dump.log")
    dumped = time.monotonic()
    # the files CRIU linked into the CT's tree (--link-remap) go along with the images, for b's tree
    from vzpy.criu.images import linked_remaps

    for name in linked_remaps(images):
        relative = name.lstrip("/")
        (images / REMAPS_DIR / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(spec["private"], relative), images / REMAPS_DIR / relative, follow_symlinks=False)
    with socket.create_connection((spec["dst_address"], spec["images_port"]), timeout=10) as sock:
        tar = subprocess.Popen(["tar", "-c", "-C", str(images), "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        sent = 0
        while chunk := tar.stdout.read(1 << 16):
            sock.sendall(chunk)
            sent += len(chunk)
        if tar.wait(timeout=30) != 0:
            raise RuntimeError(f"tar -c of {images} failed ({tar.returncode})")
        sock.shutdown(socket.SHUT_WR)
    _say("result", {"dump_start": start, "dump_end": dumped, "images_sent": time.monotonic(), "tar_bytes": sent})


def _freeze_cgroup(freezer: str) -> list[str]:
    """CRIU's --freeze-cgroup, unless a task of the CT is stopped (SIGSTOP): a task both stopped and frozen
    hangs CRIU in ptrace_attach (vzpy's dump_images has CRIU seize such a tree itself, and so does this)."""
    for pid in Path(freezer, "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/wchan").read_text().strip() == "do_signal_stop":
                return []
    return ["--freeze-cgroup", freezer]


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("floor-src", "floor-dst"):
        print(f"usage: {argv[0]} floor-src|floor-dst SPEC_JSON", file=sys.stderr)
        return 2
    try:
        (floor_src if argv[1] == "floor-src" else floor_dst)(json.loads(argv[2]))
    except Exception as e:
        print(f"{argv[1]}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
