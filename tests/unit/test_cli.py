"""The checkout's `vzpy` entry point as a subprocess, against a vz.conf in tmp_path: help, usage errors, exit codes.

`python -m vzpy` with this checkout's src/ first on PYTHONPATH: the code under test, not whatever vzpy is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from vzpy import __version__
from vzpy.cli import EPILOG, cli

SRC = Path(__file__).resolve().parents[2] / "src"
VZPY = [sys.executable, "-m", "vzpy"]

# Commands that exist today; the group may grow (chkpnt, restore, migrate), which the tests pick up from `cli`.
CORE_COMMANDS = {
    "check",
    "create",
    "destroy",
    "enter",
    "exec",
    "list",
    "restart",
    "set",
    "start",
    "status",
    "stop",
    "template",
}


def all_command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand of the click tree, as argv prefixes."""
    paths: list[tuple[str, ...]] = []

    def walk(group: click.Group, prefix: tuple[str, ...]) -> None:
        for name, command in sorted(group.commands.items()):
            paths.append((*prefix, name))
            if isinstance(command, click.Group):
                walk(command, (*prefix, name))

    walk(cli, ())
    return paths


@pytest.fixture
def vzroot(tmp_path: Path) -> Path:
    """A private vz.conf whose directories are all under tmp_path (none created yet)."""
    vz = tmp_path / "vz"
    conf = tmp_path / "vz.conf"
    conf.write_text(
        f'VE_ROOT="{vz}/root/$VEID"\n'
        f'VE_PRIVATE="{vz}/private/$VEID"\n'
        f'CONFDIR="{vz}/conf"\n'
        f'DUMPDIR="{vz}/dump"\n'
        f'TEMPLATE="{vz}/template"\n'
        f'LOCKDIR="{vz}/lock"\n'
        'CGROUP_PARENT="vzpy-unit-cli"\n'
    )
    return conf


