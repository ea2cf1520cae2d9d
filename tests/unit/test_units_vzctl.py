"""vzctl's resource numbers (units.py): pages, 1K blocks and counts, suffixes, fractions, `unlimited`, pairs."""

from __future__ import annotations

import pytest

from vzpy import units
from vzpy.units import COUNT, KBLOCKS, PAGE_SIZE, PAGES, BadNumber, pair_limit_bytes, parse_number, parse_pair


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [
        ("262144", PAGES, 262144),  # no suffix: the key's own unit
        ("1G", PAGES, (1 << 30) // PAGE_SIZE),
        ("256M", PAGES, (256 << 20) // PAGE_SIZE),
        ("256m", PAGES, (256 << 20) // PAGE_SIZE),
        ("8P", PAGES, 8),  # P: pages
        ("4096B", PAGES, 4096 // PAGE_SIZE),
        ("1.5G", PAGES, (3 << 29) // PAGE_SIZE),
        ("1.5", PAGES, 1),  # a fraction of a unit is dropped, as vzctl's cast does
        ("10G", KBLOCKS, 10 << 20),
        ("1048576", KBLOCKS, 1048576),
        ("200000", COUNT, 200000),
        ("2K", COUNT, 2048),
        ("unlimited", PAGES, None),
        (str(2**63 - 1), PAGES, None),  # LONG_MAX is vzctl's unlimited
        ("9" * 40, PAGES, None),
    ],
)
def test_parse_number(text: str, unit: units.Unit, value: int | None) -> None:
    assert parse_number(text, unit) == value


@pytest.mark.parametrize("text", ["", "-1", "1X", "G", "1GG", "0x10", "1e3", " 1", "unlimitedX", "1:2"])
def test_parse_number_refuses(text: str) -> None:
    with pytest.raises(BadNumber, match=r"is not a number of pages, a size \(K/M/G/T/P suffix\), unlimited"):
        parse_number(text, PAGES)


def test_unlimited_only_where_the_unit_allows_it() -> None:
    strict = units.Unit("blocks", 1024, unlimited=False)
    with pytest.raises(BadNumber, match=r"a size \(K/M/G/T/P suffix\)$"):
        parse_number("unlimited", strict)


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("0:262144", (0, 262144)),
        ("262144", (262144, 262144)),  # one value is both
        ("33792:unlimited", (33792, None)),
        ("unlimited", (None, None)),
        ("1G:2G", ((1 << 30) // PAGE_SIZE, (2 << 30) // PAGE_SIZE)),
    ],
)
def test_parse_pair(text: str, pair: tuple[int | None, int | None]) -> None:
    assert parse_pair(text, PAGES) == pair


@pytest.mark.parametrize("text", ["1:2:3", ":1", "1:", "a:b"])
def test_parse_pair_refuses(text: str) -> None:
    with pytest.raises(BadNumber):
        parse_pair(text, PAGES)


def test_the_limit_is_what_is_enforced_in_bytes() -> None:
    assert pair_limit_bytes("0:262144", PAGES) == 262144 * PAGE_SIZE
    assert pair_limit_bytes("1:unlimited", PAGES) is None
    assert pair_limit_bytes("2G:2.2G", KBLOCKS) == int(2.2 * (1 << 20)) * 1024
