"""Hold what peers send to a frozen CT, and deliver it to the CT the moment it runs again.

A suspended CT's network is locked (vzpy.netlock): what peers send it is dropped, without a reset. A peer
whose segment was dropped sends it again when its retransmission timer fires, and that timer doubles at
every try (RTO 0.2 s, 0.4, 0.8, 1.6 ...): after a freeze of 1.6 s a peer's next try may come 1.6 s after the
CT runs again, so the outage it sees is up to twice the freeze. Nothing from the CT's side makes a Linux
peer retransmit sooner: it ignores duplicate ACKs for loss detection on a SACK connection, and a
request/response client has a single segment in flight. What makes it go on at once is an ACK of the
data it sent.

So from suspend to resume a holder process keeps a copy of every TCP segment the host sends into the CT's
veth (captured on the host's end of it: after the host's firewall, so only what the host delivered to the
CT anyway), the latest few per connection. When the CT runs again (here, or on a migration's destination)
the copies are sent into its veth: the CT's TCP answers each at once, acknowledging the peer's data whether
it got it before the freeze or only now, and that ACK of new data resets the peer's backoff and lets it go
on. A copy of data the CT already has is a duplicate its TCP discards. A held SYN is answered as well,
instead of at the client's next try (1, 3, 7 s).

The holder is its own process (a CT may stay suspended across vzpy invocations) with a deadline. It needs
only the standard library and runs as a script (`python -I -S tcpkick.py hold ...`), up in a few tens of
ms. Holding is best effort: a holder that cannot start never stops a checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vzpy.container import Container, RunState

HOLD_SECONDS = 3600.0  # a holder captures at most this long: a CT left suspended longer gets nothing more
STOP_TIMEOUT = 5.0  # for a holder to write what it held and exit
MAX_FRAMES = 1024  # held in all
MAX_BYTES = 1 << 20  # held in all: they travel in one message of a migration (protocol.MAX_LINE is 4 MiB)
MAX_PER_FLOW = 8  # the latest of one connection (its latest retransmissions)
MAX_FRAME = 9216 + 14  # a jumbo frame; a bigger (GRO-merged) one could not be sent again whole
ETH_P_ALL = 0x0003
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
IPPROTO_TCP = 6
PACKET_OUTGOING = 4  # what this host sends on the interface (into the CT)
_LENGTH = struct.Struct("!H")

Flow = tuple[bytes, bytes, bytes]  # source address, destination address, both ports


# --- frames -----------------------------------------------------------------------------------------------


def tcp_flow(frame: bytes) -> Flow | None:
    """The connection an Ethernet frame's TCP segment belongs to; None for anything else."""
    if len(frame) < ETH_HLEN + 20:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[ETH_HLEN:]
    if ethertype == ETHERTYPE_IPV4 and ip[0] >> 4 == 4 and ip[9] == IPPROTO_TCP:
        header = (ip[0] & 0x0F) * 4
        if header >= 20 and len(ip) >= header + 20:
            return ip[12:16], ip[16:20], ip[header : header + 4]
    elif ethertype == ETHERTYPE_IPV6 and len(ip) >= 40 + 20 and ip[0] >> 4 == 6 and ip[6] == IPPROTO_TCP:
        return ip[8:24], ip[24:40], ip[40:44]
    return None


