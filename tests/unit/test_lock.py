"""Per-CT flock locks: holder info, fail-fast second acquisition, release on exit, error and SIGKILL."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy.errors import Locked
from vzpy.lock import CtLocked, Holder, acquire, ct_lock
from vzpy.lock import holder as lock_holder

# Tries to take the lock once; prints a JSON verdict. flock(2) is per open file, so a separate process is the
# honest way to see what a second vzpy invocation would see.
TRY_LOCK = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from vzpy.errors import Locked
    from vzpy.lock import ct_lock
    start = time.monotonic()
    try:
        with ct_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
            content = (Path(sys.argv[1]) / (sys.argv[2] + ".lck")).read_text()
            verdict = {"locked": True, "content": content}
    except Locked as e:
        verdict = {"locked": False, "message": e.message, "exit_code": e.exit_code}
    verdict["elapsed"] = time.monotonic() - start
    print(json.dumps(verdict))
    """
)

# Takes the lock, says so, then waits to be killed.
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vzpy.lock import ct_lock
    with ct_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def try_lock(lockdir: Path, ctid: str = "101", operation: str = "stop") -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(lockdir), ctid, operation],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding CT 101's lock for "chkpnt"."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "lock"), "101", "chkpnt"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "locked\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_acquire_writes_pid_and_operation(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "start"):
        assert (lockdir / "101.lck").read_text() == f"{os.getpid()} start\n"
    assert lockdir.is_dir()


def test_lockdir_is_created_private(tmp_path: Path) -> None:
    lockdir = tmp_path / "a" / "b" / "lock"
    old = os.umask(0o022)
    try:
        with ct_lock(lockdir, "101", "start"):
            pass
    finally:
        os.umask(old)
    assert lockdir.stat().st_mode & 0o777 == 0o700
    assert (lockdir / "101.lck").stat().st_mode & 0o777 == 0o600


def test_content_cleared_after_release(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "start"):
        pass
    assert (lockdir / "101.lck").read_text() == ""


def test_second_acquisition_fails_fast_naming_the_holder(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "chkpnt"):
        verdict = try_lock(lockdir, "101", "stop")
        assert verdict["locked"] is False
        assert verdict["exit_code"] == 9
        assert verdict["message"] == (
            f"CT 101 is locked by vzpy pid {os.getpid()} (chkpnt); wait for it to finish and retry"
        )
        assert isinstance(verdict["elapsed"], float)
        assert verdict["elapsed"] < 1.0
        # the failed attempt must not have clobbered the holder's record
        assert (lockdir / "101.lck").read_text() == f"{os.getpid()} chkpnt\n"


def test_lock_is_per_ct(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "start"):
        verdict = try_lock(lockdir, "102", "start")
    assert verdict["locked"] is True


def test_released_on_normal_exit(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "start"):
        pass
    verdict = try_lock(lockdir, "101", "stop")
    assert verdict["locked"] is True
    assert str(verdict["content"]).endswith(" stop\n")


def test_released_when_the_body_raises(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    with pytest.raises(RuntimeError, match="boom"), ct_lock(lockdir, "101", "start"):
        raise RuntimeError("boom")
    assert (lockdir / "101.lck").read_text() == ""
    with ct_lock(lockdir, "101", "start"):
        pass


def test_in_process_reacquire_also_fails_while_held(tmp_path: Path) -> None:
    # flock conflicts between two open files even in one process: nested operations on one CT are refused too.
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "set"), pytest.raises(Locked) as info, ct_lock(lockdir, "101", "stop"):
        pass
    assert info.value.exit_code == 9
    assert info.value.message == f"CT 101 is locked by vzpy pid {os.getpid()} (set); wait for it to finish and retry"


