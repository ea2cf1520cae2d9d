"""The migration client's error paths: a reply to another request, the end of the stream during a call, a
malformed reply, the agent's own error, a refused protocol version, a timeout and a broken link. After each
failure of the link itself the client must refuse further calls (a late reply could be taken for the next
request's); after an agent's error it stays usable."""

from __future__ import annotations

import json

import pytest

from vzpy import __version__
from vzpy.migrate import (
    ConnectionBroken,
    ConnectionTimeout,
    CtExistsRemote,
    IncompatibleVersion,
    MigrateError,
    ProtocolError,
)
from vzpy.migrate.protocol import PROTOCOL_VERSION, Client, Connection, encode

HOST = "dst.example"


class ScriptedPeer:
    """A Stream whose reads come from a script: bytes, b"" for the end of the stream, or an exception to raise.
    When the script runs out the peer is silent: the read times out. Records what was sent and each read's
    timeout."""

    def __init__(self, *script: bytes | BaseException, end: str = "") -> None:
        self.script = list(script)
        self.end = end
        self.sent: list[dict[str, object]] = []
        self.timeouts: list[float | None] = []
        self.write_error: OSError | None = None

    def read(self, size: int, timeout: float | None) -> bytes:
        self.timeouts.append(timeout)
        if not self.script:
            raise TimeoutError("silent peer")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if len(item) > size:
            self.script.insert(0, item[size:])
        return item[:size]

    def write(self, data: bytes) -> None:
        if self.write_error is not None:
            raise self.write_error
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        self.sent.append(json.loads(data))

    def close(self) -> None:
        pass

    def describe_end(self) -> str:
        return self.end


def client_for(peer: ScriptedPeer, timeout: float = 60.0) -> Client:
    return Client(Connection(peer, peer=HOST), timeout=timeout)


def reply(request_id: int, **fields: object) -> bytes:
    return encode({"id": request_id, **fields})


def assert_unusable_after(client: Client, peer: ScriptedPeer, first_error: str) -> None:
    sent_before = len(peer.sent)
    with pytest.raises(ConnectionBroken) as info:
        client.call("status")
    assert info.value.message == f"connection to {HOST} is unusable after: {first_error}"
    assert len(peer.sent) == sent_before, "an unusable client must not send"
    assert not client.usable


# --- replies matched to requests --------------------------------------------------------------------------------


def test_each_request_has_its_own_id_and_the_reply_gives_back_only_its_results() -> None:
    peer = ScriptedPeer(reply(1, ok=True, free=5), reply(2, ok=True))
    client = client_for(peer)
    assert client.call("space", path="/vz") == {"free": 5}
    assert client.call("status") == {}
    assert [(m["id"], m["op"]) for m in peer.sent] == [(1, "space"), (2, "status")]
    assert peer.sent[0]["path"] == "/vz"
    assert client.usable


def test_a_reply_to_another_request_is_a_protocol_error_and_the_client_is_unusable_after() -> None:
    peer = ScriptedPeer(reply(7, ok=True), reply(1, ok=True))
    client = client_for(peer)
    with pytest.raises(ProtocolError) as info:
        client.call("prepare")
    assert info.value.message == "migration protocol error: reply 7 to request 1"
    assert info.value.exit_code == 26
    assert_unusable_after(client, peer, "migration protocol error: reply 7 to request 1")


# --- the end of the stream --------------------------------------------------------------------------------------


def test_the_end_of_the_stream_during_a_call_says_which_call_and_why_the_link_ended() -> None:
    peer = ScriptedPeer(b"", end="ssh exited with status 255")
    client = client_for(peer)
    with pytest.raises(ConnectionBroken) as info:
        client.call("restore")
    message = f"{HOST} closed the connection during restore: ssh exited with status 255"
    assert info.value.message == message
    assert info.value.exit_code == 21
    assert_unusable_after(client, peer, message)


def test_the_end_of_the_stream_without_a_reason_names_only_the_call() -> None:
    client = client_for(ScriptedPeer(b""))
    with pytest.raises(ConnectionBroken) as info:
        client.call("restore")
    assert info.value.message == f"{HOST} closed the connection during restore"


def test_the_end_of_the_stream_in_the_middle_of_a_reply_is_a_broken_connection() -> None:
    peer = ScriptedPeer(b'{"id": 1, "ok": tr', b"")
    client = client_for(peer)
    with pytest.raises(ConnectionBroken) as info:
        client.call("dump")
    assert info.value.message == f"connection to {HOST} closed in the middle of a message"
    assert_unusable_after(client, peer, info.value.message)


# --- malformed replies and the agent's errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},  # no "ok"
        {"ok": "yes"},  # "ok" is not a boolean
        {"exit_code": 9, "error": "exists"},  # an error without "ok": false
        {"ok": False, "error": "exists"},  # an error without an exit code
        {"ok": False, "exit_code": "9"},  # an exit code that is not a number
    ],
)
def test_a_malformed_reply_is_a_protocol_error_and_the_client_is_unusable_after(fields: dict[str, object]) -> None:
    peer = ScriptedPeer(reply(1, **fields))
    client = client_for(peer)
    with pytest.raises(ProtocolError) as info:
        client.call("prepare")
    assert info.value.message.startswith("migration protocol error: malformed reply to prepare: {'id': 1")
    assert_unusable_after(client, peer, info.value.message)


