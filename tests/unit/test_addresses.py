"""host.addresses: the one "IP in use" check, shared by create/set and the migration destination."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy.errors import IpInUse
from vzpy.host.addresses import configured_owners, ips_in_use

OWNERS = [("101", ["10.0.0.1", "10.0.0.2/24"]), ("102", ["fd00::1", "bogus"]), ("103", [])]


def test_taken_addresses_name_their_ct() -> None:
    assert ips_in_use(["10.0.0.2", "10.0.0.9"], OWNERS, ctid="200") == {"10.0.0.2": "101"}


def test_prefixes_and_ipv6_spellings_compare_as_addresses() -> None:
    wanted = ["10.0.0.1/32", "fd00:0:0:0:0:0:0:1"]
    assert ips_in_use(wanted, OWNERS, ctid="200") == {"10.0.0.1": "101", "fd00::1": "102"}


def test_the_ct_itself_does_not_count() -> None:
    assert ips_in_use(["10.0.0.1"], OWNERS, ctid="101") == {}


def test_unparsable_entries_match_nothing() -> None:
    assert ips_in_use(["bogus", "nonsense"], OWNERS, ctid="200") == {}


def test_configured_owners_reads_every_ct_conf(tmp_path: Path) -> None:
    (tmp_path / "101.conf").write_text('IP_ADDRESS="10.0.0.1 10.0.0.2"\n')
    (tmp_path / "102.conf").write_text('HOSTNAME="x"\n')
    (tmp_path / "103.conf").write_text('not a config line\nIP_ADDRESS="10.0.0.7"\n')  # vzctl skips the line
    (tmp_path / "104.conf.destroyed").write_text('IP_ADDRESS="10.0.0.3"\n')
    assert list(configured_owners(tmp_path)) == [
        ("101", ["10.0.0.1", "10.0.0.2"]),
        ("102", []),
        ("103", ["10.0.0.7"]),
    ]
    assert list(configured_owners(tmp_path / "missing")) == []


def test_create_refuses_an_address_another_ct_has(tmp_path: Path) -> None:
    from vzpy import lifecycle

    class Other:
        ctid = "7"
        ips = ["10.0.0.5"]

    with pytest.raises(IpInUse, match=r"^IP 10\.0\.0\.5 is already used by CT 7$"):
        lifecycle._check_ips_free("8", ["10.0.0.5/24"], [Other()])  # type: ignore[list-item]
