"""vzpy's own network lock for a suspended CT: an nftables table in the CT's netns dropping all but lo.

Peers see a pause (packets dropped, no RST). The table lives in the CT's netns, so CRIU dumps it with
the netns and restores it with the CT: a restored CT stays locked until `restore --resume` removes it.
CRIU itself is then told not to lock (network_lock=skip).
"""

from __future__ import annotations

import subprocess

from vzpy import proc
from vzpy.errors import NetworkError

TABLE = "vzpy_netlock"
RULESET = f"""
table inet {TABLE} {{
    chain input {{ type filter hook input priority -300; policy drop; iif "lo" accept; }}
    chain output {{ type filter hook output priority -300; policy drop; oif "lo" accept; }}
}}
"""


def _nft(init_pid: int, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["nsenter", f"--net=/proc/{init_pid}/ns/net", "--", "nft", *args]
    return proc.run(argv, input=input, check=check, error=NetworkError, what="nft in the CT's network namespace")


def lock(init_pid: int) -> None:
    if not is_locked(init_pid):
        _nft(init_pid, "-f", "-", input=RULESET)


def unlock(init_pid: int) -> None:
    if is_locked(init_pid):
        _nft(init_pid, "delete", "table", "inet", TABLE)


def is_locked(init_pid: int) -> bool:
    return _nft(init_pid, "list", "table", "inet", TABLE, check=False).returncode == 0
