"""Work started early in a thread, so that it runs while the command waits for something else: heavy imports
(import_soon), and results wanted later (InThread).

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
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

from vzpy.errors import VzError

T = TypeVar("T")

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


class InThread(Generic[T]):
    """fn() run in a thread from now on; result() waits for it (and raises what it raised, or `late`, the
    caller's error type, when it is not done in time). A daemon thread: one stuck past its caller's deadline
    does not hold up vzpy's exit."""

    def __init__(self, fn: Callable[[], T], name: str, *, late: type[VzError]) -> None:
        self._fn, self._late = fn, late
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # re-raised in the caller's thread
            self._error = e

    def result(self, timeout: float | None) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise self._late(f"{self._thread.name} not done within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def _finish_before_fork() -> None:
    while _running:
        thread = _running.pop()
        if thread is not threading.current_thread():
            thread.join(FORK_WAIT)


os.register_at_fork(before=_finish_before_fork)
