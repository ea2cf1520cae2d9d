"""The migration transport between two real test hosts: paramiko with strict host keys, the agent over a
real SSH channel on host_b, rsync and the page-server tunnel run from inside host_a as `vzpy migrate` will."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy.migrate import (
    AuthFailed,
    DestinationNotReady,
    HostKeyMismatch,
    HostKeyUnknown,
    Unreachable,
)
from vzpy.migrate.remote import RemoteAgent, connect_agent
from vzpy.migrate.ssh import SshSession, parse_target
from vzpy.migrate.tunnel import listening
from vzpy_lab.netns import TestHost, TestNetwork

pytestmark = pytest.mark.root

PYTHON = sys.executable
AGENT = [PYTHON, "-m", "vzpy.migrate.agent"]
UNUSED_ADDRESS = "10.231.0.99"
CONF_TEXT = '# CT from the source\nHOSTNAME="moved"\nVE_PRIVATE="/src/private/CT"\nIP_ADDRESS="10.231.0.150"\n'

# Run inside host_a (as `vzpy migrate` runs on the source): rsync a tree to host_b.
RSYNC_SCRIPT = textwrap.dedent(
    """\
    import json, sys
    from pathlib import Path
    from vzpy.migrate.rsync import sync_tree
    from vzpy.migrate.ssh import SshSession, parse_target
    target, source, dest = sys.argv[1:4]
    updates = []
    with SshSession.connect(parse_target(target), key="/root/.ssh/id_ed25519") as session:
        result = sync_tree(Path(source), dest, session.openssh(), on_progress=updates.append)
    print(json.dumps({"bytes": result.bytes, "updates": len(updates)}))
    """
)
# Run inside host_a: open a tunnel to a port on host_b's loopback and talk through it.
# Run inside host_a: open a tunnel to a port on host_b's loopback and talk through it. The first local
# port the tunnel picks is taken (the race free_port leaves): it must notice and pick another.
TUNNEL_SCRIPT = textwrap.dedent(
    """\
    import json, socket, sys
    from vzpy.migrate import tunnel as t
    from vzpy.migrate.ssh import SshSession, parse_target
    target, port = sys.argv[1], int(sys.argv[2])
    busy = socket.create_server(("127.0.0.1", 0))
    busy_port = busy.getsockname()[1]
    ports = iter([busy_port, t.free_port()])
    t.free_port = lambda: next(ports)
    with SshSession.connect(parse_target(target), key="/root/.ssh/id_ed25519") as session:
        with t.OpenSshTunnel(session.openssh(), port) as tunnel:
            pid = tunnel.process.pid
            with socket.create_connection(("127.0.0.1", tunnel.local_port), timeout=10) as sock:
                sock.sendall(b"through the tunnel")
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(1000).decode()
    print(json.dumps({"reply": reply, "ssh_pid": pid, "port": tunnel.local_port, "busy": busy_port}))
    """
)
# Run inside host_b: a listener on its loopback only, answering with its hostname and what it got.
LISTENER = textwrap.dedent(
    """\
    import socket, sys
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    conn, _ = server.accept()
    data = b""
    while chunk := conn.recv(1000):
        data += chunk
    conn.sendall(socket.gethostname().encode() + b":" + data)
    conn.close()
    """
)


def connect(source: TestHost, dest: TestHost, **kw: object) -> SshSession:
    """A paramiko session from inside source's network namespace, with source's root key and known_hosts."""
    kw.setdefault("key", source.path("/root/.ssh/id_ed25519"))
    kw.setdefault("known_hosts", source.path("/root/.ssh/known_hosts"))
    return SshSession.connect(parse_target(dest.ssh_target), socket_factory=source.socket, **kw)  # type: ignore[arg-type]


def sha256_fingerprint(public_key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-l", "-f", str(public_key)], capture_output=True, text=True).stdout.split()[1]


def vz_tree(host: TestHost) -> set[str]:
    """Everything under the host's /vz and /etc/vz, except vzpy's lock files (they persist by design)."""
    found = set()
    for base in (host.vz_root, host.etc_vz):
        found |= {str(p) for p in base.rglob("*") if not p.name.endswith(".lck")}
    return found


def wait_until(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- SSH ------------------------------------------------------------------------------------------------


def test_connect_with_key_and_known_hosts(host_a: TestHost, host_b: TestHost) -> None:
    with connect(host_a, host_b) as session:
        assert session.run(["hostname"])[1].strip() == host_b.hostname
        hostile = "$(id); `id` 'q' \"x\" \\ *"
        assert session.run(["printf", "%s", hostile]) == (0, hostile, "")


def test_unknown_host_key_is_refused_with_its_fingerprint(host_a: TestHost, host_b: TestHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyUnknown) as info:
        connect(host_a, host_b, known_hosts=known)
    expected = sha256_fingerprint(host_b.sshd_dir / "ssh_host_ed25519_key.pub")
    assert info.value.exit_code == 4
    assert info.value.message == (
        f"host key of {host_b.address} is unknown: ssh-ed25519 {expected}; verify it and add it with "
        f"`ssh-keyscan -p 22 {host_b.address} >> {known}` or pass --known-hosts"
    )
    with connect(host_a, host_b, known_hosts=known, accept_new=True) as session:
        assert session.accepted_new_key == f"ssh-ed25519 {expected}"
    assert known.read_text().split() == host_b.known_hosts_line().split()
    with connect(host_a, host_b, known_hosts=known) as session:  # now known: strict checking passes
        assert session.accepted_new_key is None


def test_changed_host_key_is_refused(host_a: TestHost, host_b: TestHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"{host_b.address} {host_a.host_public_key()}\n")
    with pytest.raises(HostKeyMismatch, match="does not match") as info:
        connect(host_a, host_b, known_hosts=known, accept_new=True)
    assert info.value.exit_code == 4 and "ssh-keygen -R" in info.value.message


def test_wrong_key_is_refused(host_a: TestHost, host_b: TestHost, tmp_path: Path) -> None:
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(AuthFailed, match="refused our SSH key") as info:
        connect(host_a, host_b, key=key)
    assert info.value.exit_code == 4


def test_unreachable_address_fails_fast_in_one_line(host_a: TestHost) -> None:
    started = time.monotonic()
    with pytest.raises(Unreachable) as info:
        SshSession.connect(
            parse_target(UNUSED_ADDRESS), known_hosts="/dev/null", timeout=2, socket_factory=host_a.socket
        )
    assert time.monotonic() - started < 4
    assert info.value.exit_code == 4
    assert info.value.message.startswith(f"cannot connect to {UNUSED_ADDRESS} port 22: ")
    assert "\n" not in info.value.message and not info.value.detail


# --- the agent on host_b ---------------------------------------------------------------------------------


@pytest.fixture
def agent(host_a: TestHost, host_b: TestHost) -> Iterator[RemoteAgent]:
    session = connect(host_a, host_b)
    remote = connect_agent(session, AGENT)
    try:
        yield remote
    finally:
        remote.close()
        session.close()


def test_hello_reports_host_b_facts(agent: RemoteAgent, host_b: TestHost) -> None:
    hello = agent.hello
    assert hello["hostname"] == host_b.hostname
    assert hello["config"]["path"] == "/etc/vz/vz.conf"
    assert hello["config"]["CGROUP_PARENT"] == host_b.cgroup_parent
    assert hello["disk"]["private"]["path"] == "/vz/private" and hello["disk"]["private"]["free"] > 0
    assert hello["disk"]["dump"]["path"] == "/vz/dump"
    assert hello["criu"]["ok"] is True, hello["criu"]
    assert hello["cpu"]["flags"] and hello["kernel"] == os.uname().release
    assert hello["cgroups"] == ["freezer", "memory", "cpu", "pids", "devices"]


def test_missing_remote_vzpy_says_so(host_a: TestHost, host_b: TestHost) -> None:
    with connect(host_a, host_b) as session, pytest.raises(DestinationNotReady, match="not found on") as info:
        connect_agent(session, ["/nonexistent/vzpy", "migrate-agent"])
    assert info.value.exit_code == 14


def test_prepare_page_server_and_cleanup_leave_host_b_clean(agent: RemoteAgent, host_b: TestHost) -> None:
    before = vz_tree(host_b)
    assert agent.ct_exists("301")["exists"] is False
    paths = agent.prepare("301", CONF_TEXT, token="t301")
    assert paths["private"] == "/vz/private/301" and host_b.path("/vz/private/301").is_dir()
    staged = host_b.path("/etc/vz/conf/301.conf.migrating").read_text()
    assert 'VE_PRIVATE="/vz/private/301"' in staged and 'HOSTNAME="moved"' in staged
    assert host_b.path("/vz/dump/Migrate.301").stat().st_mode & 0o777 == 0o700
    reply = agent.client.call("page_server_start", ctid="301")
    assert listening("127.0.0.1", reply["port"], Path(f"/proc/{host_b.sshd_pid}/net/tcp"))
    assert alive(reply["pid"])
    removed = agent.cleanup("301")
    assert "/vz/private/301" in removed
    assert vz_tree(host_b) == before
    assert wait_until(lambda: not alive(reply["pid"]))


def test_dropped_channel_rolls_back(host_a: TestHost, host_b: TestHost) -> None:
    before = vz_tree(host_b)
    session = connect(host_a, host_b)
    remote = connect_agent(session, AGENT)
    remote.prepare("302", CONF_TEXT, token="t302")
    port = remote.page_server_start("302")
    assert host_b.path("/etc/vz/conf/302.conf.migrating").exists()
    session.close()  # the source dies: no cleanup, no bye
    assert wait_until(lambda: vz_tree(host_b) == before), vz_tree(host_b) - before
    assert wait_until(lambda: not listening("127.0.0.1", port, Path(f"/proc/{host_b.sshd_pid}/net/tcp")))


def test_signalled_agent_rolls_back(agent: RemoteAgent, host_b: TestHost) -> None:
    before = vz_tree(host_b)
    agent.prepare("304", CONF_TEXT, token="t304")
    agent_pid = int(host_b.path("/vz/lock/304.lck").read_text().split()[0])  # the lock names its holder
    os.kill(agent_pid, signal.SIGTERM)
    assert wait_until(lambda: vz_tree(host_b) == before), vz_tree(host_b) - before
    assert wait_until(lambda: not alive(agent_pid))


def test_commit_makes_the_ct_host_b_s(agent: RemoteAgent, host_b: TestHost) -> None:
    agent.prepare("303", CONF_TEXT, token="t303")
    agent.start("303", start=False, timeout=30)  # commit without running it
    conf = host_b.path("/etc/vz/conf/303.conf")
    try:
        assert 'VE_PRIVATE="/vz/private/303"' in conf.read_text()
        assert not host_b.path("/etc/vz/conf/303.conf.migrating").exists()
        assert not host_b.path("/vz/dump/Migrate.303").exists()
        assert agent.ct_exists("303")["exists"] is True
    finally:
        conf.unlink()
        host_b.path("/vz/private/303").rmdir()


# --- rsync and the tunnel, from inside host_a -----------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    (root / "data").chmod(0o750)
    (root / "data" / "file").write_text("contents\n")
    os.chown(root / "data" / "file", 1234, 2345)
    (root / "data" / "file").chmod(0o600)
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    (root / "suid").chmod(0o4755)
    (root / "link").symlink_to("data/file")
    os.link(root / "data" / "file", root / "hard")
    os.setxattr(root / "data" / "file", "user.vzpy", b"kept")
    with open(root / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.write(b"x")


def test_rsync_from_host_a_preserves_the_tree(host_a: TestHost, host_b: TestHost) -> None:
    source, dest = host_a.path("/vz/private/401"), host_b.path("/vz/private/401")
    make_tree(source)
    (dest / "stale").mkdir(parents=True)
    try:
        result = host_a.run([PYTHON, "-c", RSYNC_SCRIPT, host_b.ssh_target, "/vz/private/401", "/vz/private/401"])
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["updates"] >= 1
        st = os.lstat(dest / "data" / "file")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_nlink) == (1234, 2345, 0o600, 2)
        assert os.lstat(dest / "hard").st_ino == st.st_ino
        assert os.lstat(dest / "suid").st_mode & 0o7777 == 0o4755
        assert os.lstat(dest / "data").st_mode & 0o777 == 0o750
        assert os.readlink(dest / "link") == "data/file"
        assert os.getxattr(dest / "data" / "file", "user.vzpy") == b"kept"
        assert os.stat(dest / "sparse").st_blocks * 512 < 1 << 20
        assert not (dest / "stale").exists()
    finally:
        subprocess.run(["rm", "-rf", "--", str(source), str(dest)], check=True)


def test_tunnel_from_host_a_reaches_host_b_loopback(host_a: TestHost, host_b: TestHost) -> None:
    listener = host_b.popen([PYTHON, "-c", LISTENER, "7002"], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    result = host_a.run([PYTHON, "-c", TUNNEL_SCRIPT, host_b.ssh_target, "7002"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["reply"] == f"{host_b.hostname}:through the tunnel"
    assert out["port"] != out["busy"]
    assert not alive(out["ssh_pid"])
    assert listener.wait(10) == 0


def test_nothing_left_listening_on_host_a(test_network: TestNetwork, host_a: TestHost) -> None:
    """After the tunnel test, host_a's netns has no forwarded port left (only sshd on port 22)."""
    lines = Path(f"/proc/{host_a.sshd_pid}/net/tcp").read_text().splitlines()[1:]
    ports = {int(fields[1].split(":")[1], 16) for fields in (line.split() for line in lines) if fields[3] == "0A"}
    assert ports == {22}