def with_checksum(frame: bytes) -> bytes:
    """The frame with its TCP checksum computed. A segment captured on its way out often has only the
    pseudo-header's sum there (checksum offload: the sum is finished where the frame is transmitted, never,
    for a veth), which the CT's TCP would drop when the frame comes to it as received data."""
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[ETH_HLEN:]
    if ethertype == ETHERTYPE_IPV4:
        header, total = (ip[0] & 0x0F) * 4, int.from_bytes(ip[2:4], "big")
        addresses, end = ip[12:20], total
    else:
        header, end = 40, 40 + int.from_bytes(ip[4:6], "big")
        addresses = ip[8:40]
    segment = bytearray(ip[header:end])
    if len(segment) < 20:
        return frame
    segment[16:18] = b"\0\0"
    pseudo = addresses + struct.pack("!IxxxB", len(segment), IPPROTO_TCP)
    segment[16:18] = _ones_complement_sum(pseudo + segment).to_bytes(2, "big")
    return frame[: ETH_HLEN + header] + bytes(segment) + frame[ETH_HLEN + end :]


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Held:
    """The frames kept, oldest first: at most MAX_PER_FLOW per connection, MAX_FRAMES and MAX_BYTES in all."""

    def __init__(self, max_frames: int = MAX_FRAMES, per_flow: int = MAX_PER_FLOW, max_bytes: int = MAX_BYTES) -> None:
        self.max_frames = max_frames
        self.per_flow = per_flow
        self.max_bytes = max_bytes
        self.frames: list[tuple[Flow, bytes]] = []
        self.size = 0

    def add(self, frame: bytes) -> bool:
        flow = tcp_flow(frame)
        if flow is None or len(frame) > MAX_FRAME:
            return False
        self.frames.append((flow, frame))
        self.size += len(frame)
        same = [i for i, (other, _) in enumerate(self.frames) if other == flow]
        if len(same) > self.per_flow:
            self._drop(same[0])
        while len(self.frames) > self.max_frames or self.size > self.max_bytes:
            self._drop(0)
        return True

    def _drop(self, index: int) -> None:
        self.size -= len(self.frames.pop(index)[1])

    def dump(self) -> bytes:
        return b"".join(_LENGTH.pack(len(frame)) + frame for _, frame in self.frames)


def parse(data: bytes) -> list[bytes]:
    """The frames of a holder's file; a truncated or foreign file yields the whole frames before the damage."""
    frames, at = [], 0
    while at + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        frame = data[at + _LENGTH.size : at + _LENGTH.size + size]
        if len(frame) != size or tcp_flow(frame) is None:
            break
        frames.append(frame)
        at += _LENGTH.size + size
    kept = Held()
    for frame in frames:
        kept.add(frame)
    return [frame for _, frame in kept.frames]


def encode(frames: Iterable[bytes]) -> list[str]:
    """Frames as JSON can carry them (a migration's resume request)."""
    return [base64.b64encode(frame).decode() for frame in frames]


def decode(value: object) -> list[bytes]:
    """Frames from encode(), checked: anything but a list of base64 TCP frames is left out."""
    if not isinstance(value, list):
        return []
    kept = Held()
    for item in value[-MAX_FRAMES:]:
        if not isinstance(item, str) or len(item) > 2 * MAX_FRAME:
            continue
        with contextlib.suppress(binascii.Error, ValueError):
            kept.add(base64.b64decode(item, validate=True))
    return [frame for _, frame in kept.frames]


# --- the holder (run as a script) -------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop(_signum: int, _frame: object) -> None:
    raise _Stop


def hold_main(ifname: str, out: Path, seconds: float) -> int:
    """Capture what this host sends into `ifname` until SIGTERM, the deadline or the interface's end; then
    write the held frames to `out` (atomically) and exit."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    held = Held()
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, ETH_P_ALL))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], min(left, 1.0))[0]:
                continue
            frame, address = sock.recvfrom(1 << 16)
            if address[2] == PACKET_OUTGOING:
                held.add(frame)
    except _Stop:
        pass
    except OSError:  # the interface went away (the CT was killed): keep what was held
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the file short
    with contextlib.suppress(OSError):
        _write(out, held.dump())
    return 0


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- holding for a CT, and delivering -----------------------------------------------------------------------


def _paths(ct: Container) -> tuple[Path, Path]:
    """(the running holder's record, the frames it wrote) in the CT's LOCKDIR."""
    base = ct.gconf.lockdir / f"{ct.ctid}.tcphold"
    return base.with_name(base.name + ".json"), base


def hold(ct: Container, veth: str) -> bool:
    """Start holding what peers send into the CT's veth `veth`; False if no holder could be started."""
    from vzpy import proc
    from vzpy.container import start_ticks
    from vzpy.errors import VzError

    discard(ct)
    record, out = _paths(ct)
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), "hold", veth, str(out), str(HOLD_SECONDS)]
    try:
        # not waited for: its start-up (0.02-0.2 s) would count as frozen time; a peer's first packets
        # after the lock may go uncaptured, its retransmissions while the CT is frozen are not
        child = proc.spawn(argv, timeout=None, what="the TCP holder", new_session=True)
    except VzError:
        return False
    try:
        _write(record, json.dumps({"pid": child.pid, "start_ticks": start_ticks(child.pid)}).encode())
    except (OSError, ValueError, IndexError):
        child.close()
        discard(ct)
        return False
    return True


