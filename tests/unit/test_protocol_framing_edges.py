"""Edges of the migration protocol's framing: the exact wire form, several lines in one read, an empty line,
a line of exactly the largest size, no deadline, an expired deadline, error messages that say what was read,
and FdStream's own reads, closing and end."""

from __future__ import annotations

import os
import socket

import pytest

from vzpy.errors import VzError
from vzpy.migrate import ConnectionBroken, ConnectionTimeout, IncompatibleVersion, ProtocolError
from vzpy.migrate.protocol import (
    MAX_LINE,
    Connection,
    FdStream,
    check_compatible,
    decode,
    encode,
    error_reply,
    parse_version,
)


class Chunks:
    """A Stream that returns the given chunks (at most `size` bytes a read), then the end of the stream."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.timeouts: list[float | None] = []

    def read(self, size: int, timeout: float | None) -> bytes:
        self.timeouts.append(timeout)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            self.chunks.insert(0, chunk[size:])
        return chunk[:size]

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def describe_end(self) -> str:
        return ""


class Silent(Chunks):
    def read(self, size: int, timeout: float | None) -> bytes:
        self.timeouts.append(timeout)
        raise TimeoutError("nothing")


def test_the_wire_form_is_compact_ascii_json_and_one_newline() -> None:
    assert encode({"id": 1, "ok": True, "name": "é"}) == b'{"id":1,"ok":true,"name":"\\u00e9"}\n'


def test_two_messages_in_one_read_come_back_one_at_a_time() -> None:
    connection = Connection(Chunks(encode({"id": 1}) + encode({"id": 2})))
    assert connection.receive(5) == {"id": 1}
    assert connection.receive(5) == {"id": 2}
    assert connection.receive(5) is None


def test_an_empty_line_is_a_protocol_error_not_skipped() -> None:
    connection = Connection(Chunks(b"\n" + encode({"id": 1})))
    with pytest.raises(ProtocolError, match="not a JSON line"):
        connection.receive(5)


def test_a_line_of_exactly_the_largest_size_is_accepted() -> None:
    prefix, suffix = b'{"pad":"', b'"}'
    line = prefix + b"x" * (MAX_LINE - len(prefix) - len(suffix)) + suffix
    assert len(line) == MAX_LINE
    connection = Connection(Chunks(line, b"\n"))
    message = connection.receive(5)
    assert message is not None and len(message["pad"]) == MAX_LINE - len(prefix) - len(suffix)


def test_without_a_timeout_a_read_waits_for_ever() -> None:
    stream = Chunks(encode({"id": 1}))
    assert Connection(stream).receive(None) == {"id": 1}
    assert stream.timeouts == [None]


def test_an_expired_deadline_reads_without_waiting_and_says_so() -> None:
    stream = Silent()
    with pytest.raises(ConnectionTimeout) as info:
        Connection(stream).receive(0)
    assert stream.timeouts == [0.0]
    assert info.value.message == "the peer did not answer within 0s"


def test_a_peer_without_a_name_is_called_the_peer() -> None:
    with pytest.raises(ConnectionBroken) as info:
        Connection(Chunks(b'{"id"')).receive(5)
    assert info.value.message == "connection to the peer closed in the middle of a message"


def test_a_line_that_is_not_json_is_quoted_up_to_80_bytes() -> None:
    line = b"<" + b"x" * 200
    with pytest.raises(ProtocolError) as info:
        decode(line)
    assert info.value.message == f"migration protocol error: not a JSON line: {line[:80]!r}"


def test_json_that_is_not_an_object_is_quoted_up_to_80_bytes() -> None:
    line = b"[" + b"1," * 100 + b"1]"
    with pytest.raises(ProtocolError) as info:
        decode(line)
    assert info.value.message == f"migration protocol error: expected a JSON object, got {line[:80]!r}"


def test_an_error_reply_carries_message_exit_code_and_detail() -> None:
    error = VzError("it failed", detail="the log says why")
    assert error_reply(4, error) == {
        "id": 4,
        "ok": False,
        "error": "it failed",
        "exit_code": error.exit_code,
        "detail": "the log says why",
    }


def test_a_bad_version_names_what_was_received() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_version([1, 0, 0])
    assert info.value.message == "migration protocol error: bad protocol version [1, 0, 0], expected [major, minor]"


def test_only_the_majors_are_compared_and_the_refusal_names_both_versions() -> None:
    check_compatible((3, 0), ours=(3, 5), peer="vzpy on b")
    with pytest.raises(IncompatibleVersion) as info:
        check_compatible((5, 3), ours=(3, 5), peer="vzpy on b")
    assert info.value.message == (
        "vzpy on b speaks migration protocol 5.3, this vzpy 3.5: install the same vzpy version on both hosts"
    )


# --- FdStream -----------------------------------------------------------------------------------------------------


def test_fd_stream_read_times_out_with_how_long_it_waited() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TimeoutError) as info:
            FdStream(a.fileno(), a.fileno()).read(10, 0)
        assert str(info.value) == "nothing to read within 0s"


def test_fd_stream_close_closes_both_fds_even_if_one_is_closed_already() -> None:
    read_fd, write_fd = os.pipe()
    other_read, other_write = os.pipe()
    os.close(other_write)
    FdStream(read_fd, write_fd).close()
    FdStream(other_read, other_write).close()
    for fd in (read_fd, write_fd, other_read):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_fd_stream_has_nothing_to_say_about_its_end() -> None:
    read_fd, write_fd = os.pipe()
    stream = FdStream(read_fd, write_fd)
    try:
        assert stream.describe_end() == ""
    finally:
        stream.close()
