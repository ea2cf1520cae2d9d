"""vzpy's console entry ends the process without the interpreter's teardown of every module and object (tens of
ms after a chkpnt), keeping what an exit must do: the exit code, stdout and stderr flushed, threads waited
for, atexit handlers run. Each case runs main() in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# main() with compat.dispatch replaced: it prints to both streams (buffered: a pipe), registers an atexit
# handler, starts a thread, leaves an object whose finalizer would run in the teardown, and returns CODE.
PROBE = """
import atexit, sys, threading, time
from vzpy.cli import compat, main

class Torn:
    def __del__(self):
        print("torn down", flush=True)

keep = Torn()

def dispatch(argv0, args):
    print("out", end="")
    print("err", end="", file=sys.stderr)
    atexit.register(lambda: print(" handler", end=""))
    threading.Thread(target=lambda: (time.sleep(0.2), print(" thread", end=""))).start()
    return int(args[0])

compat.dispatch = dispatch
if len(sys.argv) > 2:  # a handler registered before main() (as coverage's): the normal exit is kept
    atexit.register(lambda: print(" early", end=""))
main()
"""


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_exit_skips_the_teardown_but_keeps_code_output_threads_and_handlers() -> None:
    result = run_main("3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out thread handler", "err")


def test_a_handler_registered_before_main_keeps_the_normal_exit() -> None:
    result = run_main("0", "early")
    assert result.returncode == 0
    assert result.stdout == "out thread handler earlytorn down\n"
