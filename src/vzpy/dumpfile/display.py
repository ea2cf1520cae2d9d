"""What `vzpy dumpinfo` prints about a dump file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from vzpy.dumpfile.format import Manifest
from vzpy.units import human_size


def describe(manifest: Manifest) -> list[str]:
    """Human lines for `vzpy dumpinfo`."""
    m = manifest
    when = datetime.fromtimestamp(m.created_unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    stored = sum(x.stored_size for x in m.members.values())
    total = sum(x.size for x in m.members.values())
    packed = f" (stored {human_size(stored)}, {m.compression})" if m.compression != "none" else ""
    cpu = m.cpu or {}
    return [
        f"CT {m.ctid}, dumped {when}",
        f"vzpy {m.vzpy_version}, CRIU {m.criu_version}, kernel {m.kernel} ({m.arch})",
        f"CPU: {cpu.get('vendor', '?')} {cpu.get('model_name', '?')}, {len(cpu.get('flags', ()))} flags",
        _processes_line(m.processes),
        f"memory: {human_size(m.memory_bytes)}",
        f"filesystem: {'included' if m.with_fs else 'not included'}",
        f"members: {len(m.members)} files, {human_size(total)}{packed}",
    ]


def _processes_line(processes: list[dict[str, Any]], shown: int = 8) -> str:
    # The manifest only promises a list: an entry that is not an object shows as "?".
    shown_ones = [p if isinstance(p, dict) else {} for p in processes[:shown]]
    names = [f"{_printable(p.get('pid', '?'))} {_printable(p.get('comm', '?'))}" for p in shown_ones]
    more = f", and {len(processes) - shown} more" if len(processes) > shown else ""
    return f"processes: {len(processes)}" + (f" ({', '.join(names)}{more})" if names else "")


def _printable(value: object, limit: int = 64) -> str:
    """A process name the CT chose (escape sequences included) made safe for the operator's terminal."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