def checkout_env(conf: Path | None) -> dict[str, str]:
    """The caller's environment without VZPY_* settings, this checkout's src/ first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZPY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    if conf is not None:
        env["VZPY_CONF"] = str(conf)
    return env


def run(
    *args: str, conf: Path | None, argv0: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = checkout_env(conf)
    return subprocess.run([*(argv0 or VZPY), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_command_runs_this_checkouts_code() -> None:
    """src/ comes before site-packages, so an installed vzpy (editable from elsewhere, or not) never wins."""
    show = "import json, sys, vzpy.cli; print(json.dumps([vzpy.cli.__file__, sys.path]))"
    result = subprocess.run(
        [sys.executable, "-c", show], env=checkout_env(None), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    cli_file, path = json.loads(result.stdout)
    assert Path(cli_file) == SRC / "vzpy" / "cli" / "__init__.py"
    site = min(i for i, entry in enumerate(path) if entry.endswith("-packages"))
    assert str(SRC) in path[:site], path


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.splitlines()


# --- help and version


def test_core_commands_are_registered() -> None:
    assert set(cli.commands) >= CORE_COMMANDS


def test_top_level_help_lists_every_command_and_the_examples(vzroot: Path) -> None:
    result = run("--help", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: vzpy [OPTIONS] COMMAND [ARGS]...\n")
    commands = result.stdout.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    listed = {line.split()[0] for line in commands.splitlines() if line.startswith("  ") and line.strip()}
    assert listed == {name for name, command in cli.commands.items() if not command.hidden}
    assert listed >= CORE_COMMANDS
    for example in [
        "vzpy create 101 --ostemplate minimal --ipadd 10.0.0.101",
        "vzpy start 101 && vzpy exec 101 hostname",
        "vzpy list --json",
        "vzpy stop 101 && vzpy destroy 101",
    ]:
        assert f"    {example}\n" in result.stdout
        assert example in EPILOG
    assert "Examples:" in result.stdout
    for option in ("--debug", "-q, --quiet", "--version", "-h, --help"):
        assert option in result.stdout


def test_short_help_option(vzroot: Path) -> None:
    assert run("-h", conf=vzroot).stdout == run("--help", conf=vzroot).stdout


def test_help_needs_no_config(tmp_path: Path) -> None:
    result = run("--help", conf=tmp_path / "missing.conf")
    assert result.returncode == 0
    assert "Commands:" in result.stdout


@pytest.mark.parametrize("path", all_command_paths(), ids=" ".join)
def test_each_command_help(vzroot: Path, path: tuple[str, ...]) -> None:
    result = run(*path, "--help", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Usage: vzpy {' '.join(path)} [OPTIONS]")
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    first_doc_line = (command.help or "").strip().splitlines()[0]
    assert first_doc_line.split()[0] in result.stdout
    assert "-h, --help" in result.stdout


def test_version(vzroot: Path) -> None:
    result = run("--version", conf=vzroot)
    assert result.returncode == 0
    assert result.stdout == f"vzpy, version {__version__}\n"
    assert __version__ == "0.1.0"


def test_installed_entry_point(vzroot: Path) -> None:
    """The console script `make setup` installs reaches the same command line (installed editable here)."""
    script = Path(sys.executable).with_name("vzpy")
    result = run("--version", conf=vzroot, argv0=[str(script)])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"vzpy, version {__version__}\n"


# --- usage errors: exit 20 (VZ_INVALID_PARAMETER_SYNTAX); a missing CTID 21, as vzctl's "CT ID missing"


@pytest.mark.parametrize(
    ("args", "error", "code"),
    [
        (("bogus",), "vzpy: error: No such command 'bogus'. (see `vzpy --help`)", 20),
        (("start",), "vzpy: error: Missing argument 'CTID'. (see `vzpy start --help`)", 21),
        (("status",), "vzpy: error: Missing argument 'CTID'. (see `vzpy status --help`)", 21),
        (("create", "101"), "vzpy: error: Missing option '--ostemplate'. (see `vzpy create --help`)", 20),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_usage_errors_exit_20(vzroot: Path, args: tuple[str, ...], error: str, code: int) -> None:
    result = run(*args, conf=vzroot)
    assert result.returncode == code
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in stderr_lines(result) if "rror" in line]
    assert errors == [error]
    assert stderr_lines(result)[-1] == error


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("stop", "101", "--no-such-flag"), "--no-such-flag"),
        (("list", "--no-such-flag"), "--no-such-flag"),
        (("set", "101", "--cpus", "-1"), "--cpus"),
        (("set", "101", "--numproc", "many"), "--numproc"),
        (("template", "create", "debian-9"), "debian-9"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_other_syntax_errors_exit_20(vzroot: Path, args: tuple[str, ...], word: str) -> None:
    # click words these messages itself (and rewords them between releases): check the gist, not the text
    result = run(*args, conf=vzroot)
    assert result.returncode == 20
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = stderr_lines(result)[-1]
    assert last.startswith("vzpy: error: ")
    assert word in last


@pytest.mark.parametrize("args", [("bogus",), ("start",)], ids=" ".join)
def test_usage_error_is_one_line(vzroot: Path, args: tuple[str, ...]) -> None:
    result = run(*args, conf=vzroot)
    assert result.returncode in (20, 21)
    assert len(stderr_lines(result)) == 1


# --- commands that need no root


def test_list_json_on_an_empty_root(vzroot: Path) -> None:
    result = run("list", "--json", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
    assert json.loads(result.stdout) == []
    assert result.stderr == ""


def test_list_all_json_on_an_empty_confdir(vzroot: Path, tmp_path: Path) -> None:
    (tmp_path / "vz" / "conf").mkdir(parents=True)
    result = run("list", "-a", "--json", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_list_on_an_empty_root_says_so_as_vzlist_does(vzroot: Path) -> None:
    result = run("list", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "Container(s) not found\n"


def test_status_of_a_missing_ct(vzroot: Path) -> None:
    result = run("status", "404", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "CTID 404 deleted unmounted down\n"
    assert result.stderr == ""


def test_status_json_of_a_missing_ct(vzroot: Path) -> None:
    result = run("status", "404", "--json", conf=vzroot)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "ctid": "404",
        "exist": False,
        "mounted": False,
        "status": "stopped",
        "init_pid": None,
        "suspended": False,
        "dumpfile": None,
    }


def test_start_of_a_missing_ct_exits_14_with_one_line(vzroot: Path, tmp_path: Path) -> None:
    result = run("start", "404", conf=vzroot)
    assert result.returncode == 14
    assert result.stdout == ""
    assert stderr_lines(result) == [
        f"vzpy: error: CT 404 does not exist: {tmp_path}/vz/conf/404.conf not found; "
        "create it with `vzpy create 404 --ostemplate minimal`"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["stop", "destroy", "restart", "enter"])
def test_other_commands_on_a_missing_ct_exit_14(vzroot: Path, command: str) -> None:
    result = run(command, "404", conf=vzroot)
    assert result.returncode == 14
    assert len(stderr_lines(result)) == 1
    assert stderr_lines(result)[0].startswith("vzpy: error: CT 404 does not exist: ")


def test_debug_shows_the_traceback(vzroot: Path) -> None:
    result = run("--debug", "start", "404", conf=vzroot)
    assert result.returncode == 14
    lines = stderr_lines(result)
    assert lines[0] == "Traceback (most recent call last):"
    assert any(line.startswith("vzpy.errors.ConfigNotFound: CT 404 does not exist") for line in lines)
    assert lines[-1].startswith("vzpy: error: CT 404 does not exist: ")


def test_invalid_ctid_exits_21(vzroot: Path) -> None:
    result = run("status", "a/b", conf=vzroot)
    assert result.returncode == 21
    assert stderr_lines(result) == [
        "vzpy: error: invalid CTID 'a/b': use a number or a name of letters, digits, '_', '.', '-'"
    ]


def test_missing_vzpy_conf_exits_10(tmp_path: Path) -> None:
    missing = tmp_path / "missing.conf"
    result = run("list", conf=missing)
    assert result.returncode == 10
    assert stderr_lines(result) == [
        f"vzpy: error: global config {missing} not found; create it or unset VZPY_CONF to use /etc/vz/vz.conf"
    ]


def test_an_unparsable_vz_conf_line_is_skipped_with_a_warning_as_vzctl_does(tmp_path: Path) -> None:
    conf = tmp_path / "vz.conf"
    conf.write_text(f'# test\nLOCKDIR="/tmp/x\nCONFDIR={tmp_path}/conf\n')
    result = run("status", "101", conf=conf)
    assert result.returncode == 0
    assert stderr_lines(result) == [f"vzpy: warning: {conf}:2: unmatched quote in '\"/tmp/x', line ignored"]


def test_start_of_a_missing_ct_writes_nothing(vzroot: Path, tmp_path: Path) -> None:
    run("start", "404", conf=vzroot)
    run("status", "404", conf=vzroot)
    run("list", "--json", conf=vzroot)
    assert not (tmp_path / "vz").exists()
