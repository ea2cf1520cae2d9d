"""create_time and process_name: what psutil gives, read from /proc (chkpnt and restore do not import psutil)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vzpy.container import create_time, process_name

LONG_NAME = "a-process-named-past-fifteen-chars"


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose kernel name (15 characters) is its program's name cut short."""
    program = tmp_path / LONG_NAME
    program.symlink_to(shutil.which("sleep") or "/bin/sleep")
    with subprocess.Popen([str(program), "60"]) as process:
        try:
            deadline = time.monotonic() + 10  # Popen returns as exec closes our pipe: the name comes just after
            while Path(f"/proc/{process.pid}/comm").read_text().strip() != LONG_NAME[:15]:
                assert time.monotonic() < deadline, "the program never got its name"
                time.sleep(0.001)
            yield process
        finally:
            process.kill()


def test_create_time_is_psutils(sleeper: subprocess.Popen[bytes]) -> None:
    for pid in (1, os.getpid(), sleeper.pid):
        assert create_time(pid) == psutil.Process(pid).create_time()


def test_process_name_is_psutils_also_past_fifteen_characters(sleeper: subprocess.Popen[bytes]) -> None:
    assert Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == LONG_NAME[:15]
    assert process_name(sleeper.pid) == psutil.Process(sleeper.pid).name() == LONG_NAME
    assert process_name(os.getpid()) == psutil.Process().name()


def test_a_gone_process_raises_oserror() -> None:
    with subprocess.Popen(["true"]) as process:
        process.wait()
    with pytest.raises(OSError):
        process_name(process.pid)
    with pytest.raises(OSError):
        create_time(process.pid)
