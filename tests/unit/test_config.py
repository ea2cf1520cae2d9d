"""vz.conf / CTID.conf parsing and editing, the global config's defaults and $VEID expansion, CTID validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy import config
from vzpy.config import GLOBAL_DEFAULTS, ConfFile, GlobalConfig, validate_ctid
from vzpy.errors import BadConfig, GlobalConfigNotFound, InvalidValue, VzError

CONF = Path("/etc/vz/conf/101.conf")

SAMPLE = """\
# CT 101, written by hand
   # an indented comment

VE_ROOT="/vz/root/$VEID"
  HOSTNAME = 'ct101'
IP_ADDRESS="10.0.0.1 10.0.0.2"
EMPTY=""
NUMPROC=100:100
OPERATOR_NOTE="keep me"
# trailing comment
"""


# --- ConfFile.parse


def test_parse_values_skip_comments_and_blank_lines() -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    assert conf.values == {
        "VE_ROOT": "/vz/root/$VEID",
        "HOSTNAME": "ct101",
        "IP_ADDRESS": "10.0.0.1 10.0.0.2",
        "EMPTY": "",
        "NUMPROC": "100:100",
        "OPERATOR_NOTE": "keep me",
    }
    assert conf.lines == SAMPLE.splitlines()
    assert conf.path == CONF


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ('A="x"', "x"),
        ("A='x'", "x"),
        ("A=x", "x"),
        ('A=""', ""),
        ("A=''", ""),
        ("A=", ""),
        ('A="with spaces inside"', "with spaces inside"),
        ("A='single quoted spaces'", "single quoted spaces"),
        ('A="it\'s"', "it's"),
        ("A='say \"hi\"'", 'say "hi"'),
        ('A="a=b"', "a=b"),
        ("A=0:256M", "0:256M"),
        ('  A  =  "x"  ', "x"),
        ("A=x\t", "x"),
        ('A="  padded  "', "  padded  "),
    ],
)
def test_parse_value_forms(line: str, value: str) -> None:
    assert ConfFile.parse(CONF, line + "\n").values == {"A": value}


def test_parse_later_duplicate_wins() -> None:
    assert ConfFile.parse(CONF, 'A="1"\nA="2"\n').values == {"A": "2"}


def test_parse_crlf_line_endings() -> None:
    assert ConfFile.parse(CONF, 'A="1"\r\nB=2\r\n').values == {"A": "1", "B": "2"}


def test_parse_empty_text() -> None:
    conf = ConfFile.parse(CONF, "")
    assert conf.values == {}
    assert conf.lines == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('A="1"\nnot a line\n', "/etc/vz/conf/101.conf:2: not a KEY=\"value\" line: 'not a line'"),
        ("export A=1\n", "/etc/vz/conf/101.conf:1: not a KEY=\"value\" line: 'export A=1'"),
        ("1A=2\n", "/etc/vz/conf/101.conf:1: not a KEY=\"value\" line: '1A=2'"),
        ("# c\n\n=x\n", "/etc/vz/conf/101.conf:3: not a KEY=\"value\" line: '=x'"),
        ("A-B=1\n", "/etc/vz/conf/101.conf:1: not a KEY=\"value\" line: 'A-B=1'"),
        ('A="x\n', '/etc/vz/conf/101.conf:1: unbalanced quotes in value \'"x\'; write KEY="value"'),
        ('A=x"\n', '/etc/vz/conf/101.conf:1: unbalanced quotes in value \'x"\'; write KEY="value"'),
        ('A="\n', '/etc/vz/conf/101.conf:1: unbalanced quotes in value \'"\'; write KEY="value"'),
        ("B=1\nA='x\n", '/etc/vz/conf/101.conf:2: unbalanced quotes in value "\'x"; write KEY="value"'),
        ("A='x\"\n", "/etc/vz/conf/101.conf:1: unbalanced quotes in value '\\'x\"'; write KEY=\"value\""),
        ('A="x" # note\n', '/etc/vz/conf/101.conf:1: unbalanced quotes in value \'"x" # note\'; write KEY="value"'),
        ("A=x y\n", "/etc/vz/conf/101.conf:1: value with spaces must be quoted: 'x y'; write KEY=\"value\""),
        ("A=x\ty\n", "/etc/vz/conf/101.conf:1: value with spaces must be quoted: 'x\\ty'; write KEY=\"value\""),
    ],
)
def test_parse_bad_lines(text: str, message: str) -> None:
    with pytest.raises(BadConfig) as info:
        ConfFile.parse(CONF, text)
    assert info.value.message == message
    assert str(info.value) == message
    assert info.value.exit_code == 85


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "101.conf"
    path.write_text(SAMPLE)
    conf = ConfFile.load(path)
    assert conf.path == path
    assert conf.get("HOSTNAME") == "ct101"
    assert conf.get("MISSING") is None
    assert conf.get("MISSING", "dflt") == "dflt"


def test_load_bad_file_names_its_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "101.conf"
    path.write_text('# ok\nA="1"\nB=two words\n')
    with pytest.raises(BadConfig) as info:
        ConfFile.load(path)
    assert info.value.message.startswith(f"{path}:3: ")


# --- ConfFile.set / text


def test_set_edits_in_place_keeping_everything_else() -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    conf.set("HOSTNAME", "web.example")
    assert conf.text() == SAMPLE.replace("  HOSTNAME = 'ct101'", 'HOSTNAME="web.example"')
    assert conf.values["HOSTNAME"] == "web.example"
    assert conf.values["OPERATOR_NOTE"] == "keep me"


def test_set_appends_a_new_key_at_the_end() -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    conf.set("CPUS", "1.5")
    assert conf.text() == SAMPLE + 'CPUS="1.5"\n'
    assert list(conf.values)[-1] == "CPUS"


def test_set_none_removes_the_line_only() -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    conf.set("IP_ADDRESS", None)
    assert conf.text() == SAMPLE.replace('IP_ADDRESS="10.0.0.1 10.0.0.2"\n', "")
    assert "IP_ADDRESS" not in conf.values


def test_set_none_of_an_absent_key_changes_nothing() -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    conf.set("ABSENT", None)
    assert conf.text() == SAMPLE
    assert "ABSENT" not in conf.values


def test_set_does_not_touch_a_key_that_only_shares_a_prefix() -> None:
    conf = ConfFile.parse(CONF, 'IP_ADDRESS="10.0.0.1"\n')
    conf.set("IP", "x")
    assert conf.lines == ['IP_ADDRESS="10.0.0.1"', 'IP="x"']


def test_set_does_not_edit_a_commented_out_key() -> None:
    conf = ConfFile.parse(CONF, '#HOSTNAME="old"\n# HOSTNAME="older"\n')
    conf.set("HOSTNAME", "new")
    assert conf.lines == ['#HOSTNAME="old"', '# HOSTNAME="older"', 'HOSTNAME="new"']


def test_set_empty_value() -> None:
    conf = ConfFile.parse(CONF, 'IP_ADDRESS="10.0.0.1"\n')
    conf.set("IP_ADDRESS", "")
    assert conf.text() == 'IP_ADDRESS=""\n'
    assert conf.values == {"IP_ADDRESS": ""}


@pytest.mark.parametrize("value", ["it's", "a b  c", "  padded ", "$VEID", "0:256M", "x=y", "#notacomment"])
def test_set_then_parse_round_trips(value: str) -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    conf.set("HOSTNAME", value)
    conf.set("NEWKEY", value)
    assert ConfFile.parse(CONF, conf.text()).values == conf.values
    assert conf.values["HOSTNAME"] == value
    assert conf.values["NEWKEY"] == value


@pytest.mark.parametrize("value", ['say "hi"', '"', "two\nlines", "end\n"])
def test_set_rejects_quotes_and_newlines(value: str) -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    with pytest.raises(InvalidValue) as info:
        conf.set("HOSTNAME", value)
    assert info.value.message == (
        f"HOSTNAME: value may not contain quotes, line breaks or control characters: {value!r}"
    )
    assert info.value.exit_code == 21
    assert conf.text() == SAMPLE
    assert conf.values["HOSTNAME"] == "ct101"


def test_set_on_duplicated_key_survives_reload() -> None:
    conf = ConfFile.parse(CONF, 'A="1"\nA="2"\n')
    conf.set("A", "3")
    assert ConfFile.parse(CONF, conf.text()).values == {"A": "3"}


def test_remove_on_duplicated_key_survives_reload() -> None:
    conf = ConfFile.parse(CONF, 'A="1"\nA="2"\n')
    conf.set("A", None)
    assert ConfFile.parse(CONF, conf.text()).values == {}


@pytest.mark.parametrize("value", ["a\rb", "a\x0bb", "a\u2028b"])
def test_set_value_with_other_line_breaks_cannot_corrupt_the_file(value: str) -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    try:
        conf.set("HOSTNAME", value)
    except InvalidValue:
        return  # rejecting it is fine
    assert ConfFile.parse(CONF, conf.text()).values == conf.values


def test_text_always_ends_with_one_newline() -> None:
    assert ConfFile.parse(CONF, 'A="1"').text() == 'A="1"\n'
    assert ConfFile.parse(CONF, 'A="1"\n').text() == 'A="1"\n'


# --- ConfFile.save


def test_save_writes_text_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "101.conf"
    conf = ConfFile.parse(path, SAMPLE)
    conf.set("HOSTNAME", "saved")
    conf.save()
    assert path.read_text() == conf.text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["101.conf"]
    assert ConfFile.load(path).values == conf.values


def test_save_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "101.conf"
    path.write_text(SAMPLE)
    old_inode = path.stat().st_ino
    conf = ConfFile.load(path)
    conf.set("NUMPROC", None)
    conf.save()
    assert path.read_text() == SAMPLE.replace("NUMPROC=100:100\n", "")
    # rename(2) over the target: a new inode, never a half-written original
    assert path.stat().st_ino != old_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["101.conf"]


def test_save_failure_keeps_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "101.conf"
    path.write_text(SAMPLE)
    conf = ConfFile.load(path)
    conf.set("HOSTNAME", "never-written")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config.os, "fsync", no_space)
    with pytest.raises(OSError):
        conf.save()
    assert path.read_text() == SAMPLE


def test_save_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "101.conf"
    path.write_text(SAMPLE)
    conf = ConfFile.load(path)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config.os, "fsync", no_space)
    with pytest.raises(OSError):
        conf.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["101.conf"]


# --- GlobalConfig


@pytest.fixture
def no_global_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No VZPY_CONF, and the default /etc/vz/vz.conf replaced by a path that does not exist."""
    absent = tmp_path / "etc" / "vz" / "vz.conf"
    monkeypatch.delenv("VZPY_CONF", raising=False)
    monkeypatch.setattr(config, "DEFAULT_GLOBAL_CONF", absent)
    return absent


