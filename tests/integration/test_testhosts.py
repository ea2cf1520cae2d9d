"""The test hosts themselves: ssh into each with strict host keys, isolation, reachability, cleanup."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from vzpy_lab.netns import ClientKey, HostSetupError, TestHost, TestNetwork, reap_stale
from vzpy_lab.netns.layout import CGROUP_ROOT, SSH_PORT, netns_path
from vzpy_lab.netns.reaper import Residents, cgroup_dirs
from vzpy_lab.netns.system import ns_id

pytestmark = pytest.mark.root

WAIT = 10.0
# Fixed code run by a python inside host_b; the port comes in as an argument.
LISTENER = textwrap.dedent(
    """\
    import socket, sys
    server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.sendall(socket.gethostname().encode())
    conn.close()
    """
)
# Builds a network with one host in another process, then dies without any teardown.
ORPHAN_MAKER = textwrap.dedent(
    """\
    import os, subprocess, sys
    from pathlib import Path
    from vzpy_lab.netns import TestNetwork
    network = TestNetwork.create(Path(sys.argv[1]))
    host = network.add_host("orphan")
    host.popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(host.netns, flush=True)
    os._exit(0)
    """
)


@contextmanager
def paramiko_session(
    network: TestNetwork, host: TestHost, key: Path, known_hosts: Path
) -> Iterator[paramiko.SSHClient]:
    """Connects from the client netns; unknown or mismatched host keys are rejected."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = network.client_connect(host.address, SSH_PORT)
    try:
        client.connect(
            host.address,
            username="root",
            key_filename=str(key),
            look_for_keys=False,
            allow_agent=False,
            sock=sock,
            timeout=WAIT,
            banner_timeout=WAIT,
            auth_timeout=WAIT,
        )
        yield client
    finally:
        client.close()
        sock.close()


def remote(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=WAIT)
    out = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
    return out


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_paramiko_sees_each_hosts_own_config(
    test_network: TestNetwork, host_a: TestHost, host_b: TestHost, ssh_client_key: ClientKey
) -> None:
    for host, other in ((host_a, host_b), (host_b, host_a)):
        with paramiko_session(test_network, host, ssh_client_key.private_key, ssh_client_key.known_hosts) as ssh:
            vz_conf = remote(ssh, "cat /etc/vz/vz.conf")
            assert remote(ssh, "hostname").strip() == host.hostname
        assert f'CGROUP_PARENT="vzpy-{host.hostname}"' in vz_conf
        assert other.hostname not in vz_conf


def test_openssh_client_with_strict_host_keys(
    test_network: TestNetwork, host_a: TestHost, host_b: TestHost, ssh_client_key: ClientKey
) -> None:
    for host in (host_a, host_b):
        argv = test_network.ssh_argv(host, "cat /etc/vz/vz.conf")
        for option in (f"UserKnownHostsFile={ssh_client_key.known_hosts}", "StrictHostKeyChecking=yes"):
            assert option in argv
        assert argv[argv.index("-i") + 1] == str(ssh_client_key.private_key)
        result = test_network.client_run(argv, timeout=WAIT)
        assert result.returncode == 0, result.stderr
        assert f'CGROUP_PARENT="{host.cgroup_parent}"' in result.stdout


def test_paramiko_rejects_unknown_and_wrong_host_keys(
    test_network: TestNetwork, host_a: TestHost, host_b: TestHost, ssh_client_key: ClientKey, tmp_path: Path
) -> None:
    only_b = tmp_path / "only_b"
    only_b.write_text(f"{host_b.known_hosts_line()}\n")
    rejected = pytest.raises(paramiko.SSHException, match="not found in known_hosts")
    with rejected, paramiko_session(test_network, host_a, ssh_client_key.private_key, only_b):
        pass
    wrong = tmp_path / "wrong"
    wrong.write_text(f"{host_a.address} {host_b.host_public_key()}\n")
    mismatched = pytest.raises(paramiko.BadHostKeyException)
    with mismatched, paramiko_session(test_network, host_a, ssh_client_key.private_key, wrong):
        pass