def test_holder_that_wrote_nothing_is_unknown(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    lockdir.mkdir()
    fd = os.open(lockdir / "101.lck", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Locked) as info, ct_lock(lockdir, "101", "stop"):
            pass
    finally:
        os.close(fd)
    assert info.value.message == (
        "CT 101 is locked by vzpy pid unknown (unknown operation); wait for it to finish and retry"
    )


def test_held_by_another_process(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    lockdir = tmp_path / "lock"
    with pytest.raises(Locked) as info, ct_lock(lockdir, "101", "stop"):
        pass
    assert info.value.exit_code == 9
    assert info.value.message == (
        f"CT 101 is locked by vzpy pid {holder.pid} (chkpnt); wait for it to finish and retry"
    )


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    lockdir = tmp_path / "lock"
    assert (lockdir / "101.lck").read_text() == f"{holder.pid} chkpnt\n"
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    # the dead holder's record is still in the file, but the kernel dropped its flock
    assert (lockdir / "101.lck").read_text() == f"{holder.pid} chkpnt\n"
    with ct_lock(lockdir, "101", "start"):
        assert (lockdir / "101.lck").read_text() == f"{os.getpid()} start\n"
    assert (lockdir / "101.lck").read_text() == ""


def test_lock_fd_is_not_inherited(tmp_path: Path) -> None:
    # O_CLOEXEC: a program vzpy runs while holding the lock (criu, the CT's init) must not keep it alive.
    lockdir = tmp_path / "lock"
    with ct_lock(lockdir, "101", "start"):
        child = subprocess.Popen(["sleep", "60"])
    try:
        verdict = try_lock(lockdir, "101", "stop")
        assert verdict["locked"] is True
    finally:
        child.kill()
        child.wait(timeout=10)


# --- the lock object and the holder query (what the migration agent uses)


def test_acquire_holds_across_calls_until_release(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    held = acquire(lockdir, "101", "migrate")
    try:
        assert held.held
        verdict = try_lock(lockdir, "101", "stop")
        assert verdict["locked"] is False
        assert verdict["message"] == (
            f"CT 101 is locked by vzpy pid {os.getpid()} (migrate); wait for it to finish and retry"
        )
    finally:
        held.release()
    assert not held.held
    held.release()  # idempotent
    assert (lockdir / "101.lck").read_text() == ""
    assert try_lock(lockdir, "101", "stop")["locked"] is True


def test_busy_error_carries_the_holder(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(CtLocked) as info:
        acquire(tmp_path / "lock", "101", "migrate")
    assert isinstance(info.value, Locked)
    assert info.value.holder == Holder(str(holder.pid), "chkpnt")
    assert str(info.value.holder) == f"vzpy pid {holder.pid} (chkpnt)"


def test_holder_names_another_process(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    assert lock_holder(tmp_path / "lock", "101") == Holder(str(holder.pid), "chkpnt")
    assert lock_holder(tmp_path / "lock", "102") is None


def test_holder_of_a_free_lock_is_none(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    assert lock_holder(lockdir, "101") is None  # no file at all
    with ct_lock(lockdir, "101", "start"):
        assert lock_holder(lockdir, "101") == Holder(str(os.getpid()), "start")
    assert lock_holder(lockdir, "101") is None


def test_holder_of_a_sigkilled_holder_is_none(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    # its record stays in the file, but nobody holds the flock
    assert (tmp_path / "lock" / "101.lck").read_text() == f"{holder.pid} chkpnt\n"
    assert lock_holder(tmp_path / "lock", "101") is None


def test_holder_query_does_not_take_the_lock(tmp_path: Path) -> None:
    lockdir = tmp_path / "lock"
    lock_holder(lockdir, "101")
    with ct_lock(lockdir, "101", "start"):
        lock_holder(lockdir, "101")
        assert (lockdir / "101.lck").read_text() == f"{os.getpid()} start\n"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (b"123 chkpnt --dump\n", Holder("123", "chkpnt --dump")),
        (b"", Holder("unknown", "unknown operation")),
        (b"77", Holder("77", "unknown operation")),
        (b"\xff\xfe x", Holder("\ufffd\ufffd", "x")),
    ],
)
def test_holder_record_parsing(record: bytes, expected: Holder) -> None:
    assert Holder.parse(record) == expected