def release(ct: Container) -> list[bytes]:
    """Stop the CT's holder; the frames it held (oldest first). Nothing held: []."""
    record, out = _paths(ct)
    _stop_holder(record)
    try:
        data = out.read_bytes()
    except OSError:
        data = b""
    discard(ct)
    return parse(data)


def discard(ct: Container) -> None:
    """Stop the CT's holder, if any, and forget what it held."""
    record, out = _paths(ct)
    _stop_holder(record)
    for path in (record, out, out.with_name(out.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stop_holder(record: Path) -> None:
    """SIGTERM the holder `record` names (it then writes what it held and exits); bounded by STOP_TIMEOUT."""
    from vzpy.container import start_ticks

    try:
        info = json.loads(record.read_text())
        pid, ticks = int(info["pid"]), int(info["start_ticks"])
        if start_ticks(pid) != ticks:
            return  # it ended long ago; the pid is another process's now
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid, ticks):
        time.sleep(0.002)
    if _alive(pid, ticks):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        _alive(pid, ticks)


def _alive(pid: int, ticks: int) -> bool:
    """Whether the holder still runs; reaps it when it is this process's child and has exited."""
    from vzpy.container import start_ticks

    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return start_ticks(pid) == ticks and stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def deliver(ct: Container, frames: Sequence[bytes], state: RunState | None = None) -> int:
    """Send held frames into the running CT's veth, in the order they came; how many went. Best effort: a CT
    that is gone, or a veth that is not there, gets nothing."""
    if not frames:
        return 0
    state = state or ct.load_state()
    veth = state.veth or ct.veth
    try:
        # a restored CT's eth0 may have another address than the one the frames were captured for
        ours, theirs = _mac(veth), _ct_mac(state.init_pid)
    except Exception:  # pyroute2 raises its own errors too: a CT whose eth0 cannot be read gets nothing
        return 0
    sent = 0
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((veth, 0))
            for frame in frames:
                with contextlib.suppress(OSError):
                    sock.send(theirs + ours + with_checksum(frame)[12:])
                    sent += 1
    except OSError:
        pass
    return sent


def _mac(ifname: str) -> bytes:
    return bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))


def _ct_mac(init_pid: int) -> bytes:
    """The hardware address of the CT's eth0 (the CT's to set: frames to a wrong one just do not arrive)."""
    from pyroute2 import IPRoute

    from vzpy.runtime.network import CT_IFNAME

    with IPRoute(netns=f"/proc/{init_pid}/ns/net", flags=0) as ipr:
        link = ipr.get_links(ifname=CT_IFNAME)[0]
        return bytes.fromhex(str(link.get_attr("IFLA_ADDRESS")).replace(":", ""))


def deliver_held(ct: Container, state: RunState) -> int:
    """Release the CT's holder here and deliver what it held (the CT runs on this host again)."""
    frames = release(ct)
    return deliver(ct, frames, state) if frames else 0


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[1] != "hold":
        print(f"usage: {argv[0]} hold IFNAME OUTFILE SECONDS", file=sys.stderr)
        return 2
    return hold_main(argv[2], Path(argv[3]), float(argv[4]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
