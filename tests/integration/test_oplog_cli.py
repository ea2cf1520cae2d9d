"""The operation log through the real command line: every state-changing command leaves one line with its
exit code, failures included; a log that cannot be written is one warning, and the command still succeeds."""

from __future__ import annotations

import re

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root


def set_global(vz: VzRoot, line: str) -> None:
    with vz.conf.open("a") as f:
        f.write(line + "\n")


def test_each_state_change_is_one_line_with_its_exit_code(vzroot: VzRoot) -> None:
    log = vzroot.base / "ops.log"
    set_global(vzroot, f'LOGFILE="{log}"')
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    vzroot.run("start", "101", check=True)
    again = vzroot.run("start", "101")
    assert again.returncode == 32
    vzroot.run("exec", "101", "true", check=True)  # not a state change: no line
    vzroot.run("status", "101", check=True)
    vzroot.run("stop", "101", check=True)
    lines = log.read_text().splitlines()
    assert [re.search(r"vzpy\[\d+\]: CT (\S+): (\S+): exit (\d+)", line).groups() for line in lines] == [  # type: ignore[union-attr]
        ("101", "create", "0"),
        ("101", "start", "0"),
        ("101", "start", "32"),
        ("101", "stop", "0"),
    ]
    assert "exit 32: CT 101 is " in lines[2]  # the error's first line
    assert lines[1].endswith("(vzpy start 101)")


def test_an_unwritable_log_warns_once_and_fails_nothing(vzroot: VzRoot) -> None:
    set_global(vzroot, f'LOGFILE="{vzroot.base}/no/such/dir/ops.log"')
    result = vzroot.run("create", "101", "--ostemplate", "minimal")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("cannot write the operation log") == 1


def test_logging_no_writes_nothing(vzroot: VzRoot) -> None:
    log = vzroot.base / "ops.log"
    set_global(vzroot, f'LOGFILE="{log}"')
    set_global(vzroot, 'LOGGING="no"')
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    assert not log.exists()
