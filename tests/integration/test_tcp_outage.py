"""A client's outage is the CT's freeze, not the freeze stretched to the client's next backed-off retransmission.

A client (its own netns, default TCP settings: SACK, timestamps, no TCP_USER_TIMEOUT) sends a request to
the CT's echo service while the CT is frozen (chkpnt's suspend, or a migration's frozen phase). The
request is dropped by the CT's network lock, so the client's TCP retransmits it on its timer, backing off
(tcpi_backoff counts the doublings). The test waits until the client's next retransmission is at least
3.2 s away (backoff >= 4), notes how many retransmission timeouts the connection had (tcpi_total_rto),
then lets the CT run. The reply must come without one more: vzpy delivered the held request into the CT
as it resumed, and the CT's answer, not the client's timer, ended the outage. Without that the reply
comes only after the client's next timeout (tcpi_total_rto one higher). No wall-clock assertion: the
margin (>= 3.2 s until the next timeout, against the fraction of a second vzpy takes to resume) only
guards the counting.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vzpy_lab.netns import TestHost, TestNetwork
from vzpy_lab.workload.build import build_fidelity

pytestmark = pytest.mark.root
PORT = 7000  # fidelity's control port; PORT + 1 echoes
CTID = "131"
BACKOFF = 4  # the client's next retransmission is RTO x 2**4 >= 3.2 s away
REQUEST = b"ping-131"


@dataclass(frozen=True)
class TcpInfo:
    """The fields of Linux's struct tcp_info the test reads."""

    retransmits: int  # retransmission timeouts in a row, for the segment now at the head
    backoff: int
    total_rto: int  # retransmission timeouts in the connection's life (Linux >= 6.7)

    @classmethod
    def of(cls, sock: socket.socket) -> TcpInfo:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
        assert len(raw) >= 242, "this kernel's tcp_info has no tcpi_total_rto (Linux >= 6.7 has it)"
        (total_rto,) = struct.unpack_from("=H", raw, 240)
        return cls(retransmits=raw[2], backoff=raw[4], total_rto=total_rto)


def vzpy(host: TestHost, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = host.run(["vzpy", *args], timeout=timeout)
    assert result.returncode == 0, f"vzpy {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture
def echo_ct(host_a: TestHost, host_b: TestHost, test_network: TestNetwork, tmp_path_factory) -> Iterator[str]:
    """CT 131 on host_a running the fidelity workload (an echo service on PORT + 1); its address."""
    binary = build_fidelity(tmp_path_factory.getbasetemp() / "workload")
    ip = test_network.new_ct_address()
    vzpy(host_a, "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "kick.test")
    private = host_a.path(f"/vz/private/{CTID}")
    shutil.copy(binary, private / "usr" / "bin" / "fidelity")
    service = private / "etc" / "vzpy" / "services" / "fidelity"
    service.write_text(f"#!/bin/sh\nexec /usr/bin/fidelity -r {PORT}\n")
    service.chmod(0o755)
    vzpy(host_a, "start", CTID)
    try:
        yield ip
    finally:
        for host in (host_a, host_b):
            host.remove_ct(CTID)


def connect(network: TestNetwork, ip: str) -> socket.socket:
    """A connection from the client netns to the CT's echo service, default TCP settings, one round trip done."""
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = network.client_connect(ip, PORT + 1, timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, f"the CT's echo service on {ip}:{PORT + 1} never answered"
            time.sleep(0.2)
    sock.sendall(b"hello")
    assert receive(sock, 5, 10) == b"hello"
    return sock


def receive(sock: socket.socket, size: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size and (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            chunk = sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
    return data


def backed_off(sock: socket.socket, timeout: float = 30) -> TcpInfo:
    """Wait until the client's retransmission timer has doubled BACKOFF times for the unanswered request."""
    deadline = time.monotonic() + timeout
    while (info := TcpInfo.of(sock)).backoff < BACKOFF:
        assert time.monotonic() < deadline, f"the client's request was not retransmitted {BACKOFF} times: {info}"
        time.sleep(0.01)
    return info


def assert_answered_without_another_timeout(sock: socket.socket, before: TcpInfo) -> None:
    reply = receive(sock, len(REQUEST), 60)
    after = TcpInfo.of(sock)
    assert reply == REQUEST, f"no echo of the request that was held: {reply!r}"
    assert after.total_rto == before.total_rto, (
        f"the reply came only after the client's next retransmission timeout ({before} -> {after}): the request "
        "held while the CT was frozen was not delivered when it resumed"
    )
    assert after.backoff == 0  # acknowledged: the client's timer is back to its normal RTO


def test_a_resumed_ct_answers_what_it_was_sent_while_suspended(host_a, test_network, echo_ct) -> None:
    sock = connect(test_network, echo_ct)
    with sock:
        vzpy(host_a, "chkpnt", CTID, "--suspend")
        sock.sendall(REQUEST)
        before = backed_off(sock)
        vzpy(host_a, "chkpnt", CTID, "--resume")
        assert_answered_without_another_timeout(sock, before)


def test_a_restored_ct_answers_what_it_was_sent_before_its_dump(host_a, test_network, echo_ct) -> None:
    """chkpnt in stages, then restore: the request sent to the suspended CT (before the dump) is delivered
    to the restored one; the client's retransmissions during the restore are dropped by its lock."""
    sock = connect(test_network, echo_ct)
    with sock:
        vzpy(host_a, "chkpnt", CTID, "--suspend")
        sock.sendall(REQUEST)
        vzpy(host_a, "chkpnt", CTID, "--dump", "--kill")
        vzpy(host_a, "restore", CTID, "--undump")
        before = backed_off(sock)
        vzpy(host_a, "restore", CTID, "--resume")
        assert_answered_without_another_timeout(sock, before)


def test_a_migrated_ct_answers_what_it_was_sent_on_the_source(host_a, host_b, test_network, echo_ct) -> None:
    """The request reaches the source while the CT is frozen there; it is delivered on the destination."""
    sock = connect(test_network, echo_ct)
    with sock:
        argv = ["vzpy", "migrate", "--online", host_b.address, CTID]
        migration = host_a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        progress = Progress(migration)
        try:
            progress.wait_for("suspend: done")
            sock.sendall(REQUEST)
            progress.wait_for("restore on destination ...")
            os.kill(migration.pid, signal.SIGSTOP)  # the CT stays frozen until the client has backed off
            try:
                before = backed_off(sock)
            finally:
                os.kill(migration.pid, signal.SIGCONT)
            progress.wait_for("migrated to")
            assert migration.wait(60) == 0, progress.text()
        finally:
            if migration.poll() is None:
                migration.kill()
                migration.wait(30)
        assert_answered_without_another_timeout(sock, before)


class Progress:
    """The migration's output, read as it comes (no buffering that select cannot see)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.data = b""

    def text(self) -> str:
        return self.data.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.data:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.fd], [], [], left)[0], f"{text!r} never showed:\n{self.text()}"
            chunk = os.read(self.fd, 65536)
            assert chunk, f"the migration ended before {text!r} showed:\n{self.text()}"
            self.data += chunk
