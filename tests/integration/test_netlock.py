"""vzpy.netlock in a real network namespace: lock and unlock are single nft transactions, idempotent both ways."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy import netlock

pytestmark = pytest.mark.root


@pytest.fixture
def netns_pid() -> Iterator[int]:
    sleeper = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.02)
        yield sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait(10)


def ruleset(pid: int) -> str:
    argv = ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "nft", "list", "ruleset"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_lock_and_unlock_are_idempotent(netns_pid: int) -> None:
    netlock.unlock(netns_pid)  # nothing to unlock: no error
    assert not netlock.is_locked(netns_pid)
    netlock.lock(netns_pid)
    netlock.lock(netns_pid)  # locked already: still exactly one lock table
    rules = ruleset(netns_pid)
    assert rules.count(f"table inet {netlock.TABLE}") == 1 and rules.count("policy drop") == 2
    netlock.unlock(netns_pid)
    assert not netlock.is_locked(netns_pid) and netlock.TABLE not in ruleset(netns_pid)
    netlock.unlock(netns_pid)
