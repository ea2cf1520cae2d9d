"""Man page and bash completion as `make setup` installs them (scripts/install-extras.sh into a DESTDIR): the
page documents every command and option of the live CLI, and the completion script completes in real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from helpers import require_real
from vzpy.cli import cli
from vzpy.manpage import escape, walk

REPO = Path(__file__).resolve().parents[2]
MAN = "usr/local/share/man/man8/vzpy.8"
COMPLETION = "usr/local/share/bash-completion/completions/vzpy"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destdir = tmp_path_factory.mktemp("destdir")
    vzpy = shutil.which("vzpy") or "/usr/local/sbin/vzpy"
    env = {**os.environ, "DESTDIR": str(destdir), "VZPY_BIN": vzpy, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-extras.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return destdir


def test_install_puts_unit_page_completion_and_logrotate_in_place(installed: Path) -> None:
    for path in ("etc/systemd/system/vzpy.service", "etc/logrotate.d/vzpy", MAN, COMPLETION):
        assert (installed / path).stat().st_size > 0, path
    assert (installed / "etc/systemd/system/vzpy.service").read_bytes() == (
        REPO / "packaging/vzpy.service"
    ).read_bytes()


def test_systemd_accepts_the_installed_unit(installed: Path) -> None:
    """systemd's own check of the unit: its syntax, that ExecStart/ExecStop exist, that man:vzpy(8) resolves."""
    if shutil.which("systemd-analyze") is None:
        if require_real():  # make setup installs systemd: missing, the setup is broken
            pytest.fail("systemd-analyze is not installed", pytrace=False)
        pytest.skip("systemd-analyze is not installed")
    env = {**os.environ, "MANPATH": str(installed / "usr/local/share/man")}
    unit = installed / "etc/systemd/system/vzpy.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_man_page_lists_every_command_and_option_of_the_live_cli(installed: Path) -> None:
    page = (installed / MAN).read_text()
    commands = list(walk(cli))
    assert {" ".join(path) for path, _ in commands} >= {"start", "stop", "chkpnt", "restore", "migrate", "boot start"}
    for path, command in commands:
        assert f".SS {escape(' '.join(path))}\n" in page, path
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for name in param.opts + param.secondary_opts:
                    assert escape(name) in page.split(f".SS {escape(' '.join(path))}\n", 1)[1], (path, name)
    man = shutil.which("man")
    if man:  # the page renders (groff accepts it) and shows a command's option
        shown = subprocess.run(
            [man, "-l", str(installed / MAN)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"},
        )
        assert shown.returncode == 0 and "--dumpfile" in shown.stdout.replace("\u2010", "-")


def _complete(installed: Path, words: str) -> list[str]:
    """COMPREPLY of the installed completion for the command line `words` (cursor at its end)."""
    script = f"""
source {installed / COMPLETION}
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
[[ "{words}" == *" " ]] && COMP_WORDS+=("") && COMP_CWORD=${{#COMP_WORDS[@]}}-1
_vzpy_completion vzpy
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_completion_completes_commands_subcommands_and_options(installed: Path) -> None:
    assert _complete(installed, "vzpy chk") == ["chkpnt"]
    assert sorted(_complete(installed, "vzpy boot st")) == ["start", "stop"]
    assert "--dumpfile" in _complete(installed, "vzpy restore 101 --dump")
