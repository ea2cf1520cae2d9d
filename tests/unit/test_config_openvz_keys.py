"""vz.conf's host-wide keys (LOGGING, LOGFILE, VE_STOP_MODE, NEIGHBOUR_DEVS) as typed accessors, the values of
the vzctl keys vzpy applies, and the resolv.conf editing NAMESERVER/SEARCHDOMAIN do (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy import config
from vzpy.config import GlobalConfig, NeighbourDevs
from vzpy.runtime import resolver


def load(tmp_path: Path, text: str) -> GlobalConfig:
    path = tmp_path / "vz.conf"
    path.write_text(text)
    return GlobalConfig.load(path)


def test_host_wide_keys_defaults(tmp_path: Path) -> None:
    gconf = load(tmp_path, "")
    assert gconf.logging is True and gconf.logfile == Path("/var/log/vzpy.log")
    assert gconf.ve_stop_mode == "suspend"  # vzctl's default
    assert gconf.neighbour_devs == NeighbourDevs("detect")


def test_host_wide_keys_as_written(tmp_path: Path) -> None:
    text = 'LOGGING=no\nLOGFILE=/var/log/vzctl.log # the log\nVE_STOP_MODE=stop\nNEIGHBOUR_DEVS="list:eth0 eth1"\n'
    gconf = load(tmp_path, text)
    assert gconf.logging is False and gconf.logfile == Path("/var/log/vzctl.log")
    assert gconf.ve_stop_mode == "stop"
    assert gconf.neighbour_devs == NeighbourDevs("list", ("eth0", "eth1"))
    assert load(tmp_path, "NEIGHBOUR_DEVS=all\n").neighbour_devs == NeighbourDevs("all")
    assert load(tmp_path, 'NEIGHBOUR_DEVS=""\n').neighbour_devs == NeighbourDevs("detect")


def test_a_bad_host_wide_value_warns_and_takes_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gconf = load(tmp_path, "VE_STOP_MODE=hibernate\nLOGGING=sometimes\n")
    assert gconf.ve_stop_mode == "suspend" and gconf.logging is True
    err = capsys.readouterr().err
    assert f"{tmp_path}/vz.conf:1: invalid VE_STOP_MODE value 'hibernate': use suspend or stop; using 'suspend'" in err
    assert "invalid LOGGING value 'sometimes': use yes or no" in err


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("CPUUNITS", ["8", "1000", "500000"], ["7", "500001", "1.5", "x", ""]),
        ("CPULIMIT", ["0", "50", "400", "100%", "0%"], ["101%", "-1", "1.5", "x%", "%"]),
        ("SWAPPAGES", ["0:65536", "0:unlimited", "1G", "0"], ["1:2:3", "lots"]),
        ("DISKSPACE", ["10G:11G", "1048576:1153434", "unlimited"], ["10X", "a:b"]),
        ("DISKINODES", ["200000:220000", "2K"], ["x"]),
        ("ONBOOT", ["yes", "no", "YES"], ["1", "true", "maybe"]),
        ("DISABLED", ["yes", "no"], ["y"]),
        ("STOP_TIMEOUT", ["0", "120"], ["-1", "1.5", "x"]),
        ("NAMESERVER", ["inherit", "10.0.0.1", "10.0.0.1 2001:db8::1"], ["10.0.0.256", "dns.example", "1.1.1.1 x"]),
        ("SEARCHDOMAIN", ["inherit", "example.com", "a.example b.example"], ["a;b", "a/b", "-x"]),
        ("NEIGHBOUR_DEVS", ["all", "detect", "list:eth0", "list:eth0 br0.10"], ["list:", "some", "list:a;b"]),
    ],
)
def test_values_of_the_vzctl_keys(key: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert config.value_problem(key, value) is None, value
    for value in bad:
        assert config.value_problem(key, value) is not None, value


def test_resolv_conf_update_keeps_other_lines() -> None:
    text = "# mine\nnameserver 1.1.1.1\ndomain old.example\noptions ndots:2\nnameserver 1.0.0.1\n"
    assert resolver.updated_resolv_conf(text, ["10.0.0.1", "10.0.0.2"], None) == (
        "# mine\ndomain old.example\noptions ndots:2\nnameserver 10.0.0.1\nnameserver 10.0.0.2\n"
    )
    assert resolver.updated_resolv_conf(text, None, ["a.example", "b.example"]) == (
        "search a.example b.example\n# mine\nnameserver 1.1.1.1\noptions ndots:2\nnameserver 1.0.0.1\n"
    )
    assert resolver.updated_resolv_conf("", ["10.0.0.1"], ["a.example"]) == "search a.example\nnameserver 10.0.0.1\n"


def test_the_hosts_resolver_settings_as_glibc_reads_them(tmp_path: Path) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text(
        "; c\nsearch a.example\nnameserver 10.0.0.1\n# nameserver 9.9.9.9\ndomain b.example\nnameserver 10.0.0.2\n"
    )
    assert resolver.host_nameservers(host) == ["10.0.0.1", "10.0.0.2"]  # they accumulate
    assert resolver.host_searchdomains(host) == ["b.example"]  # the last search/domain line counts
    assert resolver.host_nameservers(tmp_path / "missing") == []


def test_where_names_the_line_that_counts_not_a_skipped_one() -> None:
    conf = config.ConfFile.parse(Path("/c/101.conf"), 'CPUUNITS="lots"\nCPUUNITS="7\n')
    assert conf.where("CPUUNITS") == "/c/101.conf:1"
