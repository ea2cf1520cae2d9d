"""vzpy.netlock in a real network namespace: lock and unlock are single nft transactions, idempotent both ways;
a lock table left from before (or made up by the CT) is replaced whole by the lock, whatever it held, and
without one the lock is the same table."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy import netlock

pytestmark = pytest.mark.root

STALE = f"""
table inet {netlock.TABLE} {{
    chain input {{ type filter hook input priority 0; policy accept; }}
    chain extra {{ type filter hook output priority 10; policy accept; }}
}}
"""


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


def nft(pid: int, *args: str, input: str | None = None) -> str:
    argv = ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "nft", *args]
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=True).stdout


def ruleset(pid: int) -> str:
    return nft(pid, "list", "ruleset")


def locked_ruleset(pid: int) -> str:
    netlock.lock(pid)
    return ruleset(pid)


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


def test_a_stale_lock_table_is_replaced_whole(netns_pid: int) -> None:
    nft(netns_pid, "-f", "-", input=STALE)
    rules = locked_ruleset(netns_pid)
    assert rules.count(f"table inet {netlock.TABLE}") == 1 and rules.count("policy drop") == 2, rules
    assert "policy accept" not in rules and "extra" not in rules, rules


def test_the_lock_without_a_table_before_is_the_same_table(netns_pid: int) -> None:
    fresh = locked_ruleset(netns_pid)
    netlock.unlock(netns_pid)
    nft(netns_pid, "-f", "-", input=STALE)
    assert locked_ruleset(netns_pid) == fresh
    netlock.unlock(netns_pid)
    assert not netlock.is_locked(netns_pid)
