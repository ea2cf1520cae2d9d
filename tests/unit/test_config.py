"""vz.conf / CTID.conf parsing and editing, the global config's defaults and $VEID expansion, CTID validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy import config
from vzpy.config import GLOBAL_DEFAULTS, ConfFile, GlobalConfig, validate_ctid
from vzpy.errors import BadConfig, GlobalConfigNotFound, InvalidValue

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
    ("text", "warning"),
    [
        ('B="1"\nnot a line\n', "/etc/vz/conf/101.conf:2: not a KEY=value line, ignored: 'not a line'"),
        ("export A=1\n", "/etc/vz/conf/101.conf:1: not a KEY=value line, ignored: 'export A=1'"),
        ("1A=2\n", "/etc/vz/conf/101.conf:1: not a KEY=value line, ignored: '1A=2'"),
        ("# c\n\n=x\n", "/etc/vz/conf/101.conf:3: not a KEY=value line, ignored: '=x'"),
        ("A-B=1\n", "/etc/vz/conf/101.conf:1: not a KEY=value line, ignored: 'A-B=1'"),
        ('A="x\n', "/etc/vz/conf/101.conf:1: unmatched quote in '\"x', line ignored"),
        ('A="\n', "/etc/vz/conf/101.conf:1: unmatched quote in '\"', line ignored"),
        ("B=1\nA='x\n", '/etc/vz/conf/101.conf:2: unmatched quote in "\'x", line ignored'),
        ('A="x" y\n', "/etc/vz/conf/101.conf:1: text after the closing quote in '\"x\" y', line ignored"),
    ],
)
def test_a_line_vzctl_cannot_parse_is_ignored_with_a_warning(text: str, warning: str) -> None:
    conf = ConfFile.parse(CONF, text)
    assert "A" not in conf.values
    assert warning in conf.warnings
    assert conf.lines == text.splitlines()  # kept as written: set --save rewrites only its own keys


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ('A="x" # note', "x"),
        ("A=x # note", "x"),
        ("A=x\t# note", "x"),
        ("A=inherit # Copy from host system's /etc/resolv.conf", "inherit"),
        ("A=x#y", "x#y"),
        ("A=#x", "#x"),
        ('A="x # not a comment"', "x # not a comment"),
        ("A=x y", "x y"),  # vzctl takes the rest of the line
        ('A=x"', 'x"'),
        ('A="x"y"', 'x"y'),  # up to the last quote, as vzctl reads it
    ],
)
def test_values_as_vzctl_reads_them(line: str, value: str) -> None:
    conf = ConfFile.parse(CONF, line + "\n")
    assert conf.values == {"A": value}
    assert conf.warnings == ["/etc/vz/conf/101.conf:1: unknown parameter A, ignored"]


def test_unknown_keys_are_kept_with_a_warning_and_known_ones_are_not_warned_about() -> None:
    conf = ConfFile.parse(CONF, 'VIRTUOZZO=yes\nIPTABLES="ipt_REJECT"\nVE_LAYOUT=ploop\nMY_OWN="x"\nVZPY_X=1\n')
    assert conf.values["MY_OWN"] == "x"
    assert conf.warnings == ["/etc/vz/conf/101.conf:4: unknown parameter MY_OWN, ignored"]


def test_load_prints_each_warning_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "101.conf"
    path.write_text("junk line\n")
    ConfFile.load(path)
    ConfFile.load(path)
    assert capsys.readouterr().err == f"vzpy: warning: {path}:1: not a KEY=value line, ignored: 'junk line'\n"


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "101.conf"
    path.write_text(SAMPLE)
    conf = ConfFile.load(path)
    assert conf.path == path
    assert conf.get("HOSTNAME") == "ct101"
    assert conf.get("MISSING") is None
    assert conf.get("MISSING", "dflt") == "dflt"


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
    conf.set("OPERATOR_NOTE", value)
    conf.set("NEWKEY", value)
    assert ConfFile.parse(CONF, conf.text()).values == conf.values
    assert conf.values["OPERATOR_NOTE"] == value
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


def test_an_empty_vzpy_conf_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZPY_CONF", "")
    monkeypatch.setattr(config, "DEFAULT_GLOBAL_CONF", tmp_path / "absent.conf")
    loaded = GlobalConfig.load()
    assert (loaded.path, loaded.exists, loaded.values) == (tmp_path / "absent.conf", False, GLOBAL_DEFAULTS)
    default = tmp_path / "vz.conf"
    default.write_text('DUMPDIR="/elsewhere"\n')
    monkeypatch.setattr(config, "DEFAULT_GLOBAL_CONF", default)
    loaded = GlobalConfig.load()
    assert (loaded.path, loaded.exists, loaded.dumpdir) == (default, True, Path("/elsewhere"))


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


def test_a_bad_global_conf_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "vz.conf"
    path.write_text('VE_ROOT="/r/$VEID"\nLOCKDIR="/a b\n')
    gconf = GlobalConfig.load(path)
    assert gconf.lockdir == Path(GLOBAL_DEFAULTS["LOCKDIR"]) and gconf.ve_root("1") == Path("/r/1")


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


def test_set_on_a_duplicated_key_keeps_the_keys_after_it() -> None:
    conf = ConfFile.parse(CONF, 'A="1"\nA="2"\nB="3"\n')
    conf.set("A", "9")
    assert conf.text() == 'A="9"\nB="3"\n'
    assert ConfFile.parse(CONF, conf.text()).values == {"A": "9", "B": "3"}


def test_set_on_a_key_duplicated_around_others_edits_the_last_line() -> None:
    conf = ConfFile.parse(CONF, 'A="1"\nB="3"\nA="2"\nC="4"\n')
    conf.set("A", "9")
    assert conf.text() == 'B="3"\nA="9"\nC="4"\n'


# --- CTID limits


@pytest.mark.parametrize("ctid", ["x" * config.MAX_CTID_LENGTH, "4294967295", "0" * 20, "a" + "1" * 150])
def test_ctids_at_the_limits(ctid: str) -> None:
    assert validate_ctid(ctid) == ctid


def test_a_ctid_over_the_length_limit_is_refused_in_one_short_line() -> None:
    for length in (config.MAX_CTID_LENGTH + 1, 256, 300, 5000):
        with pytest.raises(InvalidValue) as info:
            validate_ctid("x" * length)
        assert info.value.message == (
            f"invalid CTID {'x' * 40!r}... ({length} characters): {length} characters, at most 200"
        )
        assert info.value.exit_code == 21


@pytest.mark.parametrize("ctid", ["4294967296", "99999999999999999999"])
def test_a_numeric_ctid_beyond_32_bits_is_refused(ctid: str) -> None:
    with pytest.raises(InvalidValue, match=f"invalid CTID '{ctid}': a numeric CTID is at most 4294967295"):
        validate_ctid(ctid)


# --- values vzpy applies: HOSTNAME, CPUS, NUMPROC, PHYSPAGES


@pytest.mark.parametrize(
    "name", ["web", "a", "1host", "x-1", "a" * 63, "web.example.com", "a" * 31 + "." + "b" * 32, "A-b.C1"]
)
def test_valid_hostnames(name: str) -> None:
    assert config.validate_hostname(name) == name
    assert config.hostname_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a" * 64, "label 'aaaa"),
        ("a" * 32 + "." + "b" * 32, "65 characters, the kernel holds at most 64"),
        ("a" * 200, "200 characters, the kernel holds at most 64"),
        ("", "label '' is not 1-63"),
        ("-web", "label '-web'"),
        ("web-", "label 'web-'"),
        ("we_b", "label 'we_b'"),
        ("web..x", "label ''"),
        (".web", "label ''"),
        ("web.", "label ''"),
        ("wéb", "label 'wéb'"),
        ("web\n", "label 'web\\n'"),
    ],
)
def test_invalid_hostnames(name: str, problem: str) -> None:
    with pytest.raises(InvalidValue) as info:
        config.validate_hostname(name)
    assert problem in info.value.message and info.value.exit_code == 21
    assert "\n" not in info.value.message


@pytest.mark.parametrize("ctid", ["101", "web_1", "CT.101", "a" * 200, "x-", "ct" + "9" * 70])
def test_the_default_hostname_is_valid_for_every_ctid(ctid: str) -> None:
    validate_ctid(ctid)
    name = config.default_hostname(ctid)
    assert config.hostname_problem(name) is None and name.startswith("ct")


def test_the_default_hostname_of_a_numeric_ctid_is_vzctls() -> None:
    assert config.default_hostname("101") == "ct101"
    assert config.default_hostname("web_1.x") == "ctweb-1-x"


@pytest.mark.parametrize("value", ["0", "0.01", "1", "1.5", "2.", "65536", "65536.0"])
def test_valid_cpus(value: str) -> None:
    assert config.cpus_problem(value) is None


@pytest.mark.parametrize("value", ["nan", "1e400", "inf", "-1", "0.009", "65536.1", "1_0", "x", " 1", "1e2", "٣"])
def test_invalid_cpus(value: str) -> None:
    assert config.cpus_problem(value) is not None


@pytest.mark.parametrize("value", ["0", "512", "512:512", "0:4194304", "4194304", "unlimited", "unlimited:unlimited"])
def test_valid_numproc(value: str) -> None:
    assert config.numproc_problem(value) is None


@pytest.mark.parametrize(
    "value", ["x:y", "1:2:3", "4194305", "1:4194305", "-1", ":", "1:", "²", "1.5", "unlimit", "unlimited:"]
)
def test_invalid_numproc(value: str) -> None:
    assert config.numproc_problem(value) is not None


@pytest.mark.parametrize(
    ("value", "pids_max"), [("512", 512), ("256:512", 512), ("unlimited", 0), ("512:unlimited", 0)]
)
def test_numproc_limit_is_the_pairs_limit_and_unlimited_is_none(value: str, pids_max: int) -> None:
    assert config.numproc_limit(value) == pids_max


@pytest.mark.parametrize(
    "value",
    ["0:256M", "256M", "1G:2G", f"{2**63 - 1}", "0:unlimited", "unlimited", "0:262144", "99999999999999999999G"],
)
def test_valid_physpages(value: str) -> None:
    assert config.physpages_problem(value) is None


@pytest.mark.parametrize("value", ["x:256M", "1:2:3", "256M:", "0:1023", "0:3M", "-1", "0:12X", "1e3"])
def test_invalid_physpages(value: str) -> None:
    assert config.physpages_problem(value) is not None


@pytest.mark.parametrize(
    ("key", "value"), [("CPUS", "nan"), ("CPUS", "inf"), ("NUMPROC", "x:y"), ("HOSTNAME", "h" * 200)]
)
def test_set_refuses_a_bad_value_as_invalid_value(key: str, value: str) -> None:
    conf = ConfFile.parse(CONF, SAMPLE)
    with pytest.raises(InvalidValue) as info:
        conf.set(key, value)
    assert info.value.message.startswith(f"invalid {key} value ") and info.value.exit_code == 21
    assert conf.text() == SAMPLE


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('CPUS="nan"', "CPUS"),
        ('CPUS="1e400"', "CPUS"),
        ('NUMPROC="x:y"', "NUMPROC"),
        (f'HOSTNAME="{"h" * 200}"', "HOSTNAME"),
    ],
)
def test_checked_names_the_file_and_line_of_a_bad_value(line: str, key: str) -> None:
    conf = ConfFile.parse(CONF, f'# comment\nOTHER="1"\n{line}\nLAST="2"\n')
    with pytest.raises(BadConfig) as info:
        conf.checked(key)
    assert info.value.message.startswith(f"{CONF}:3: invalid {key} value ")
    assert info.value.message.endswith("; fix the line") and info.value.exit_code == 85


def test_checked_names_the_line_that_counts_when_a_key_repeats() -> None:
    conf = ConfFile.parse(CONF, 'CPUS="nan"\nCPUS="1e400"\n')
    with pytest.raises(BadConfig, match=r"101\.conf:2: invalid CPUS value '1e400'"):
        conf.checked("CPUS")


def test_checked_returns_good_values_and_none_for_unset_or_empty_keys() -> None:
    conf = ConfFile.parse(CONF, 'CPUS="1.5"\nNUMPROC=""\n')
    assert (conf.checked("CPUS"), conf.checked("NUMPROC"), conf.checked("HOSTNAME")) == ("1.5", None, None)


def test_where_without_the_key_is_the_file() -> None:
    assert ConfFile.parse(CONF, 'A="1"\n').where("B") == str(CONF)
    assert ConfFile.parse(CONF, 'A="1"\n B = "2"\n').where("B") == f"{CONF}:2"


def test_unchecked_keys_take_any_value() -> None:
    assert config.value_problem("OPERATOR_NOTE", "nan") is None


def test_numbers_too_long_for_int_are_refused_not_crashed_on() -> None:
    assert "at most 4194304" in str(config.numproc_problem("9" * 5000))
    assert config.numproc_problem("0" * 30 + "512") is None
    assert config.physpages_problem("9" * 5000) is None  # vzctl caps it at LONG_MAX: unlimited
    assert config.physpages_problem("0" * 30 + "1G") is None


def test_the_largest_sizes() -> None:
    assert config.parse_size(str(config.MAX_BYTES)) == 2**63 - 1
    with pytest.raises(InvalidValue, match="more than 9223372036854775807 bytes"):
        config.parse_size("8388608T")
