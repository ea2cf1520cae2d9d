"""The pure parts of CT networking: IP parsing, the host-side veth name, cleanup of a link that is gone."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vzpy.errors import BadIp
from vzpy.runtime.network import IFNAMSIZ, del_host_route, host_ifname, link_exists, parse_ip

# --- parse_ip


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("10.0.0.101", ipaddress.IPv4Address("10.0.0.101")),
        ("0.0.0.0", ipaddress.IPv4Address("0.0.0.0")),
        ("192.168.1.1/24", ipaddress.IPv4Address("192.168.1.1")),
        ("10.0.0.1/32", ipaddress.IPv4Address("10.0.0.1")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("fd00::101", ipaddress.IPv6Address("fd00::101")),
        ("FD00:0:0::101", ipaddress.IPv6Address("fd00::101")),
        ("fe80::1/64", ipaddress.IPv6Address("fe80::1")),
        ("2001:db8::1/128", ipaddress.IPv6Address("2001:db8::1")),
    ],
)
def test_parse_ip(value: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    parsed = parse_ip(value)
    assert parsed == address
    assert type(parsed) is type(address)


def test_parse_ip_canonical_text() -> None:
    assert str(parse_ip("FD00:0000::0101/64")) == "fd00::101"


@pytest.mark.parametrize(
    "value", ["", "bad", "10.0.0", "10.0.0.256", "10.0.0.1.2", "1.2.3.-4", "fd00:::1", "/24", " 10.0.0.1", "eth0"]
)
def test_parse_ip_invalid(value: str) -> None:
    with pytest.raises(BadIp) as info:
        parse_ip(value)
    assert info.value.exit_code == 71
    assert info.value.message == f"invalid IP address {value!r}: give an address such as 10.0.0.101"


@pytest.mark.parametrize("value", ["10.0.0.1/x", "10.0.0.1/33", "10.0.0.1/24/8", "fd00::1/129", "10.0.0.1/"])
def test_parse_ip_rejects_a_bad_prefix(value: str) -> None:
    with pytest.raises(BadIp):
        parse_ip(value)


# --- host_ifname


@pytest.mark.parametrize(
    ("ctid", "name"),
    [
        ("101", "veth101.0"),
        ("1", "veth1.0"),
        ("web-1", "vethweb-1.0"),
        ("123456789", "veth123456789.0"),  # 15 chars: the longest unhashed name
    ],
)
def test_short_ctids_keep_vzctl_naming(ctid: str, name: str) -> None:
    assert host_ifname("veth", ctid) == name


def test_one_char_too_long_is_hashed() -> None:
    ctid = "1234567890"
    assert host_ifname("veth", ctid) == f"veth{hashlib.sha1(ctid.encode()).hexdigest()[:9]}.0"
    assert host_ifname("veth", ctid) == "veth01b307acb.0"


def test_long_names_are_hashed_and_fit() -> None:
    ctid = "a-very-long-container-name"
    name = host_ifname("veth", ctid)
    assert name == f"veth{hashlib.sha1(ctid.encode()).hexdigest()[:9]}.0"
    assert len(name) == IFNAMSIZ == 15


@pytest.mark.parametrize("length", range(1, 80))
def test_always_fits_ifnamsiz(length: int) -> None:
    assert len(host_ifname("veth", "7" * length)) <= 15
    assert len(host_ifname("vz", "x" * length)) <= 15


def test_stable_and_distinct() -> None:
    ctids = [f"container-number-{i}" for i in range(200)]
    first = [host_ifname("veth", c) for c in ctids]
    assert first == [host_ifname("veth", c) for c in ctids]
    assert len(set(first)) == len(ctids)
    assert all(name.endswith(".0") and name.startswith("veth") for name in first)


def test_prefix_is_used() -> None:
    assert host_ifname("vz", "101") == "vz101.0"
    assert host_ifname("vz", "x" * 20).startswith("vz")
    assert len(host_ifname("vz", "x" * 20)) == 15


def test_long_prefix_still_fits() -> None:
    assert len(host_ifname("vethlongprefix", "1234567890123")) <= 15


def test_prefix_leaving_no_room_for_the_hash_does_not_collide() -> None:
    prefix = "p" * 13
    assert host_ifname(prefix, "first-long-ct") != host_ifname(prefix, "second-long-ct")


# --- cleanup of a link that is gone: no netlink library loaded

SRC = Path(__file__).resolve().parents[2] / "src"
# run in a fresh interpreter (this one may have loaded pyroute2): cleanup of a veth that does not exist
CLEANUP_OF_A_GONE_LINK = """
import sys
from vzpy.runtime import network
network.del_host_route("192.0.2.7", "vzpygone0")
network.del_host_route("2001:db8::7", "vzpygone0")
network.delete_veth("vzpygone0")
print("pyroute2" in sys.modules)
"""


def test_link_exists_sees_this_netns_interfaces() -> None:
    assert link_exists("lo")
    assert not link_exists("vzpygone0")


def test_cleanup_after_the_link_went_loads_no_pyroute2() -> None:
    """A killed CT's netns takes its veth, and the routes through it, along: nothing is left to delete, and
    pyroute2's ~0.1 s import is not paid for it. (tests/integration/test_network_cleanup.py: a link that is
    still there has its routes and itself removed.)"""
    result = subprocess.run(
        [sys.executable, "-c", CLEANUP_OF_A_GONE_LINK],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"


def test_a_bad_address_is_refused_even_when_the_link_is_gone() -> None:
    with pytest.raises(BadIp):
        del_host_route("10.0.0.300", "vzpygone0")
