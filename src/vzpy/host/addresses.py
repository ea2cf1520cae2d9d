"""Which CT on this host already has an IP address: the one "IP in use" check (create, set, migration)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from vzpy.config import ConfFile
from vzpy.errors import VzError
from vzpy.runtime.network import parse_ip

# (CTID, its IP_ADDRESS words)
Owner = tuple[str, Sequence[str]]


def ips_in_use(wanted: Iterable[str], owners: Iterable[Owner], *, ctid: str) -> dict[str, str]:
    """The wanted addresses some CT other than `ctid` already has: address -> that CT's ID. Addresses are
    compared parsed (a /prefix is ignored, IPv6 spellings match); unparsable entries match nothing."""
    wanted_ips = {parsed for parsed in map(_parsed, wanted) if parsed is not None}
    used: dict[str, str] = {}
    if not wanted_ips:
        return used  # without even reading the owners
    for other, ips in owners:
        if other == ctid:
            continue
        for parsed in map(_parsed, ips):
            if parsed is not None and parsed in wanted_ips:
                used.setdefault(str(parsed), other)
    return used


def _parsed(ip: str) -> IPv4Address | IPv6Address | None:
    try:
        return parse_ip(ip)
    except VzError:
        return None


def configured_owners(confdir: Path) -> Iterator[Owner]:
    """Every CT configured in `confdir` with its IP_ADDRESS (a config that cannot be read is skipped)."""
    for conf_path in sorted(confdir.glob("*.conf")) if confdir.is_dir() else []:
        try:
            ips = (ConfFile.load(conf_path).get("IP_ADDRESS") or "").split()
        except (VzError, OSError):
            continue
        yield conf_path.name.removesuffix(".conf"), ips
