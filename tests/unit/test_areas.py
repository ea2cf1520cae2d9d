"""areas: VE_PRIVATE / VE_ROOT values that would hand a host directory (or another CT's) to a CT are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy import areas
from vzpy.config import ConfFile, GlobalConfig
from vzpy.errors import BadConfig


@pytest.fixture
def gconf(tmp_path: Path) -> GlobalConfig:
    vz = tmp_path / "vz"
    text = "".join(
        f'{key}="{vz}/{sub}"\n'
        for key, sub in (
            ("VE_ROOT", "root/$VEID"),
            ("VE_PRIVATE", "private/$VEID"),
            ("CONFDIR", "conf"),
            ("DUMPDIR", "dump"),
            ("TEMPLATE", "template"),
            ("LOCKDIR", "lock"),
        )
    )
    path = tmp_path / "vz.conf"
    path.write_text(text)
    (vz / "conf").mkdir(parents=True)
    return GlobalConfig.load(path)


def ct_conf(gconf: GlobalConfig, ctid: str, **values: str) -> ConfFile:
    """CTID.conf with a comment on line 1 and the given keys from line 2 on, saved in CONFDIR."""
    conf = ConfFile(path=gconf.ct_conf_path(ctid), lines=[f"# CT {ctid}"])
    for key, value in values.items():
        conf.lines.append(f'{key}="{value}"')
    conf = ConfFile.parse(conf.path, "\n".join(conf.lines) + "\n")
    conf.save()
    return conf


def refused(gconf: GlobalConfig, ctid: str = "101", **values: str) -> str:
    conf = ct_conf(gconf, ctid, **values)
    with pytest.raises(BadConfig) as raised:
        areas.check_ct(conf, ctid, gconf)
    assert raised.value.exit_code == 85
    return raised.value.message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("/", 'VE_PRIVATE "/" is the host\'s root directory'),
        ("private/101", "is not an absolute path"),
        ("/usr", "is the host directory /usr"),
        ("/usr/", "is the host directory /usr"),
        ("/var/lib", "is the host directory /var/lib"),
        ("/lib64", "is the host directory /lib64"),
        ("/libfoo", "is the host directory /libfoo"),
        ("/etc", "is the host directory /etc"),
        ("/proc/1/root/srv/ct", "is inside the kernel filesystem /proc"),
        ("/vz/../usr/local/ct", "contains '..'"),
    ],
)
def test_a_host_directory_as_private_area_is_refused_with_file_and_line(
    gconf: GlobalConfig, value: str, says: str
) -> None:
    message = refused(gconf, VE_PRIVATE=value)
    assert message.startswith(f"{gconf.ct_conf_path('101')}:2: VE_PRIVATE ")
    assert says in message
    assert "set it to a directory of the CT's own, e.g. /vz/private/101" in message


def test_a_symlink_to_the_host_root_counts_as_the_host_root(gconf: GlobalConfig, tmp_path: Path) -> None:
    (tmp_path / "to-root").symlink_to("/")
    message = refused(gconf, VE_ROOT=f"{tmp_path}/to-root")
    assert f':2: VE_ROOT "{tmp_path}/to-root" is the host\'s root directory' in message


@pytest.mark.parametrize("key", ["CONFDIR", "DUMPDIR", "LOCKDIR", "TEMPLATE"])
def test_vzpy_own_directories_are_refused(gconf: GlobalConfig, key: str) -> None:
    message = refused(gconf, VE_ROOT=f"{gconf.expand(key)}/101")
    assert f"overlaps vz.conf's {key} {gconf.expand(key)}" in message


def test_private_and_root_may_not_be_equal_or_nested(gconf: GlobalConfig, tmp_path: Path) -> None:
    same = refused(gconf, VE_PRIVATE=f"{tmp_path}/ct", VE_ROOT=f"{tmp_path}/ct")
    assert same.startswith(f"{gconf.ct_conf_path('101')}:3: VE_ROOT ")
    assert "are the same directory or one is inside the other" in same
    assert "are the same" in refused(gconf, VE_PRIVATE=f"{tmp_path}/ct", VE_ROOT=f"{tmp_path}/ct/root")
    assert "are the same" in refused(gconf, VE_PRIVATE=f"{tmp_path}/ct/private", VE_ROOT=f"{tmp_path}/ct")


@pytest.mark.parametrize("mine", ["{p}/102", "{p}/102/sub", "{p}"])
def test_another_cts_area_is_refused(gconf: GlobalConfig, tmp_path: Path, mine: str) -> None:
    ct_conf(gconf, "102", VE_PRIVATE=f"{tmp_path}/p/102")
    message = refused(gconf, VE_PRIVATE=mine.format(p=f"{tmp_path}/p"))
    assert f'overlaps CT 102\'s VE_PRIVATE "{tmp_path}/p/102" ({gconf.ct_conf_path("102")}:2)' in message


def test_another_cts_default_area_counts_too(gconf: GlobalConfig) -> None:
    ct_conf(gconf, "102")  # no VE_ROOT of its own: vz.conf's root/$VEID
    message = refused(gconf, VE_ROOT=str(gconf.ve_root("102")))
    assert f'overlaps CT 102\'s VE_ROOT "{gconf.ve_root("102")}" ({gconf.path}:1)' in message


def test_own_areas_from_defaults_and_unrelated_cts_pass(gconf: GlobalConfig, tmp_path: Path) -> None:
    ct_conf(gconf, "102")
    ct_conf(gconf, "10", VE_PRIVATE=f"{tmp_path}/elsewhere/10")
    (gconf.confdir / "103.conf").write_text("this is not KEY=value\n")  # a broken other conf breaks only itself
    (gconf.confdir / "101.conf.destroyed").write_text(f'VE_PRIVATE="{gconf.ve_private("101")}"\n')
    areas.check_ct(ct_conf(gconf, "101"), "101", gconf)
    areas.check_ct(ct_conf(gconf, "104", VE_PRIVATE="/var/lib/vz/private/$VEID"), "104", gconf)
    areas.check_ct(None, "105", gconf)


def test_a_ct_not_created_yet_is_checked_against_vz_conf_with_its_line(gconf: GlobalConfig, tmp_path: Path) -> None:
    gconf.path.write_text(gconf.path.read_text() + 'VE_PRIVATE="/srv"\n')
    with pytest.raises(BadConfig, match=rf'^{gconf.path}:7: VE_PRIVATE "/srv" is the host directory /srv'):
        areas.check_ct(None, "101", GlobalConfig.load(gconf.path))


def test_a_built_in_default_is_named_as_such(tmp_path: Path) -> None:
    gconf = GlobalConfig(path=tmp_path / "vz.conf", values={"VE_ROOT": "/", "VE_PRIVATE": "/srv/p/$VEID"}, exists=False)
    gconf = GlobalConfig(path=gconf.path, values={**_defaults(), **gconf.values}, exists=False)
    with pytest.raises(BadConfig, match=rf"^{tmp_path}/vz.conf \(built-in default\): VE_ROOT \"/\""):
        areas.check_ct(None, "101", gconf)


def _defaults() -> dict[str, str]:
    from vzpy.config import GLOBAL_DEFAULTS

    return dict(GLOBAL_DEFAULTS)
