"""vzpy's own network lock for a suspended CT: an nftables table in the CT's netns dropping all but lo.

Peers see a pause (packets dropped, no RST); a copy of what they send meanwhile is kept by
vzpy.runtime.tcpkick and delivered into the CT when it runs again, so that they need not wait for their
next backed-off retransmission. The table lives in the CT's netns, so CRIU dumps it with
the netns and restores it with the CT: a restored CT stays locked until `restore --resume` removes it.
CRIU itself is then told not to lock (network_lock=skip).
"""

from __future__ import annotations

import re
import subprocess

from vzpy import proc
from vzpy.errors import NetworkError

TABLE = "vzpy_netlock"
# CRIU's own network lock (`network_lock=nftables`): `table inet CRIU-<run id>`, removed by CRIU when it
# finishes, but left behind (dropping all traffic, lo included) when CRIU is killed mid-dump.
_CRIU_TABLE = re.compile(r"^table inet (CRIU-[0-9A-Za-z-]+)$")
NFT_TIMEOUT = 30.0  # nft waits for the nftables lock: never forever
RULESET = f"""
table inet {TABLE} {{
    chain input {{ type filter hook input priority -300; policy drop; iif "lo" accept; }}
    chain output {{ type filter hook output priority -300; policy drop; oif "lo" accept; }}
}}
"""


def _nft(init_pid: int, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["nsenter", f"--net=/proc/{init_pid}/ns/net", "--", "nft", *args]
    what = "nft in the CT's network namespace"
    return proc.run(argv, input=input, check=check, error=NetworkError, what=what, timeout=NFT_TIMEOUT)


# Each is one nft transaction, idempotent (a table is declared before it is deleted): one nft run, not a
# lookup first, in the frozen window.
LOCK = f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{RULESET}"
UNLOCK = f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
# The usual lock, where no table is left from before: one transaction that only adds it (~3 ms), and fails
# as a whole, changing nothing, if the table exists. LOCK's deletion of a table costs 10-25 ms more: on
# exit, nft waits for the kernel to free the deleted table (an RCU grace period).
CREATE = f"create table inet {TABLE}\n{RULESET}"


def lock(init_pid: int) -> None:
    if _nft(init_pid, "-f", "-", input=CREATE, check=False).returncode != 0:
        _nft(init_pid, "-f", "-", input=LOCK)  # a table left by an earlier lock is replaced


def unlock(init_pid: int) -> None:
    _nft(init_pid, "-f", "-", input=UNLOCK)


def is_locked(init_pid: int) -> bool:
    return _nft(init_pid, "list", "table", "inet", TABLE, check=False).returncode == 0


def criu_locks(init_pid: int) -> set[str]:
    """The names of CRIU's lock tables in the CT's netns."""
    listed = _nft(init_pid, "list", "tables", "inet", check=False)
    return {m.group(1) for line in listed.stdout.splitlines() if (m := _CRIU_TABLE.match(line.strip()))}


def remove_criu_locks(init_pid: int, keep: set[str]) -> list[str]:
    """Remove CRIU's lock tables but those in `keep` (there before the CRIU run that left the others)."""
    removed = sorted(criu_locks(init_pid) - keep)
    for name in removed:
        _nft(init_pid, "delete", "table", "inet", name)
    return removed