def test_client_reaches_both_hosts_over_tcp(test_network: TestNetwork, host_a: TestHost, host_b: TestHost) -> None:
    with host_b.popen([sys.executable, "-c", LISTENER, "7000"], stdout=subprocess.PIPE, text=True) as listener:
        try:
            assert select.select([listener.stdout], [], [], WAIT)[0], "listener in host_b did not start"
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            with test_network.client_connect(host_b.address, 7000) as sock:
                assert sock.recv(100).decode() == host_b.hostname
            assert listener.wait(timeout=WAIT) == 0
        finally:
            listener.kill()
    with test_network.client_connect(host_a.address, SSH_PORT) as sock:
        assert sock.recv(100).startswith(b"SSH-2.0-")


def test_vz_is_a_per_host_bind_mount(host_a: TestHost, host_b: TestHost) -> None:
    inside = host_a.run(["sh", "-c", "mount | grep ' /vz '"])
    assert inside.returncode == 0 and " /vz " in inside.stdout, inside.stderr
    outside = subprocess.run(["sh", "-c", "mount | grep ' /vz '"], capture_output=True, text=True, timeout=WAIT)
    assert outside.returncode == 1, outside.stdout
    st = os.stat(host_a.vz_root)
    assert host_a.run(["stat", "-c", "%d:%i", "/vz"]).stdout.strip() == f"{st.st_dev}:{st.st_ino}"
    assert host_a.run(["touch", "/vz/private/marker"]).returncode == 0
    assert (host_a.vz_root / "private" / "marker").exists()
    assert host_a.path("/vz/private/marker") == host_a.vz_root / "private" / "marker"
    assert not (host_b.vz_root / "private" / "marker").exists()


