"""Sizes as the operator reads them: the one formatter (binary units, one decimal)."""

from __future__ import annotations

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int) -> str:
    """512 -> "512 B", 1536 -> "1.5 KiB", 3 << 30 -> "3.0 GiB"."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in UNITS[:-1]:
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {UNITS[-1]}"
