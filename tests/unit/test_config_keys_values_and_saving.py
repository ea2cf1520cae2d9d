"""Edges of CTID.conf handling that the main config tests leave open: which characters count as quotes,
lower-case keys, duplicated keys with other lines between them, saving into a directory that does not exist
yet and the file's mode, and CTIDs that would read as options."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vzpy import config
from vzpy.config import ConfFile, validate_ctid
from vzpy.errors import InvalidValue

CONF = Path("/etc/vz/conf/101.conf")


@pytest.mark.parametrize("value", ["XenX", "X", "aa", "0.0", "x1x", "a'b", 'a"b'])
def test_an_unquoted_value_is_taken_whole_whatever_it_begins_and_ends_with(value: str) -> None:
    assert ConfFile.parse(CONF, f"NAME={value}\n").get("NAME") == value


@pytest.mark.parametrize(("raw", "value"), [("'abc", None), ("\"abc'", None), ('abc"', 'abc"'), ("abc'", "abc'")])
def test_only_a_leading_quote_opens_a_quoted_value(raw: str, value: str | None) -> None:
    assert ConfFile.parse(CONF, f"NAME={raw}\n").get("NAME") == value


def test_a_lower_case_key_can_be_set() -> None:
    conf = ConfFile.parse(CONF, "")
    conf.set("vzpy_note", "XenX")
    assert conf.lines == ['vzpy_note="XenX"']
    assert ConfFile.parse(CONF, conf.text()).get("vzpy_note") == "XenX"


@pytest.mark.parametrize("key", ["", "1A", "A-B", "A B", "A=B", "Ä"])
def test_an_invalid_key_is_refused_naming_it(key: str) -> None:
    conf = ConfFile.parse(CONF, "")
    with pytest.raises(InvalidValue) as info:
        conf.set(key, "1")
    assert info.value.message == f"invalid config key {key!r}"
    assert conf.lines == []


def test_a_duplicated_key_with_other_lines_between_keeps_its_last_place() -> None:
    conf = ConfFile.parse(CONF, 'A="1"\nB="2"\nA="3"\nC="4"\nA="5"\nD="6"\n')
    conf.set("A", "7")
    assert conf.lines == ['B="2"', 'C="4"', 'A="7"', 'D="6"']


def test_save_creates_the_missing_directories_and_writes_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "vz" / "conf" / "101.conf"
    conf = ConfFile.parse(path, 'HOSTNAME="ct101"\n')
    conf.save()
    assert path.read_text() == 'HOSTNAME="ct101"\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("ctid", ["-1", "-rf", "-"])
def test_a_ctid_that_would_read_as_an_option_is_invalid(ctid: str) -> None:
    with pytest.raises(InvalidValue):
        validate_ctid(ctid)


# --- what the value checks say --------------------------------------------------------------------------------


def test_a_value_is_shown_whole_up_to_the_width_and_cut_beyond_it() -> None:
    assert config.shown("x" * 40) == repr("x" * 40)
    assert config.shown("x" * 41) == repr("x" * 40) + "... (41 characters)"


@pytest.mark.parametrize(
    ("ctid", "hostname"), [("101", "ct101"), ("Web_1", "ctWeb-1"), ("boX", "ctboX"), ("a.", "cta")]
)
def test_the_default_hostname_keeps_letters_of_either_case_and_loses_what_a_label_cannot_hold(
    ctid: str, hostname: str
) -> None:
    assert config.default_hostname(ctid) == hostname


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1:2:3", "'1:2:3' is not a value or barrier:limit; use e.g. 0:262144 (pages) or 0:1G"),
        (
            "0:12X",
            "'12X' is not a number of pages, a size (K/M/G/T/P suffix), unlimited; use e.g. 0:262144 (pages) or 0:1G",
        ),
        ("0:3M", "a limit below 4M leaves a CT no room to start; use e.g. 0:512M or 0:unlimited"),
        ("0:4M", None),
        ("4M", None),
    ],
)
def test_physpages_problems_say_what_to_write(text: str, problem: str | None) -> None:
    assert config.physpages_problem(text) == problem


def test_cpus_and_numproc_problems_say_what_to_write() -> None:
    assert config.cpus_problem("one") == "not a number of CPUs like 1.5"
    assert config.numproc_problem("1:2:3") == "use a number of processes, unlimited, or barrier:limit, e.g. 512:512"
