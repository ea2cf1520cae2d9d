"""Clients for the fidelity workload (fidelity.c beside this module).

`FidelityClient` speaks the control protocol on PORT (one-line commands, replies end with "END");
`EchoStream` keeps one connection to the echo service on PORT+1 open, so that it can be carried across a
checkpoint/restore, and checks that every byte comes back complete and in order.
Every socket operation has a timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

ITEMS: tuple[str, ...] = (
    "memory",
    "cpu",
    "files",
    "pipes",
    "unix_sockets",
    "sysv_shm",
    "sysv_sem",
    "sysv_msg",
    "cwd",
    "signal_handlers",
    "pending_signals",
    "timers",
    "terminal",
    "credentials",
    "pids",
    "rlimits",
    "hostname",
    "stopped_task",
    "unlinked_linked_file",
    "tcp_send_queue",
)

# How to open a TCP connection: (host, port), timeout -> connected socket. The default connects from the
# caller's network namespace; tests pass one that connects from inside the workload's namespace.
Connector = Callable[[tuple[str, int], float], socket.socket]


class FidelityError(Exception):
    """The workload answered something unexpected, or not at all."""


class EchoError(FidelityError):
    """The echo connection broke: reset, timeout, early EOF or wrong bytes."""


def default_connect(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def sequence_bytes(start: int, length: int) -> bytes:
    """Bytes start..start+length of the echo test sequence (its period is far above 256)."""
    return bytes((i * 7 + (i >> 8) + (i >> 16) * 3) & 0xFF for i in range(start, start + length))


def _read_reply(sock: socket.socket) -> list[str]:
    buf = b""
    while not (buf == b"END\n" or buf.endswith(b"\nEND\n")):
        chunk = sock.recv(65536)
        if not chunk:
            raise FidelityError(f"connection closed mid-reply after {buf!r}")
        buf += chunk
    return buf.decode(errors="replace").splitlines()[:-1]


class FidelityClient:
    """Control client: a fresh connection per command, so it works before and after a restore alike."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, connect: Connector = default_connect) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self._connect = connect

    def command(self, line: str) -> list[str]:
        """Send one command; return the reply lines without the final "END"."""
        with self._connect(self.address, self.timeout) as sock:
            sock.settimeout(self.timeout)
            sock.sendall(line.encode() + b"\n")
            return _read_reply(sock)

    def ping(self) -> bool:
        return self.command("PING") == ["PONG"]

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll PING until the workload answers (it listens only once its setup is done)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ping():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise FidelityError(f"no PONG from {self.address} within {timeout} s")
            time.sleep(0.1)

    def verify(self) -> dict[str, tuple[bool, str]]:
        """Item name -> (ok, detail). Raises if an item is missing or a line is malformed."""
        result: dict[str, tuple[bool, str]] = {}
        for line in self.command("VERIFY"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[0] != "ITEM" or parts[2] not in ("ok", "FAIL"):
                raise FidelityError(f"malformed VERIFY line: {line!r}")
            result[parts[1]] = (parts[2] == "ok", parts[3] if len(parts) > 3 else "")
        missing = set(ITEMS) - set(result)
        if missing:
            raise FidelityError(f"VERIFY did not report {sorted(missing)}")
        return result

    def info(self) -> dict[str, str]:
        pairs = (line.split(" ", 1) for line in self.command("INFO"))
        return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def failures(result: dict[str, tuple[bool, str]]) -> dict[str, str]:
    """The failed items of a VERIFY result with their details."""
    return {name: detail for name, (ok, detail) in result.items() if not ok}


class EchoStream:
    """One long-lived connection to the echo service; `total` counts the bytes verified so far."""

    CHUNK = 16384

    def __init__(self, host: str, port: int, timeout: float = 20.0, connect: Connector = default_connect) -> None:
        self.timeout = timeout
        self.total = 0
        self.sock = connect((host, port), timeout)
        self.sock.settimeout(timeout)

    def exchange(self, n_bytes: int) -> None:
        """Send the next n_bytes of the sequence; each chunk must come back whole and in order."""
        end = self.total + n_bytes
        while self.total < end:
            chunk = sequence_bytes(self.total, min(self.CHUNK, end - self.total))
            try:
                self.sock.sendall(chunk)
                got = self._recv_exactly(len(chunk))
            except TimeoutError as exc:
                raise EchoError(f"timeout after {self.total} verified bytes") from exc
            except OSError as exc:
                raise EchoError(f"{exc.__class__.__name__} after {self.total} verified bytes: {exc}") from exc
            if got != chunk:
                bad = next(i for i, (a, b) in enumerate(zip(got, chunk, strict=True)) if a != b)
                raise EchoError(f"byte {self.total + bad} differs: got {got[bad]}, want {chunk[bad]}")
            self.total += len(chunk)

    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EchoError(f"EOF after {self.total + len(buf)} bytes")
            buf += part
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EchoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirtierError(FidelityError):
    """The dirtier's memory is not what it must be, or it did not answer."""


def ask_line(host: str, port: int, connect: Connector, timeout: float) -> bytes:
    """Connect and read the one line a workload answers with (dirtier.c, forker.c); what came if it closes early."""
    with connect((host, port), timeout) as sock:
        sock.settimeout(timeout)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(512)
            if not chunk:
                break
            reply += chunk
    return reply


def dirtier_generation(host: str, port: int, connect: Connector = default_connect, timeout: float = 60.0) -> int:
    """Every page of the dirtier's memory (dirtier.c) holds what it must: its rewrite generation."""
    reply = ask_line(host, port, connect, timeout)
    words = reply.decode(errors="replace").split()
    if words[:1] != ["OK"] or len(words) < 2:
        raise DirtierError(f"the dirtier's memory is not intact: {reply!r}")
    return int(words[1])


def wait_for_dirtier(host: str, port: int, connect: Connector = default_connect, timeout: float = 120.0) -> int:
    """dirtier_generation once the dirtier listens (a service starts after `vzpy start` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dirtier_generation(host, port, connect)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