def test_global_defaults_when_no_file(no_global_conf: Path) -> None:
    gconf = GlobalConfig.load()
    assert gconf.exists is False
    assert gconf.path == no_global_conf
    assert gconf.values == {
        "VE_ROOT": "/vz/root/$VEID",
        "VE_PRIVATE": "/vz/private/$VEID",
        "CONFDIR": "/etc/vz/conf",
        "DUMPDIR": "/vz/dump",
        "TEMPLATE": "/vz/template",
        "LOCKDIR": "/vz/lock",
        "CGROUP_PARENT": "vzpy",
        "VETH_PREFIX": "veth",
    }
    assert gconf.ve_root("101") == Path("/vz/root/101")
    assert gconf.ve_private("101") == Path("/vz/private/101")
    assert gconf.confdir == Path("/etc/vz/conf")
    assert gconf.dumpdir == Path("/vz/dump")
    assert gconf.template_dir == Path("/vz/template")
    assert gconf.lockdir == Path("/vz/lock")
    assert gconf.ct_conf_path("101") == Path("/etc/vz/conf/101.conf")


def test_global_defaults_are_a_copy(no_global_conf: Path) -> None:
    gconf = GlobalConfig.load()
    gconf.values["VE_ROOT"] = "/changed"
    assert GLOBAL_DEFAULTS["VE_ROOT"] == "/vz/root/$VEID"


