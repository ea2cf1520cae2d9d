"""The source's record of a migration whose outcome may be in doubt: LOCKDIR/CTID.migration.json.

Written before the request that commits the CT on the destination (resume or start) and kept until the
source copy is gone or running again: while it exists the source copy must not be resumed, started or
restored by anything but `vzpy migrate --recover HOST CTID` (the stage machine refuses them).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vzpy import fileio
from vzpy.config import GlobalConfig

SUFFIX = ".migration.json"


@dataclass(frozen=True)
class Marker:
    host: str  # as `vzpy migrate --recover HOST CTID` takes it
    ctid: str
    online: bool
    was_running: bool
    since: float = 0.0

    @property
    def recover_command(self) -> str:
        return f"vzpy migrate --recover {self.host} {self.ctid}"


def path(gconf: GlobalConfig, ctid: str) -> Path:
    return gconf.lockdir / f"{ctid}{SUFFIX}"


def write(gconf: GlobalConfig, marker: Marker) -> None:
    """Durably (fsync'ed, renamed into place): a crash right after must still find it."""
    target = path(gconf, marker.ctid)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {**asdict(marker), "since": marker.since or time.time()}
    fileio.write_atomic(target, json.dumps(data, indent=1))


def read(gconf: GlobalConfig, ctid: str) -> Marker | None:
    """The marker, or None; an unreadable one still counts (host unknown)."""
    try:
        data = json.loads(path(gconf, ctid).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Marker(host="HOST", ctid=ctid, online=True, was_running=True)
    return Marker(
        host=str(data.get("host") or "HOST"),
        ctid=ctid,
        online=bool(data.get("online", True)),
        was_running=bool(data.get("was_running", True)),
        since=float(data.get("since") or 0.0),
    )


def remove(gconf: GlobalConfig, ctid: str) -> None:
    path(gconf, ctid).unlink(missing_ok=True)