def test_host_to_host_ssh_as_migration_uses_it(host_a: TestHost, host_b: TestHost) -> None:
    """From inside host_a, plain `ssh root@host_b` works: per-host /root/.ssh has a key and known_hosts."""
    result = host_a.run(["ssh", "-o", "BatchMode=yes", host_b.ssh_target, "hostname; command -v vzpy"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [host_b.hostname, "/usr/local/sbin/vzpy"]
    assert host_a.run(["hostname"]).stdout.strip() == host_a.hostname


def test_make_test_host_with_vz_conf_and_session_env(
    test_network: TestNetwork, make_test_host: Callable[..., TestHost]
) -> None:
    host = make_test_host("extra", vz_conf={"VETH_PREFIX": "vx"}, env={"VZPY_TEST_MARK": "m1"})
    result = test_network.client_run(test_network.ssh_argv(host, "echo $VZPY_TEST_MARK; grep VETH /etc/vz/vz.conf"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["m1", 'VETH_PREFIX="vx"']
    assert host.run(["printenv", "VZPY_TEST_MARK"]).stdout.strip() == "m1"
    with pytest.raises(HostSetupError, match="duplicate"):
        test_network.add_host("extra")


def _routed_fake_ct(host: TestHost, address: str) -> None:
    """A netns `ct1` inside the host, reached OpenVZ venet style: a /32 route on the host side of a
    veth and proxy ARP on both the host's eth0 (from the fixture) and the veth."""
    commands = [
        ["ip", "netns", "add", "ct1"],
        ["ip", "link", "add", "vct1", "type", "veth", "peer", "name", "eth0", "netns", "ct1"],
        ["ip", "link", "set", "vct1", "up"],
        ["sysctl", "-q", "-w", "net.ipv4.conf.vct1.proxy_arp=1", "net.ipv4.neigh.vct1.proxy_delay=0"],
        ["ip", "route", "add", f"{address}/32", "dev", "vct1"],
        ["ip", "-n", "ct1", "link", "set", "lo", "up"],
        ["ip", "-n", "ct1", "addr", "add", f"{address}/32", "dev", "eth0"],
        ["ip", "-n", "ct1", "link", "set", "eth0", "up"],
        ["ip", "-n", "ct1", "route", "add", "default", "dev", "eth0"],
    ]
    for argv in commands:
        result = host.run(argv)
        assert result.returncode == 0, (argv, result.stderr)


def test_client_reaches_a_routed_ct_address_and_stop_kills_its_processes(
    test_network: TestNetwork, make_test_host: Callable[..., TestHost]
) -> None:
    host = make_test_host("routed")
    address = test_network.new_ct_address()
    _routed_fake_ct(host, address)
    assert not netns_path("ct1").exists(), "a host's /run/netns must be its own"
    argv = ["ip", "netns", "exec", "ct1", sys.executable, "-c", LISTENER, "7001"]
    with host.popen(argv, stdout=subprocess.PIPE, text=True) as listener:
        try:
            assert select.select([listener.stdout], [], [], WAIT)[0], "listener in ct1 did not start"
            with test_network.client_connect(address, 7001) as sock:
                assert sock.recv(100).decode() == host.hostname
        finally:
            listener.kill()
    # Outside the host's net and mount namespaces and not our child: found via the host's /run/netns.
    detach = ["ip", "netns", "exec", "ct1", "setsid", "-f", "sleep", "600"]
    assert host.run(detach, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    ct1 = ns_id(f"/proc/{host.sshd_pid}/root/run/netns/ct1")
    wait_for(lambda: Residents.of([("net", ct1)]).find(), "the detached sleep")
    escaped = Residents.of([("net", ct1)]).find()
    host.stop()
    assert not any(alive(pid) for pid in escaped)


def _fake_frozen_ct(host: TestHost) -> int:
    """A sleep in its own mount and net namespaces, in a frozen cgroup below the host's cgroup parent:
    only the cgroup ties it to the host, as with a CT caught mid-checkpoint."""
    wrapper = host.popen(["unshare", "--mount", "--net", "--fork", "--", "sleep", "600"])
    children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children")
    wait_for(lambda: children.read_text().strip(), "the fake CT process")
    pid = int(children.read_text().split()[0])
    v1_freezer = CGROUP_ROOT / "freezer"
    cgroup = (v1_freezer if v1_freezer.is_dir() else CGROUP_ROOT) / host.cgroup_parent / "101"
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text(str(pid))
    if v1_freezer.is_dir():
        (cgroup / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (cgroup / "freezer.state").read_text().strip() == "FROZEN", "freezing")
    else:
        (cgroup / "cgroup.freeze").write_text("1")
    return pid


def test_setup_is_fast_and_stop_leaves_nothing(test_network: TestNetwork) -> None:
    started = time.monotonic()
    host = test_network.add_host("gone")
    assert time.monotonic() - started < 2.0
    try:
        sleeper = host.popen(["sleep", "600"])
        ct_pid = _fake_frozen_ct(host)
        sshd_pid, mnt = host.sshd_pid, ns_id(f"/proc/{host.sshd_pid}/ns/mnt")
        assert sshd_pid is not None and mnt != ns_id("/proc/self/ns/mnt")
    finally:
        host.stop()
    assert sleeper.poll() is not None
    assert not alive(ct_pid) and not alive(sshd_pid)
    assert Residents.of([("mnt", mnt)]).find() == []
    assert not netns_path(host.netns).exists()
    assert host.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cgroup_dirs(host.cgroup_parent) == []
    assert not host.base_dir.exists()
    assert str(host.base_dir) not in Path("/proc/self/mountinfo").read_text()
    assert "gone" not in test_network.hosts
    assert host.address not in test_network.client_key.known_hosts.read_text()


def test_reap_stale_cleans_up_after_a_killed_run(tmp_path: Path) -> None:
    maker = [sys.executable, "-c", ORPHAN_MAKER, str(tmp_path)]
    try:
        made = subprocess.run(maker, capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        netns = made.stdout.strip()
        residents = Residents.of([("net", ns_id(netns_path(netns)))])
        assert residents.find(), "the orphaned sleep should still run in the host's netns"
        messages = reap_stale(tmp_path)
        assert len(messages) == 1 and "\n" not in messages[0], messages
        assert residents.find() == []
        assert not netns_path(netns).exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        reap_stale(tmp_path)  # whatever the maker left if it or an assertion failed half-way
