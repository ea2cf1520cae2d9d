"""`criu lazy-pages`: the post-copy daemon on the restoring host. It hands the restored tasks' missing
pages to them on their first touch (userfaultfd), fetched from the dumping host's page server, and pushes
the rest in the background; it exits once every page arrived. The RPC has no request for it: it runs as a
command, ready once it said so on --status-fd. A restore finds it through "lazy-pages.socket" in its
work dir, so both must be given the same one.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import time
from collections.abc import Iterator
from pathlib import Path

from vzpy import proc
from vzpy.criu.binary import CriuBinary
from vzpy.errors import ChkpntError, RestoreError

READY_TIMEOUT = 30.0
LOG_FILE = "lazy-pages.log"
NFT_TIMEOUT = 30.0  # nft waits for the nftables lock: never forever
GUARD_PREFIX = "vzpy_lazy_"
# vzpy_lazy_PORT_PID; a bare vzpy_lazy_PORT is an older vzpy's, whose owner cannot be known
_GUARD_NAME = re.compile(rf"{GUARD_PREFIX}(\d+)(?:_(\d+))?")


def start_lazy_pages(
    binary: CriuBinary, images: Path, work_dir: Path, page_server: tuple[str, int], *, timeout: float | None
) -> proc.Child:
    """Start the daemon fetching pages from `page_server` (address, port); returns once it is ready.
    `timeout`: how long it may live at most (None: until the pages are all there)."""
    address, port = page_server
    ready_r, ready_w = os.pipe()
    argv: list[str | Path] = [
        binary.path,
        "lazy-pages",
        "--page-server",
        "--address",
        address,
        "--port",
        str(port),
        "-D",
        images,
        "-W",
        work_dir,
        "-o",
        LOG_FILE,
        "-v4",
        "--status-fd",
        str(ready_w),
    ]
    try:
        child = proc.spawn(argv, timeout=timeout, what="criu lazy-pages", error=RestoreError, pass_fds=(ready_w,))
        os.close(ready_w)
        ready_w = -1
        _wait_ready(child, ready_r, work_dir / LOG_FILE)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return child


def _wait_ready(child: proc.Child, ready: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        readable, _, _ = select.select([ready], [], [], 0.2)
        if readable and os.read(ready, 1):
            return
        if readable or child.poll() is not None:  # EOF: it exited without saying it is ready
            break
    child.close(grace=1)
    raise RestoreError(f"criu lazy-pages did not become ready (see {log})", detail=child.stderr_tail())


def guard_ruleset(table: str, port: int) -> str:
    """nftables: drop what comes to TCP `port` on any interface but lo (IPv4 and IPv6)."""
    return (
        f"table inet {table} {{\n"
        f"    chain input {{ type filter hook input priority -300; policy accept; "
        f'iif != "lo" tcp dport {port} drop; }}\n'
        f"}}\n"
    )


@contextlib.contextmanager
def loopback_only(port: int) -> Iterator[None]:
    """While a lazy dump serves pages on `port`, only this host reaches it. Over RPC, CRIU 4.2.1 takes only
    the port of a lazy dump's page server and listens on every address (cr-service.c ignores ps.address
    when lazy_pages is set): without this, the first peer on the network to connect would get the CT's
    memory. The destination's daemon comes in over the SSH tunnel, through lo.

    The table is named after this process, so that a guard a killed vzpy left behind (dropping traffic to a
    port nothing serves any more) is removed by the next one."""
    remove_stale_guards()
    table = f"{GUARD_PREFIX}{port}_{os.getpid()}"
    proc.run(["nft", "-f", "-"], input=guard_ruleset(table, port), error=ChkpntError, what="nft", timeout=NFT_TIMEOUT)
    try:
        yield
    finally:
        _delete_table(table)


def stale_guards(listing: str) -> list[str]:
    """The guard tables in `nft list tables inet` output whose vzpy is gone."""
    stale = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) != 3 or words[:2] != ["table", "inet"] or not (match := _GUARD_NAME.fullmatch(words[2])):
            continue
        owner = match.group(2)
        if owner is None or not _alive(int(owner)):
            stale.append(words[2])
    return stale


def remove_stale_guards() -> list[str]:
    listed = proc.run(["nft", "list", "tables", "inet"], check=False, what="nft", timeout=NFT_TIMEOUT)
    stale = stale_guards(listed.stdout) if listed.returncode == 0 else []
    for table in stale:
        _delete_table(table)
    return stale


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _delete_table(table: str) -> None:
    proc.run(["nft", "delete", "table", "inet", table], check=False, what="nft", timeout=NFT_TIMEOUT)
