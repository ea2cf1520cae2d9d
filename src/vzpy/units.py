"""Sizes as the operator reads them (one formatter), and numbers as vzctl's configs write them.

vzctl's resource values (vz.conf(5), ctid.conf(5)) are a number in the key's own unit (pages for the *PAGES
keys, 1 KiB blocks for DISKSPACE, a count for DISKINODES), or a number with a K/M/G/T/P/B suffix that is a
size in bytes converted to that unit (P: pages), or `unlimited`; a fraction is allowed ("1.5G"). Two of
them, "barrier:limit", are a UBC pair; one alone is both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
UNLIMITED = "unlimited"
# vzctl stores `unlimited` as LONG_MAX and caps larger numbers there
LONG_MAX = 2**63 - 1
_NUMBER_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?)([A-Za-z]?)")
_MULTIPLIERS = {"": 0, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": PAGE_SIZE}


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


class BadNumber(ValueError):
    """A value vzctl would not parse; the message says what is wrong (for the caller's file:line)."""


@dataclass(frozen=True)
class Unit:
    """A key's unit: `size` bytes per unit (0: a plain count, where a suffix multiplies it as for bytes)."""

    name: str
    size: int
    unlimited: bool = True


PAGES = Unit("pages", PAGE_SIZE)
KBLOCKS = Unit("1K blocks", 1024)
COUNT = Unit("count", 1)


def parse_number(text: str, unit: Unit) -> int | None:
    """One vzctl number in `unit`s; None for `unlimited` (or anything at or above LONG_MAX)."""
    if unit.unlimited and text == UNLIMITED:
        return None
    match = _NUMBER_RE.fullmatch(text)
    if not match or match.group(2).upper() not in _MULTIPLIERS:
        unlimited = ", unlimited" if unit.unlimited else ""
        raise BadNumber(f"{text!r} is not a number of {unit.name}, a size (K/M/G/T/P suffix){unlimited}")
    number, suffix = Decimal(match.group(1)), match.group(2).upper()
    value = number if not suffix else number * _MULTIPLIERS[suffix] / unit.size
    return None if value >= LONG_MAX else int(value)


def parse_pair(text: str, unit: Unit) -> tuple[int | None, int | None]:
    """vzctl's "barrier:limit" (or one value for both), each in `unit`s, None meaning unlimited."""
    parts = text.split(":")
    if len(parts) > 2:
        raise BadNumber(f"{text!r} is not a value or barrier:limit")
    barrier = parse_number(parts[0], unit)
    return barrier, parse_number(parts[-1], unit)


def pair_limit_bytes(text: str, unit: Unit) -> int | None:
    """The limit of a pair, in bytes (what vzpy enforces); None for unlimited."""
    limit = parse_pair(text, unit)[1]
    return None if limit is None else min(limit * unit.size, LONG_MAX)
