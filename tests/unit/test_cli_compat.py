"""vzpy under vzctl's and vzmigrate's names: their argv rewritten into vzpy's (pure functions), the exit codes
they define, and the entry's dispatch by argv[0] (through the checkout's `python -m vzpy` under other names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from vzpy.cli import cli, compat, usage_exit_code
from vzpy.cli.compat import SshOptions, VzctlCall, attached_nodeps, parse_ssh_options, vzctl_call, vzmigrate_args
from vzpy.errors import InvalidSyntax, InvalidValue, NetworkError

SRC = Path(__file__).resolve().parents[2] / "src"


# --- vzctl's argv


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["start", "101"], ["start", "101"]),
        (["--quiet", "status", "101"], ["-q", "status", "101"]),
        (["--verbose", "--verbose", "stop", "101", "--fast"], ["stop", "101", "--fast"]),
        (["--skiplock", "stop", "101"], ["stop", "101"]),
        (["suspend", "101", "--dumpfile", "/d"], ["chkpnt", "101", "--dumpfile", "/d"]),
        (["resume", "101"], ["restore", "101"]),
        (["delete", "101"], ["destroy", "101"]),
        (["destroy", "101"], ["destroy", "101"]),
        (["set", "101", "--hostname", "h", "--save"], ["set", "101", "--hostname", "h", "--save"]),
        (["chkpnt", "101", "--skip_arpdetect", "--flags", "3", "--context=7"], ["chkpnt", "101"]),
        (["restore", "101", "--context", "7", "--skip_arpdetect"], ["restore", "101"]),
        (["start", "101", "--skip-fsck", "--skip-remount"], ["start", "101"]),
        (["stop", "101", "--skip-umount"], ["stop", "101"]),
    ],
)
def test_vzctl_commands_become_vzpys(argv: list[str], expected: list[str]) -> None:
    assert vzctl_call(argv) == VzctlCall(expected)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["exec", "101", "ps ax | grep x"], "ps ax | grep x"),
        (["exec", "101", "ls", "-l", "/"], "ls -l /"),
        (["exec2", "101", "echo", "", "x"], "echo '' x"),  # an empty argument stays one, as vzctl writes it
        (["exec", "101", "-"], "-"),
        (["exec", "101", "-", "ignored"], "-"),  # `-` first: commands from stdin
        (["exec", "101", "--", "x"], "-- x"),
    ],
)
def test_vzctl_exec_joins_its_arguments_into_one_shell_line(argv: list[str], line: str) -> None:
    call = vzctl_call(argv)
    assert call.args == ["exec", "101", "--", line]
    assert call.exec_name == argv[0]


@pytest.mark.parametrize(
    ("argv", "error", "code"),
    [
        ([], InvalidSyntax, 20),
        (["--quiet"], InvalidSyntax, 20),
        (["frobnicate", "101"], InvalidSyntax, 20),
        (["list"], InvalidSyntax, 20),  # vzctl has no list: vzlist
        (["start"], InvalidValue, 21),  # vzctl: "CT ID missing"
        (["exec"], InvalidValue, 21),
        (["exec", "101"], InvalidSyntax, 20),  # "No command line given for exec"
    ],
)
def test_vzctl_usage_errors_have_vzctls_codes(argv: list[str], error: type[Exception], code: int) -> None:
    with pytest.raises(error) as info:
        vzctl_call(argv)
    assert getattr(info.value, "exit_code", None) == code


@pytest.mark.parametrize(
    ("name", "code", "expected"),
    [
        ("exec", 0, 0),
        ("exec", 7, 8),  # vzctl exec: any failure is VZ_COMMAND_EXECUTION_ERROR
        ("exec", 31, 8),  # ... a CT not running included
        ("exec", 14, 14),  # no such CT: found before the action, as vzctl does
        ("exec2", 7, 7),  # exec2: the command's own code
        ("exec2", 31, 31),
        (None, 32, 32),
    ],
)
def test_exec_exit_codes(name: str | None, code: int, expected: int) -> None:
    assert compat.exec_exit_code(name, code) == expected


# --- vzmigrate's argv


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-f", "node2", "101"], ["--nodeps=all", "node2", "101"]),  # -f never takes the next word
        (["--nodeps", "node2", "101"], ["--nodeps=all", "node2", "101"]),
        (["-fcpu", "node2", "101"], ["--nodeps=cpu", "node2", "101"]),
        (["--nodeps=cpu,ipv6", "node2", "101"], ["--nodeps=cpu,ipv6", "node2", "101"]),
        (["--rsync", "-f", "node2", "101"], ["--rsync", "-f", "node2", "101"]),  # -f as an option's value
        (["-r", "no", "node2", "101", "-f"], ["-r", "no", "node2", "101", "--nodeps=all"]),
        (["node2", "101", "--", "-f"], ["node2", "101", "--", "-f"]),
    ],
)
def test_nodeps_takes_only_an_attached_value(argv: list[str], expected: list[str]) -> None:
    assert attached_nodeps(argv) == expected


def test_vzmigrate_argv_is_vzpy_migrate() -> None:
    assert vzmigrate_args(["--live", "-f", "node2", "101"]) == ["migrate", "--live", "--nodeps=all", "node2", "101"]
    assert vzmigrate_args([]) == ["migrate", "--help"]  # vzmigrate without arguments shows its usage, exit 0
    assert vzmigrate_args(["--usage"]) == ["migrate", "--help"]


def test_vzpy_migrate_reads_f_as_vzmigrate_does() -> None:
    assert compat.vzpy_args(["-q", "migrate", "-f", "h", "1"]) == ["-q", "migrate", "--nodeps=all", "h", "1"]
    assert compat.vzpy_args(["exec", "1", "-f"]) == ["exec", "1", "-f"]


def migrate_params(args: list[str]) -> dict[str, object]:
    command = cli.commands["migrate"]
    with command.make_context("migrate", args) as ctx:
        return dict(ctx.params)


def test_vzmigrates_option_names_reach_migrate() -> None:
    params = migrate_params(
        ["--live", "--dry-run", "--ssh=-p 2222", "--rsync=--bwlimit=100", "--ssh-mux", "-v", "-t", "node2", "101"]
    )
    assert params["online"] is True and params["check_only"] is True
    assert params["ssh_opts"] == "-p 2222" and params["rsync_opts"] == "--bwlimit=100"
    assert params["ssh_mux"] is True and params["verbose"] is True and params["times"] is True
    assert migrate_params(attached_nodeps(["-f", "node2", "101"]))["nodeps"] == "all"
    assert migrate_params(["--online", "--check-only", "node2", "101"])["online"] is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-p 2222", SshOptions(port=2222)),
        ("-p2222 -l admin", SshOptions(port=2222, user="admin")),
        (
            "-i ~/.ssh/mig -o UserKnownHostsFile=/etc/kh",
            SshOptions(identity=Path.home() / ".ssh/mig", known_hosts=Path("/etc/kh")),
        ),
        ("-o Port=22 -oUser=root -o BatchMode=yes -o StrictHostKeyChecking=yes", SshOptions(port=22, user="root")),
        ("-o 'IdentityFile /k'", SshOptions(identity=Path("/k"))),
    ],
)
def test_ssh_options_vzpy_honours(text: str, expected: SshOptions) -> None:
    assert parse_ssh_options(text) == expected


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("-c aes128-ctr", "-c"),
        ("-o StrictHostKeyChecking=no", "StrictHostKeyChecking=no"),  # never weakened behind the operator's back
        ("-o ProxyCommand=nc", "ProxyCommand"),
        ("-p 0", "0"),
        ("-p", "-p"),
        ("'unbalanced", "unbalanced"),
    ],
)
def test_ssh_options_vzpy_cannot_honour_are_refused(text: str, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        parse_ssh_options(text)


# --- exit codes


def test_usage_exit_codes() -> None:
    def error_of(args: list[str]) -> click.UsageError:
        try:
            cli.main(args, standalone_mode=False)
        except click.UsageError as e:
            return e
        raise AssertionError(f"{args}: no usage error")

    assert usage_exit_code(error_of(["start"])) == 21  # a missing CTID: vzctl's "CT ID missing"
    assert usage_exit_code(error_of(["stop", "101", "--bogus"])) == 20
    assert usage_exit_code(error_of(["migrate", "node2"])) == 1  # vzmigrate's MIG_ERR_USAGE
    assert usage_exit_code(error_of(["migrate", "--bogus", "node2", "101"])) == 1


def test_veth_error_is_vzctls_code() -> None:
    assert NetworkError("x").exit_code == 130  # VZ_VETH_ERROR in vzctl's include/vzerror.h


# --- the entry, by the name it is invoked as


def run_as(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The checkout's entry with argv[0] = name (as a link of that name would give it)."""
    conf = tmp_path / "vz.conf"
    conf.write_text(f'CONFDIR="{tmp_path}/conf"\nLOCKDIR="{tmp_path}/lock"\n')
    code = f"import sys; sys.argv[0] = {name!r}; from vzpy.cli import main; main()"
    env = {"PYTHONPATH": str(SRC), "VZPY_CONF": str(conf), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)


