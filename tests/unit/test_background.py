"""vzpy.background: imports started in a thread. Each check runs in a fresh interpreter, where the module
imported is not loaded yet, with this checkout's src/ first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_module_is_imported_in_a_thread() -> None:
    result = run(
        "import sys, threading\n"
        "from vzpy import background\n"
        "assert 'colorsys' not in sys.modules\n"
        "thread = background.import_soon('colorsys')\n"
        "assert thread is not None and thread is not threading.current_thread()\n"
        "thread.join(30)\n"
        "print('colorsys' in sys.modules, background.import_soon('colorsys'))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True None\n"  # nothing to do the second time


def test_a_failed_import_says_nothing_and_is_raised_by_the_callers_own_import() -> None:
    result = run(
        "from vzpy import background\n"
        "background.import_soon('vzpy_no_such_module', 'colorsys').join(30)\n"
        "import sys\n"
        "print('colorsys' in sys.modules)\n"
        "try:\n"
        "    import vzpy_no_such_module\n"
        "except ImportError:\n"
        "    print('raised here')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no traceback from the thread
    assert result.stdout == "False\nraised here\n"  # the modules after a failed one are left to their callers


SLOW_MODULE = "import time\ntime.sleep(0.5)\nVALUE = 1\n"
FORK_DURING_THE_IMPORT = """
import os, signal, sys, time
from vzpy import background
background.import_soon("vzpy_slow_module")
while "vzpy_slow_module" not in sys.modules:  # the thread runs the module's body (0.5 s) from now on
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a child stuck on the lock ends (SIGALRM) rather than hanging on
    import vzpy_slow_module
    os._exit(0 if vzpy_slow_module.VALUE == 1 else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_fork_waits_for_the_import_so_the_child_can_import_the_module(tmp_path: Path) -> None:
    """Without the wait, the child inherits the module's import lock held by a thread it does not have, and
    its own import of the module never returns."""
    (tmp_path / "vzpy_slow_module.py").write_text(SLOW_MODULE)
    result = subprocess.run(
        [sys.executable, "-c", FORK_DURING_THE_IMPORT],
        env={**os.environ, "PYTHONPATH": f"{SRC}:{tmp_path}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0\n"
