"""Which nftables guard tables a post-copy dump may remove: those whose vzpy is gone (vzpy.criu.lazy)."""

from __future__ import annotations

import os
import subprocess

from vzpy.criu.lazy import stale_guards


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_only_guards_of_dead_owners_and_ownerless_ones_are_stale() -> None:
    dead = _dead_pid()
    listing = "\n".join(
        [
            f"table inet vzpy_lazy_7300_{os.getpid()}",
            f"table inet vzpy_lazy_7301_{dead}",
            "table inet vzpy_lazy_7302",
            "table inet vzpy_netlock",
            "table ip vzpy_lazy_7303_1",
            "table inet vzpy_lazy_x_1",
        ]
    )
    assert stale_guards(listing) == [f"vzpy_lazy_7301_{dead}", "vzpy_lazy_7302"]