def test_dispatch_by_name(tmp_path: Path) -> None:
    assert run_as("/usr/local/sbin/vzctl", "--help", tmp_path=tmp_path).stdout.startswith("Usage: vzctl ")
    missing = run_as("/usr/local/sbin/vzctl", "status", tmp_path=tmp_path)
    assert (missing.returncode, missing.stderr) == (21, "vzpy: error: CT ID missing: `vzctl status CTID`\n")
    assert run_as("vzctl", "status", "101", tmp_path=tmp_path).stdout == "CTID 101 deleted unmounted down\n"
    assert run_as("vzctl", "exec", "101", "true", tmp_path=tmp_path).returncode == 14  # no such CT, as vzctl
    assert run_as("vzctl", "exec2", "101", "true", tmp_path=tmp_path).returncode == 14
    migrate = run_as("vzmigrate", "--bogus", "node2", "101", tmp_path=tmp_path)
    assert migrate.returncode == 1 and "--bogus" in migrate.stderr
    assert run_as("vzmigrate", "node2", "404", tmp_path=tmp_path).returncode == 10  # MIG_ERR_NOEXIST
    vzpy = run_as("vzpy", "exec", "101", "true", tmp_path=tmp_path)
    assert vzpy.returncode == 14 and "CT 101 does not exist" in vzpy.stderr


def test_vzmigrate_of_a_locked_ct_is_mig_err_locked(tmp_path: Path) -> None:
    from vzpy.lock import ct_lock

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "101.conf").write_text('HOSTNAME="ct101"\n')
    with ct_lock(tmp_path / "lock", "101", "stop"):
        result = run_as("vzmigrate", "node2", "101", tmp_path=tmp_path)
    assert result.returncode == 20, result.stderr  # MIG_ERR_LOCKED, not vzctl's 9
    assert "stop" in result.stderr
