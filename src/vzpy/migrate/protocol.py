"""The migration protocol between `vzpy migrate` (source) and `vzpy migrate-agent` (destination).

JSON lines over the agent's stdin/stdout (an SSH exec channel): one object per line, ASCII-only JSON so a
line never contains a raw newline. A request is {"v": MAJOR, "id": N, "op": NAME, ...arguments}; its
reply is {"id": N, "ok": true, ...results} or {"id": N, "ok": false, "error": MESSAGE, "exit_code": CODE,
"detail": TEXT}. The first request is `hello`, which carries both sides' [major, minor]: a different major
is refused (by the agent, and again by the client); minors are compatible both ways, the lower one says
which optional features both sides know.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Mapping
from typing import Any, Protocol

from vzpy import __version__
from vzpy.errors import VzError
from vzpy.migrate import (
    ConnectionBroken,
    ConnectionTimeout,
    IncompatibleVersion,
    ProtocolError,
    error_for_code,
)

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2  # 1.1: recover_state/recover_commit, resume/start commit themselves, no commit op
# 1.2: restore takes the dump's other images with it (one round trip less while the CT is frozen)
PROTOCOL_VERSION = (PROTOCOL_MAJOR, PROTOCOL_MINOR)
MAX_LINE = 4 << 20
READ_SIZE = 65536
DEFAULT_TIMEOUT = 60.0

Message = dict[str, Any]


class Stream(Protocol):
    """A byte stream: read returns b"" at EOF and raises TimeoutError when `timeout` runs out."""

    def read(self, size: int, timeout: float | None) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def describe_end(self) -> str: ...


class FdStream:
    """Two file descriptors (the agent's stdin and stdout, or a socketpair in tests)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def read(self, size: int, timeout: float | None) -> bytes:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"nothing to read within {timeout:g}s")
        return os.read(self.read_fd, size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass

    def describe_end(self) -> str:
        return ""


# --- framing -------------------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"migration protocol error: not a JSON line: {line[:80]!r}") from e
    if not isinstance(message, dict):
        raise ProtocolError(f"migration protocol error: expected a JSON object, got {line[:80]!r}")
    return message


class Connection:
    """Send and receive protocol messages over a Stream."""

    def __init__(self, stream: Stream, *, peer: str = "the peer") -> None:
        self.stream = stream
        self.peer = peer
        self._buffer = bytearray()
        self._eof = False

    def send(self, message: Mapping[str, Any]) -> None:
        try:
            self.stream.write(encode(message))
        except OSError as e:
            raise ConnectionBroken(f"connection to {self.peer} broken while sending: {e}") from e

    def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message | None:
        """The next message; None at EOF. ConnectionTimeout if none arrives within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (end := self._buffer.find(b"\n")) < 0:
            if self._eof:
                self._end_of_stream()
                return None
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError(f"migration protocol error: a line from {self.peer} exceeds {MAX_LINE} bytes")
            self._fill(deadline)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return decode(line)

    def close(self) -> None:
        self.stream.close()

    def _fill(self, deadline: float | None) -> None:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            chunk = self.stream.read(READ_SIZE, left)
        except TimeoutError as e:
            raise ConnectionTimeout(f"{self.peer} did not answer within {left:g}s") from e
        except OSError as e:
            raise ConnectionBroken(f"connection to {self.peer} broken: {e}") from e
        if chunk:
            self._buffer += chunk
        else:
            self._eof = True

    def _end_of_stream(self) -> None:
        if self._buffer.strip():
            raise ConnectionBroken(f"connection to {self.peer} closed in the middle of a message")
        return None


# --- messages ------------------------------------------------------------------------------------------


def request(op: str, request_id: int, **args: Any) -> Message:
    return {"v": PROTOCOL_MAJOR, "id": request_id, "op": op, **args}


def ok_reply(request_id: int | None, **results: Any) -> Message:
    return {"id": request_id, "ok": True, **results}


def error_reply(request_id: int | None, error: VzError) -> Message:
    return {"id": request_id, "ok": False, "error": error.message, "exit_code": error.exit_code, "detail": error.detail}


def parse_version(value: Any) -> tuple[int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(n, int) for n in value)):
        raise ProtocolError(f"migration protocol error: bad protocol version {value!r}, expected [major, minor]")
    return int(value[0]), int(value[1])


def check_compatible(theirs: tuple[int, int], *, ours: tuple[int, int] = PROTOCOL_VERSION, peer: str) -> None:
    """IncompatibleVersion (exit 17) unless both majors are equal."""
    if theirs[0] != ours[0]:
        raise IncompatibleVersion(
            f"{peer} speaks migration protocol {theirs[0]}.{theirs[1]}, this vzpy {ours[0]}.{ours[1]}: "
            "install the same vzpy version on both hosts"
        )


def negotiated(theirs: tuple[int, int], ours: tuple[int, int] = PROTOCOL_VERSION) -> tuple[int, int]:
    """The version both sides speak: the common major and the lower minor."""
    return ours[0], min(ours[1], theirs[1])


# --- the client side -----------------------------------------------------------------------------------


class Client:
    """The source's end: one request at a time, replies matched by id. After a timeout or a broken
    connection the client is unusable (a late reply could be taken for the next request's)."""

    def __init__(self, connection: Connection, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.connection = connection
        self.timeout = timeout
        self.version: tuple[int, int] | None = None
        self._next_id = 1
        self._broken: VzError | None = None

    @property
    def peer(self) -> str:
        return self.connection.peer

    @property
    def usable(self) -> bool:
        return self._broken is None

    def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Message:
        """Send one request and return its reply's results; the agent's error is raised with its exit code."""
        if self._broken is not None:
            raise ConnectionBroken(f"connection to {self.peer} is unusable after: {self._broken.message}")
        request_id = self._next_id
        self._next_id += 1
        wait = self.timeout if timeout is None else timeout
        try:
            self.connection.send(request(op, request_id, **args))
            reply = self.connection.receive(wait)
        except ConnectionTimeout as e:
            self._broken = ConnectionTimeout(f"{self.peer} did not answer {op} within {wait:g}s")
            raise self._broken from e
        except (ConnectionBroken, ProtocolError) as e:
            self._broken = e
            raise
        if reply is None:
            self._broken = self._gone(op)
            raise self._broken
        return self._result(op, request_id, reply)

    def hello(self, *, timeout: float | None = None, **extra: Any) -> Message:
        """Negotiate the protocol version; the agent's facts about its host."""
        reply = self.call("hello", timeout=timeout, proto=list(PROTOCOL_VERSION), vzpy=__version__, **extra)
        theirs = parse_version(reply.get("proto"))
        check_compatible(theirs, peer=f"vzpy on {self.peer}")
        self.version = negotiated(theirs)
        return reply

    def close(self) -> None:
        self.connection.close()

    def _result(self, op: str, request_id: int, reply: Message) -> Message:
        if reply.get("id") != request_id:
            self._broken = ProtocolError(f"migration protocol error: reply {reply.get('id')} to request {request_id}")
            raise self._broken
        if reply.get("ok") is True:
            return {k: v for k, v in reply.items() if k not in ("id", "ok")}
        if reply.get("ok") is False and isinstance(reply.get("exit_code"), int):
            message = str(reply.get("error") or f"{op} failed on {self.peer}")
            raise error_for_code(reply["exit_code"], message, str(reply.get("detail") or ""))
        self._broken = ProtocolError(f"migration protocol error: malformed reply to {op}: {reply!r:.120}")
        raise self._broken

    def _gone(self, op: str) -> ConnectionBroken:
        why = self.connection.stream.describe_end()
        return ConnectionBroken(f"{self.peer} closed the connection during {op}" + (f": {why}" if why else ""))