@pytest.mark.skipif(Path("/etc/vz/vz.conf").exists(), reason="this host has a real /etc/vz/vz.conf")
def test_real_default_path_absent_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZPY_CONF", raising=False)
    gconf = GlobalConfig.load()
    assert gconf.path == Path("/etc/vz/vz.conf")
    assert gconf.exists is False
    assert gconf.values == GLOBAL_DEFAULTS


def test_vzpy_conf_pointing_at_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope" / "vz.conf"
    monkeypatch.setenv("VZPY_CONF", str(missing))
    with pytest.raises(GlobalConfigNotFound) as info:
        GlobalConfig.load()
    assert info.value.exit_code == 10
    assert info.value.message == (
        f"global config {missing} not found; create it or unset VZPY_CONF to use /etc/vz/vz.conf"
    )


def test_explicit_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZPY_CONF", raising=False)
    with pytest.raises(GlobalConfigNotFound) as info:
        GlobalConfig.load(tmp_path / "vz.conf")
    assert info.value.exit_code == 10


def test_empty_vzpy_conf_is_a_vz_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZPY_CONF", "")
    try:
        GlobalConfig.load()
    except VzError:
        pass  # either "unset" (defaults) or GlobalConfigNotFound would be fine


def test_vzpy_conf_selects_the_file_and_keys_override_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vz.conf"
    path.write_text(
        "# test root\n"
        'VE_ROOT="/srv/root/${VEID}/fs"\n'
        "VE_PRIVATE=/srv/private/$VEID\n"
        f'LOCKDIR="{tmp_path}/lock"\n'
        'CGROUP_PARENT="vzpy-test"\n'
        'OTHER_KEY="kept"\n'
    )
    monkeypatch.setenv("VZPY_CONF", str(path))
    gconf = GlobalConfig.load()
    assert gconf.exists is True
    assert gconf.path == path
    assert gconf.values == {
        "VE_ROOT": "/srv/root/${VEID}/fs",
        "VE_PRIVATE": "/srv/private/$VEID",
        "CONFDIR": "/etc/vz/conf",
        "DUMPDIR": "/vz/dump",
        "TEMPLATE": "/vz/template",
        "LOCKDIR": f"{tmp_path}/lock",
        "CGROUP_PARENT": "vzpy-test",
        "VETH_PREFIX": "veth",
        "OTHER_KEY": "kept",
    }
    assert gconf.ve_root("101") == Path("/srv/root/101/fs")
    assert gconf.ve_private("web-1") == Path("/srv/private/web-1")
    assert gconf.lockdir == tmp_path / "lock"


