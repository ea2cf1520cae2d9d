"""Heavy imports started early in a thread, so that they run while the command waits for something else.

Python runs one thread at a time, so this gains only where the main thread waits outside the interpreter
(a subprocess, CRIU's socket, a copy in the kernel): the import then uses the other core. The main thread's
own import of the same module waits for the thread's to finish (the import lock), and raises its error if it
failed: nothing is reported from the thread.

os.fork() waits for these imports first: a child forked while a thread held a module's import lock would
wait forever on its own import of that module (the thread does not exist in the child). Programs started
with subprocess (fork and exec, no Python code in the child) are not held up.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Sequence

FORK_WAIT = 60.0  # an import that takes longer is stuck; the fork goes ahead then
_running: list[threading.Thread] = []


def import_soon(*names: str) -> threading.Thread | None:
    """Import the modules `names`, in this order, in a thread; None when all are imported already."""
    missing = [name for name in names if name not in sys.modules]
    if not missing:
        return None
    # not a daemon: an interpreter that exits while a daemon thread imports may crash in its finalization
    thread = threading.Thread(target=_import_quietly, args=(missing,), name="vzpy-import")
    thread.start()
    _running.append(thread)
    return thread


def _import_quietly(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # the caller's own import raises it again, where it is handled
            return


def _finish_before_fork() -> None:
    while _running:
        thread = _running.pop()
        if thread is not threading.current_thread():
            thread.join(FORK_WAIT)


os.register_at_fork(before=_finish_before_fork)
