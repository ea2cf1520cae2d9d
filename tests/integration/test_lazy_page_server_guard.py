"""A lazy dump's page server listens on every address (CRIU 4.2.1 over RPC takes only its port): while it
serves a CT's memory, vzpy.criu.lazy.loopback_only lets nothing but lo reach that port.

Two network namespaces of this test: "server" plays the source host (a listener on 0.0.0.0, as CRIU's), and
"peer" a machine on its network."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vzpy_lab.netns.system import add_netns, connect_from, delete_netns, ip_batch

pytestmark = pytest.mark.root
PORT = 7300
SERVER_IP, PEER_IP = "10.231.7.1", "10.231.7.2"
SERVER = f"""
import socket, sys
from vzpy.criu.lazy import loopback_only
listener = socket.create_server(("0.0.0.0", {PORT}), backlog=16)
with loopback_only({PORT}):
    print("guarded", flush=True)
    sys.stdin.readline()
print("open", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    token = secrets.token_hex(3)
    server, peer = f"vzt-lz-s-{token}", f"vzt-lz-p-{token}"
    add_netns(server)
    add_netns(peer)
    try:
        subprocess.run(
            ["ip", "link", "add", f"lzs{token}", "netns", server, "type", "veth", "peer", f"lzp{token}", "netns", peer],
            check=True,
        )
        ip_batch(server, ["link set lo up", f"link set lzs{token} up", f"addr add {SERVER_IP}/24 dev lzs{token}"])
        ip_batch(peer, ["link set lo up", f"link set lzp{token} up", f"addr add {PEER_IP}/24 dev lzp{token}"])
        yield server, peer
    finally:
        delete_netns(server)
        delete_netns(peer)


def reaches(netns: str, address: str) -> bool:
    try:
        connect_from(f"/run/netns/{netns}", address, PORT, timeout=2).close()
    except (TimeoutError, OSError):
        return False
    return True


def tables(netns: str) -> str:
    listed = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "--", "nft", "list", "tables"], capture_output=True, text=True
    )
    return listed.stdout


def test_only_lo_reaches_the_page_server_while_it_serves(namespaces: tuple[str, str]) -> None:
    server_ns, peer_ns = namespaces
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{server_ns}", "--", sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        assert server.stdout.readline() == "guarded\n"
        assert not reaches(peer_ns, SERVER_IP), "a peer on the network reached the lazy page server"
        assert reaches(server_ns, "127.0.0.1"), "the SSH tunnel's end (lo) must get in"
        assert "vzpy_lazy" in tables(server_ns)
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.stdout.readline() == "open\n"
        assert reaches(peer_ns, SERVER_IP), "the guard outlived the lazy dump"
        assert "vzpy_lazy" not in tables(server_ns)
    finally:
        server.kill()
        server.wait(timeout=10)


def test_a_guard_left_by_a_killed_vzpy_is_removed_by_the_next(namespaces: tuple[str, str]) -> None:
    server_ns, peer_ns = namespaces
    killed = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{server_ns}", "--", sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout is not None
    assert killed.stdout.readline() == "guarded\n"
    killed.kill()  # SIGKILL: its finally never runs
    killed.wait(timeout=10)
    assert f"vzpy_lazy_{PORT}_" in tables(server_ns), "the killed guard's table should still be there"
    listener = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{server_ns}",
            "--",
            sys.executable,
            "-c",
            f"import socket, sys; s = socket.create_server(('0.0.0.0', {PORT})); print('up', flush=True); "
            "sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None
    try:
        assert listener.stdout.readline() == "up\n"
        assert not reaches(peer_ns, SERVER_IP), "the stale guard should still drop the port"
        next_guard = subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{server_ns}",
                "--",
                sys.executable,
                "-c",
                "from vzpy.criu.lazy import loopback_only\nwith loopback_only(7301): pass",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert next_guard.returncode == 0, next_guard.stderr
        assert "vzpy_lazy" not in tables(server_ns)
        assert reaches(peer_ns, SERVER_IP), "the killed vzpy's guard outlived the next lazy dump"
    finally:
        listener.kill()
        listener.wait(timeout=10)
