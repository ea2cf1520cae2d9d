"""proc.spawn: deadlines kill, errors carry stderr's tail, every child is reaped, stdout is read as lines."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from vzpy import proc
from vzpy.errors import CommandFailed, VzError


class Boom(VzError):
    exit_code = 42


def _gone(pid: int) -> bool:
    """True once pid is neither running nor a zombie waiting for us."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return not Path(f"/proc/{pid}").exists()


def test_finish_returns_the_exit_code() -> None:
    with proc.spawn(["sh", "-c", "exit 0"], timeout=30) as child:
        assert child.finish() == 0
        assert child.returncode == 0


def test_a_failure_raises_the_given_error_with_stderr_tail() -> None:
    script = "for i in $(seq 1 20); do echo line$i >&2; done; exit 3"
    with (
        proc.spawn(["sh", "-c", script], timeout=30, what="the thing", error=Boom) as child,
        pytest.raises(Boom) as info,
    ):
        child.finish()
    assert info.value.message == "the thing failed with exit code 3"
    assert info.value.detail.splitlines() == [f"line{i}" for i in range(13, 21)]


def test_finish_without_check_returns_a_failing_code() -> None:
    with proc.spawn(["sh", "-c", "exit 5"], timeout=30) as child:
        assert child.finish(check=False) == 5


def test_deadline_kills_and_reaps_and_says_timed_out() -> None:
    with proc.spawn(["sh", "-c", "echo started >&2; exec sleep 60"], timeout=0.5, what="sleeper") as child:
        pid = child.pid
        with pytest.raises(CommandFailed) as info:
            child.finish()
        assert child.returncode == -signal.SIGKILL
        assert _gone(pid)
    assert info.value.message == "sleeper: timed out after 0.5s"
    assert info.value.detail == "started"


def test_close_kills_and_reaps_a_running_child() -> None:
    child = proc.spawn(["sleep", "60"], timeout=None)
    pid = child.pid
    child.close()
    assert child.returncode == -signal.SIGKILL
    assert _gone(pid)
    child.close()  # idempotent


def test_leaving_the_block_on_an_error_reaps_too() -> None:
    with pytest.raises(RuntimeError), proc.spawn(["sleep", "60"], timeout=None) as child:
        pid = child.pid
        raise RuntimeError("caller failed")
    assert _gone(pid)


def test_close_with_grace_lets_sigterm_work() -> None:
    child = proc.spawn(["sleep", "60"], timeout=None)
    child.close(grace=10)
    assert child.returncode == -signal.SIGTERM


def test_close_with_grace_kills_what_ignores_sigterm() -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    child = proc.spawn(["sh", "-c", script], timeout=30, stdout="pipe")
    assert child.stdout.readline() == b"ready\n"
    child.close(grace=0.2)
    assert child.returncode == -signal.SIGKILL


def test_wait_returns_none_while_it_runs() -> None:
    with proc.spawn(["sleep", "60"], timeout=30) as child:
        assert child.wait(0.05) is None
        assert child.poll() is None


def test_a_missing_program_raises_the_error() -> None:
    with pytest.raises(Boom, match=r"^probe: cannot run /nonexistent/prog: No such file"):
        proc.spawn(["/nonexistent/prog"], timeout=30, what="probe", error=Boom)


def test_lines_split_on_any_separator_to_eof() -> None:
    script = r"printf 'a\rb\nc\r\nd'"
    with proc.spawn(["sh", "-c", script], timeout=30, stdout="pipe") as child:
        assert list(child.lines(b"\r\n")) == [b"a", b"b", b"c", b"", b"d"]
        assert child.finish() == 0


def test_lines_past_the_deadline_kill_and_raise() -> None:
    script = "echo one; exec sleep 60"
    with proc.spawn(["sh", "-c", script], timeout=0.5, stdout="pipe", error=Boom, what="reader") as child:
        seen = []
        with pytest.raises(Boom, match=r"^reader: timed out after 0.5s$"):
            seen.extend(child.lines())
        assert seen == [b"one"]
        assert child.returncode == -signal.SIGKILL


def test_stdout_to_stderr_lands_in_the_tail() -> None:
    with proc.spawn(["sh", "-c", "echo out; echo err >&2; exit 1"], timeout=30, stdout="stderr") as child:
        child.finish(check=False)
        assert child.stderr_tail() == "out\nerr"


def test_pass_fds_reach_the_child() -> None:
    read_end, write_end = os.pipe()
    try:
        argv = [sys.executable, "-c", f"import os; os.write({write_end}, b'hi')"]
        with proc.spawn(argv, timeout=30, pass_fds=[write_end]) as child:
            assert child.finish() == 0
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 16) == b"hi"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_new_session_leaves_our_session() -> None:
    with proc.spawn(["sleep", "60"], timeout=30, new_session=True) as child:
        assert os.getsid(child.pid) == child.pid
    with proc.spawn(["sleep", "60"], timeout=30) as child:
        assert os.getsid(child.pid) == os.getsid(0)


def test_failed_names_a_signal_death() -> None:
    with proc.spawn(["sleep", "60"], timeout=30, what="sleeper") as child:
        child.kill()
        assert child.failed().message == "sleeper killed by signal 9"