def test_the_agents_error_comes_back_with_its_class_message_and_detail_and_the_client_stays_usable() -> None:
    error = reply(1, ok=False, exit_code=9, error="CT 101 exists on dst", detail="private area: /vz/private/101")
    peer = ScriptedPeer(error, reply(2, ok=True))
    client = client_for(peer)
    with pytest.raises(CtExistsRemote) as info:
        client.call("prepare")
    assert info.value.message == "CT 101 exists on dst"
    assert info.value.detail == "private area: /vz/private/101"
    assert client.usable
    assert client.call("status") == {}


def test_an_agents_error_without_message_or_detail_names_the_call_and_the_host() -> None:
    client = client_for(ScriptedPeer(reply(1, ok=False, exit_code=99)))
    with pytest.raises(MigrateError) as info:
        client.call("prepare")
    assert info.value.exit_code == 99
    assert info.value.message == f"prepare failed on {HOST}"
    assert info.value.detail == ""


# --- version negotiation ----------------------------------------------------------------------------------------


def test_hello_sends_both_versions_and_keeps_the_negotiated_one() -> None:
    peer = ScriptedPeer(reply(1, ok=True, proto=[PROTOCOL_VERSION[0], 0], vzpy="x"))
    client = client_for(peer)
    assert client.version is None
    assert client.hello(timeout=9) == {"proto": [PROTOCOL_VERSION[0], 0], "vzpy": "x"}
    assert peer.sent[0]["op"] == "hello"
    assert peer.sent[0]["proto"] == list(PROTOCOL_VERSION)
    assert peer.sent[0]["vzpy"] == __version__
    assert client.version == (PROTOCOL_VERSION[0], 0)
    assert peer.timeouts[0] == pytest.approx(9, abs=1)


def test_hello_passes_extra_arguments_to_the_agent() -> None:
    peer = ScriptedPeer(reply(1, ok=True, proto=list(PROTOCOL_VERSION)))
    client_for(peer).hello(fault="before-reply:restore")
    assert peer.sent[0]["fault"] == "before-reply:restore"


def test_an_agent_of_another_major_version_is_refused_with_both_versions() -> None:
    theirs = [PROTOCOL_VERSION[0] + 1, 0]
    client = client_for(ScriptedPeer(reply(1, ok=True, proto=theirs)))
    with pytest.raises(IncompatibleVersion) as info:
        client.hello()
    assert info.value.message == (
        f"vzpy on {HOST} speaks migration protocol {theirs[0]}.0, this vzpy {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"
        ": install the same vzpy version on both hosts"
    )
    assert info.value.exit_code == 17
    assert client.version is None


@pytest.mark.parametrize("proto", [None, "1.0", [1], [1, 0, 0], [1, "0"], {"major": 1, "minor": 0}])
def test_an_agent_without_a_readable_version_is_a_protocol_error(proto: object) -> None:
    client = client_for(ScriptedPeer(reply(1, ok=True, proto=proto)))
    with pytest.raises(ProtocolError) as info:
        client.hello()
    assert info.value.message == (f"migration protocol error: bad protocol version {proto!r}, expected [major, minor]")
    assert client.version is None


# --- timeouts and a broken link ---------------------------------------------------------------------------------


def test_a_call_waits_the_clients_timeout_unless_given_its_own() -> None:
    peer = ScriptedPeer(reply(1, ok=True), reply(2, ok=True))
    client = client_for(peer, timeout=600)
    client.call("status")
    client.call("dump", timeout=3600)
    assert peer.timeouts == [pytest.approx(600, abs=60), pytest.approx(3600, abs=60)]


def test_a_silent_agent_times_out_and_the_client_is_unusable_after() -> None:
    peer = ScriptedPeer()
    client = client_for(peer)
    with pytest.raises(ConnectionTimeout) as info:
        client.call("dump", timeout=0)
    assert info.value.message.startswith(f"{HOST} did not answer")
    assert info.value.message.endswith(" within 0s")
    assert info.value.exit_code == 22
    assert_unusable_after(client, peer, info.value.message)


def test_a_read_error_is_a_broken_connection_naming_the_host_and_the_error() -> None:
    peer = ScriptedPeer(ConnectionResetError("reset by peer"))
    client = client_for(peer)
    with pytest.raises(ConnectionBroken) as info:
        client.call("dump")
    assert info.value.message == f"connection to {HOST} broken: reset by peer"
    assert_unusable_after(client, peer, info.value.message)


def test_a_write_error_is_a_broken_connection_and_the_client_is_unusable_after() -> None:
    peer = ScriptedPeer()
    peer.write_error = BrokenPipeError("broken pipe")
    client = client_for(peer)
    with pytest.raises(ConnectionBroken) as info:
        client.call("dump")
    assert info.value.message == f"connection to {HOST} broken while sending: broken pipe"
    peer.write_error = None
    assert_unusable_after(client, peer, info.value.message)
