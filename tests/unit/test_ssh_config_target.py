"""`migrate`'s destination through the operator's ssh_config (vzpy.migrate.ssh.parse_target): a Host alias's
HostName, User, Port, IdentityFile and known_hosts files apply, and what the command line gives wins."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from vzpy.migrate import MigrateUsage
from vzpy.migrate.ssh import OpenSsh, Target, operator_ssh_config, parse_target


def _config(tmp_path: Path) -> paramiko.SSHConfig:
    key = tmp_path / "id_dst"
    key.write_text("key")
    return paramiko.SSHConfig.from_text(
        f"""
Host dst
    HostName 10.231.0.2
    User admin
    Port 2200
    IdentityFile {tmp_path}/missing_key
    IdentityFile {key}
    UserKnownHostsFile {tmp_path}/known hosts2
    GlobalKnownHostsFile {tmp_path}/global_known

Host *
    User nobody-else
    Port 2999
"""
    )


def test_alias_takes_hostname_user_port_identity_and_known_hosts(tmp_path: Path) -> None:
    target = parse_target("dst", ssh_config=_config(tmp_path))
    assert target == Target("admin", "10.231.0.2", 2200)
    assert target.identity_file == tmp_path / "id_dst"  # the first IdentityFile that exists
    assert target.user_known_hosts == tmp_path / "known"  # a list of files: the first
    assert target.global_known_hosts == tmp_path / "global_known"


def test_the_command_line_wins_over_ssh_config(tmp_path: Path) -> None:
    assert parse_target("root@dst:22", ssh_config=_config(tmp_path)) == Target("root", "10.231.0.2", 22)
    # the first matching value wins, as in ssh: Host * only fills what `Host dst` left out
    assert parse_target("other", ssh_config=_config(tmp_path)) == Target("nobody-else", "other", 2999)


def test_no_entry_keeps_the_defaults() -> None:
    empty = paramiko.SSHConfig.from_text("")
    target = parse_target("10.231.0.2", ssh_config=empty)
    assert target == Target("root", "10.231.0.2", 22)
    assert target.identity_file is None and target.user_known_hosts is None


def test_bad_values_from_ssh_config_are_refused_with_exit_1() -> None:
    for text in ("Host d\n  Port 99999\n", "Host d\n  HostName bad_host!\n", "Host d\n  User 'x y'\n"):
        with pytest.raises(MigrateUsage):
            parse_target("d", ssh_config=paramiko.SSHConfig.from_text(text))


def test_operator_config_is_the_users_then_the_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host mine\n  HostName 10.231.0.9\n  Port 2201\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_target("mine") == Target("root", "10.231.0.9", 2201)
    assert operator_ssh_config().lookup("mine")["hostname"] == "10.231.0.9"


def test_openssh_gets_the_system_known_hosts_file() -> None:
    options = OpenSsh(Target("root", "h"), Path("/k"), None, global_known_hosts=Path("/etc/ssh/ssh_known_hosts"))
    assert "-oGlobalKnownHostsFile=/etc/ssh/ssh_known_hosts" in options.options()
    assert "-oGlobalKnownHostsFile=/dev/null" in OpenSsh(Target("root", "h"), Path("/k"), None).options()


def test_includes_are_followed_relative_to_the_users_ssh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ssh" / "config.d").mkdir(parents=True)
    (tmp_path / ".ssh" / "config").write_text("Include config.d/*.conf\nHost *\n  Port 2999\n")
    (tmp_path / ".ssh" / "config.d" / "dst.conf").write_text("Host inc\n  HostName 10.231.0.7\n  Port 2202\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_target("inc") == Target("root", "10.231.0.7", 2202)
    (tmp_path / ".ssh" / "config.d" / "loop.conf").write_text("Include config.d/loop.conf\n")
    with pytest.raises(MigrateUsage, match="nested"):
        parse_target("inc")
