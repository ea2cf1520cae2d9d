"""The operation log (vzpy.oplog): where it goes, what a line holds, and that it never fails a command."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from vzpy import oplog
from vzpy.config import GlobalConfig
from vzpy.errors import AlreadyRunning


def _gconf(tmp_path: Path, **values: str) -> GlobalConfig:
    return GlobalConfig(path=tmp_path / "vz.conf", values=values, exists=True)


def test_logfile_default_override_and_off(tmp_path: Path) -> None:
    assert oplog.logfile(_gconf(tmp_path)) == Path("/var/log/vzpy.log")
    assert oplog.logfile(_gconf(tmp_path, LOGFILE="/srv/x.log")) == Path("/srv/x.log")
    assert oplog.logfile(_gconf(tmp_path, LOGGING="no", LOGFILE="/srv/x.log")) is None


def test_line_has_time_ct_operation_exit_code_and_no_control_characters() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    line = oplog.format_line("101", "start", 32, ["vzpy", "start", "101"], "CT 101 is running\nsecond", now=now, pid=7)
    assert line == "2026-01-02T03:04:05.000+00:00 vzpy[7]: CT 101: start: exit 32: CT 101 is running (vzpy start 101)\n"
    evil = oplog.format_line("101", "chkpnt", 16, ["vzpy"], "task \x1b[2Jx\rfake\nline", now=now, pid=7)
    assert evil.count("\n") == 1 and "\x1b" not in evil and "\r" not in evil


def test_record_appends_one_line_per_operation(tmp_path: Path) -> None:
    log = tmp_path / "ops.log"
    gconf = _gconf(tmp_path, LOGFILE=str(log))
    oplog.record(gconf, "101", "start", 0, "", print, argv=["vzpy", "start", "101"])
    oplog.record(gconf, "101", "stop", 0, "", print, argv=["vzpy", "stop", "101"])
    lines = log.read_text().splitlines()
    assert [line.split(": ", 2)[1:] for line in lines] == [
        ["CT 101", "start: exit 0 (vzpy start 101)"],
        ["CT 101", "stop: exit 0 (vzpy stop 101)"],
    ]


def test_unwritable_log_warns_once_and_fails_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oplog, "_warned", False)
    gconf = _gconf(tmp_path, LOGFILE=str(tmp_path / "missing-dir" / "ops.log"))
    warnings: list[str] = []
    oplog.record(gconf, "101", "start", 0, "", warnings.append)
    oplog.record(gconf, "101", "stop", 0, "", warnings.append)
    assert len(warnings) == 1 and "cannot write the operation log" in warnings[0] and "LOGGING=no" in warnings[0]


def test_logging_no_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "ops.log"
    oplog.record(_gconf(tmp_path, LOGFILE=str(log), LOGGING="no"), "101", "start", 0, "", print)
    assert not log.exists()


def test_exit_codes_match_main() -> None:
    assert oplog.exit_code_of(AlreadyRunning("x")) == 32
    assert oplog.exit_code_of(KeyboardInterrupt()) == 130
    assert oplog.exit_code_of(RuntimeError("x")) == 3