def test_explicit_path_wins_over_vzpy_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vz.conf"
    path.write_text('DUMPDIR="/d"\n')
    monkeypatch.setenv("VZPY_CONF", str(tmp_path / "missing.conf"))
    assert GlobalConfig.load(path).dumpdir == Path("/d")


def test_veid_expanded_everywhere_in_the_value(tmp_path: Path) -> None:
    path = tmp_path / "vz.conf"
    path.write_text('VE_ROOT="/r/$VEID/${VEID}/$VEID"\n')
    assert GlobalConfig.load(path).ve_root("7") == Path("/r/7/7/7")


def test_veid_in_a_global_dir_needs_a_ctid(tmp_path: Path) -> None:
    path = tmp_path / "vz.conf"
    path.write_text('CONFDIR="/etc/vz/$VEID"\n')
    gconf = GlobalConfig.load(path)
    with pytest.raises(InvalidValue) as info:
        gconf.confdir  # noqa: B018
    assert info.value.message == "CONFDIR=/etc/vz/$VEID needs a CTID"
    assert info.value.exit_code == 21


def test_bad_global_conf_is_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "vz.conf"
    path.write_text('VE_ROOT="/r/$VEID"\nLOCKDIR=/a b\n')
    with pytest.raises(BadConfig) as info:
        GlobalConfig.load(path)
    assert info.value.message == f"{path}:2: value with spaces must be quoted: '/a b'; write KEY=\"value\""
    assert info.value.exit_code == 85


# --- validate_ctid


@pytest.mark.parametrize("ctid", ["101", "0", "4294967295", "web", "web-1", "web_1", "a.b", "CT.101", "x" * 64])
def test_valid_ctids(ctid: str) -> None:
    assert validate_ctid(ctid) == ctid


@pytest.mark.parametrize(
    "ctid", ["", "/", "a/b", "../101", "..", ".", "a b", " 101", "101 ", "a\tb", "ct$1", "101;rm", "é", "*"]
)
def test_invalid_ctids(ctid: str) -> None:
    with pytest.raises(InvalidValue) as info:
        validate_ctid(ctid)
    assert info.value.exit_code == 21
    assert info.value.message == f"invalid CTID {ctid!r}: use a number or a name of letters, digits, '_', '.', '-'"


@pytest.mark.parametrize("ctid", ["101\n", "web\n"])
def test_ctid_with_trailing_newline_is_invalid(ctid: str) -> None:
    with pytest.raises(InvalidValue):
        validate_ctid(ctid)
