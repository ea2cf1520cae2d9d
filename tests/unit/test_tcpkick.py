"""vzpy.runtime.tcpkick's pure parts: which frames are held, how many, their file and wire forms, checksums.

The holder and the delivery themselves (raw sockets, root) are tested in tests/integration/test_tcp_outage.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vzpy.container import start_ticks
from vzpy.runtime import tcpkick

MACS = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")


def tcp_segment(sport: int, dport: int, seq: int, payload: bytes = b"", checksum: int = 0) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, checksum, 0)
    return header + payload


def ipv4_frame(src: str, dst: str, segment: bytes, pad: int = 0) -> bytes:
    total = 20 + len(segment)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, _ip(src), _ip(dst))
    return MACS + b"\x08\x00" + header + segment + b"\0" * pad


def ipv6_frame(src: str, dst: str, segment: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 6, 64, _ip(src), _ip(dst))
    return MACS + b"\x86\xdd" + header + segment


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def frame_from(port: int, seq: int = 1, payload: bytes = b"data") -> bytes:
    return ipv4_frame("10.0.0.200", "10.0.0.101", tcp_segment(port, 7001, seq, payload))


def checksum_ok(frame: bytes) -> bool:
    """The TCP checksum verifies: the ones' complement sum over pseudo-header and segment is 0."""
    if frame[12:14] == b"\x08\x00":
        ip = frame[14:]
        total = int.from_bytes(ip[2:4], "big")
        segment, addresses = ip[20:total], ip[12:20]
    else:
        ip = frame[14:]
        segment, addresses = ip[40 : 40 + int.from_bytes(ip[4:6], "big")], ip[8:40]
    pseudo = addresses + struct.pack("!IxxxB", len(segment), 6)
    return tcpkick._ones_complement_sum(pseudo + segment) == 0


def test_only_tcp_over_ip_is_a_flow() -> None:
    frame = frame_from(40000)
    assert tcpkick.tcp_flow(frame) == (_ip("10.0.0.200"), _ip("10.0.0.101"), struct.pack("!HH", 40000, 7001))
    udp = bytearray(frame)
    udp[14 + 9] = 17
    arp = MACS + b"\x08\x06" + b"\0" * 28
    assert tcpkick.tcp_flow(bytes(udp)) is None
    assert tcpkick.tcp_flow(arp) is None
    assert tcpkick.tcp_flow(frame[:30]) is None
    six = ipv6_frame("fd00::200", "fd00::101", tcp_segment(40000, 7001, 5))
    assert tcpkick.tcp_flow(six) == (_ip("fd00::200"), _ip("fd00::101"), struct.pack("!HH", 40000, 7001))


def test_held_keeps_the_latest_of_each_connection_and_a_bounded_total() -> None:
    held = tcpkick.Held(max_frames=5, per_flow=2)
    for seq in range(4):
        assert held.add(frame_from(1000, seq))
    assert [f for _, f in held.frames] == [frame_from(1000, 2), frame_from(1000, 3)]
    for port in range(2000, 2004):
        held.add(frame_from(port))
    assert len(held.frames) == 5 and held.frames[-1][1] == frame_from(2003)
    assert frame_from(1000, 2) not in [f for _, f in held.frames]  # the oldest went first
    assert not held.add(MACS + b"\x08\x06" + b"\0" * 28)


def test_held_bytes_are_bounded() -> None:
    held = tcpkick.Held(max_bytes=3 * len(frame_from(1)))
    for port in range(10):
        held.add(frame_from(port))
    assert [f for _, f in held.frames] == [frame_from(7), frame_from(8), frame_from(9)]


def test_a_frame_bigger_than_a_jumbo_frame_is_not_held() -> None:
    assert not tcpkick.Held().add(frame_from(1, payload=b"x" * tcpkick.MAX_FRAME))


def test_the_holders_file_round_trips_and_a_damaged_one_keeps_what_is_whole() -> None:
    held = tcpkick.Held()
    frames = [frame_from(port) for port in range(3)]
    for frame in frames:
        held.add(frame)
    data = held.dump()
    assert tcpkick.parse(data) == frames
    assert tcpkick.parse(data[:-1]) == frames[:2]
    assert tcpkick.parse(b"") == []
    assert tcpkick.parse(b"\x00\x05hello" + data) == []  # not a TCP frame: nothing after it is trusted


def test_the_wire_form_rejects_what_is_not_a_held_frame() -> None:
    frames = [frame_from(port) for port in range(3)]
    assert tcpkick.decode(tcpkick.encode(frames)) == frames
    junk = ["%%%", base64.b64encode(b"not a frame").decode(), 7, None, "A" * (3 * tcpkick.MAX_FRAME)]
    assert tcpkick.decode([*junk, *tcpkick.encode(frames[:1])]) == frames[:1]
    assert tcpkick.decode("not a list") == []
    assert tcpkick.decode(None) == []
    many = tcpkick.encode(frame_from(port) for port in range(tcpkick.MAX_FRAMES + 10))
    assert len(tcpkick.decode(many)) == tcpkick.MAX_FRAMES


def test_the_checksum_is_computed_over_what_the_ip_header_says_not_the_padding() -> None:
    # a small frame captured on its way out: only the pseudo-header's partial sum, and Ethernet padding
    frame = ipv4_frame("10.0.0.200", "10.0.0.101", tcp_segment(40000, 7001, 9, b"ping", checksum=0x1724), pad=6)
    fixed = tcpkick.with_checksum(frame)
    assert len(fixed) == len(frame) and fixed[:50] == frame[:50] and fixed[52:] == frame[52:]
    assert checksum_ok(fixed) and not checksum_ok(frame)
    six = tcpkick.with_checksum(ipv6_frame("fd00::200", "fd00::101", tcp_segment(1, 2, 3, b"odd")))
    assert checksum_ok(six)
    assert tcpkick.with_checksum(fixed) == fixed


def fake_ct(tmp_path: Path) -> Any:
    return SimpleNamespace(ctid="101", gconf=SimpleNamespace(lockdir=tmp_path))


def test_release_returns_what_a_holder_that_ended_wrote_and_forgets_it(tmp_path: Path) -> None:
    """A holder whose CT was killed (chkpnt --kill) ended by itself: restore delivers what it wrote."""
    held = tcpkick.Held()
    held.add(frame_from(40000))
    (tmp_path / "101.tcphold").write_bytes(held.dump())
    gone = {"pid": 2**22 + 1, "start_ticks": 1}  # above pid_max's default: no such process
    (tmp_path / "101.tcphold.json").write_text(json.dumps(gone))
    assert tcpkick.release(fake_ct(tmp_path)) == [frame_from(40000)]
    assert list(tmp_path.iterdir()) == []
    assert tcpkick.release(fake_ct(tmp_path)) == []


def test_a_record_whose_pid_is_another_process_now_is_not_signalled(tmp_path: Path) -> None:
    me = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()) + 1}
    (tmp_path / "101.tcphold.json").write_text(json.dumps(me))
    tcpkick.discard(fake_ct(tmp_path))  # this test process would die of the SIGTERM
    assert list(tmp_path.iterdir()) == []
