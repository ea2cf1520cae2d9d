"""`migrate`'s SSH as the operator configured ssh: a Host alias in ~/.ssh/config (HostName, User, Port,
IdentityFile, UserKnownHostsFile) and a system-wide known_hosts reach a real test host, over paramiko and over
the OpenSSH command rsync and the tunnel use, with no --ssh-key or --known-hosts given."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy.migrate import HostKeyUnknown
from vzpy.migrate.ssh import SshSession, parse_target
from vzpy_lab.netns import ClientKey, TestHost, TestNetwork

pytestmark = pytest.mark.root
WAIT = 30


def write_ssh_config(home: Path, text: str) -> None:
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh" / "config").write_text(text)


def check_both_clients(network: TestNetwork, host: TestHost, alias: str) -> None:
    """paramiko reaches `host` through `alias`, and so does the OpenSSH argv derived from its session."""
    with SshSession.connect(parse_target(alias), socket_factory=network.client_socket) as session:
        code, out, err = session.run(["hostname"])
        assert (code, out.strip()) == (0, host.hostname), err
        argv = [*session.openssh().argv(), "hostname"]
    result = network.client_run(argv, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == host.hostname


def test_host_alias_with_user_port_identity_and_known_hosts(
    test_network: TestNetwork,
    host_b: TestHost,
    ssh_client_key: ClientKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VZPY_KNOWN_HOSTS", raising=False)
    write_ssh_config(
        tmp_path,
        f"""Host dest-b
    HostName {host_b.address}
    User root
    Port 22
    IdentityFile {ssh_client_key.private_key}
    UserKnownHostsFile {ssh_client_key.known_hosts}
""",
    )
    check_both_clients(test_network, host_b, "dest-b")


def test_system_known_hosts_is_consulted(
    test_network: TestNetwork,
    host_b: TestHost,
    ssh_client_key: ClientKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host key is only in the system-wide file (GlobalKnownHostsFile standing in for
    /etc/ssh/ssh_known_hosts, which a test must not write); the user's known_hosts is empty."""
    system = tmp_path / "ssh_known_hosts"
    system.write_text(host_b.known_hosts_line() + "\n")
    empty = tmp_path / "user_known_hosts"
    empty.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VZPY_KNOWN_HOSTS", raising=False)
    config = f"""Host dest-b
    HostName {host_b.address}
    IdentityFile {ssh_client_key.private_key}
    UserKnownHostsFile {empty}
"""
    write_ssh_config(tmp_path, config + f"    GlobalKnownHostsFile {system}\n")
    check_both_clients(test_network, host_b, "dest-b")
    assert empty.read_text() == ""  # nothing was added: the key was known

    write_ssh_config(tmp_path, config)  # without the system file the key is unknown: refused, as before
    with pytest.raises(HostKeyUnknown):
        SshSession.connect(parse_target("dest-b"), socket_factory=test_network.client_socket, timeout=WAIT)
