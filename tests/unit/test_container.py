"""The CT model: sizes, paths from the global and CT configs, the persisted run state, init liveness."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vzpy.config import PAGE_SIZE, GlobalConfig, parse_size
from vzpy.container import Container, RunState, start_ticks
from vzpy.errors import BadConfig, ConfigNotFound, InvalidValue
from vzpy.runtime.cgroups import UNLIMITED, Limits
from vzpy.stage import Stage

# --- parse_size


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1024", 1024),
        ("0", 0),
        ("3K", 3 << 10),
        ("1T", 1 << 40),
        ("256P", 256 * PAGE_SIZE),
        ("512m", 512 << 20),
        ("2g", 2 << 30),
        ("256p", 256 * PAGE_SIZE),
        ("512MB", 512 << 20),
        ("512mb", 512 << 20),
        ("1KB", 1 << 10),
        ("100B", 100),
        (" 1G ", 1 << 30),
    ],
)
def test_parse_size(value: str, size: int) -> None:
    assert parse_size(value) == size


def test_page_size_is_the_hosts() -> None:
    assert os.sysconf("SC_PAGE_SIZE") == PAGE_SIZE
    assert parse_size("1P") == PAGE_SIZE


@pytest.mark.parametrize(
    "value", ["", "B", "M", "G", "-1M", "1.5G", "12X", "M512", "1 G", "0x10", "+5", "1_000", "1e3", "lots", "1MM"]
)
def test_parse_size_rejects_junk(value: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_size(value, what="memory")
    assert info.value.exit_code == 21
    assert info.value.message == f"invalid memory {value!r}: use e.g. 512M or 2G"


def test_parse_size_default_what() -> None:
    with pytest.raises(InvalidValue, match=r"^invalid size 'x': use e\.g\. 512M or 2G$"):
        parse_size("x")


@pytest.mark.parametrize("value", ["²", "1²M"])
def test_parse_size_rejects_superscript_digits(value: str) -> None:
    with pytest.raises(InvalidValue):
        parse_size(value)


# --- Container paths and configuration


@pytest.fixture
def gconf(tmp_path: Path) -> GlobalConfig:
    vz = tmp_path / "vz"
    conf = tmp_path / "vz.conf"
    conf.write_text(
        f'VE_ROOT="{vz}/root/$VEID"\n'
        f'VE_PRIVATE="{vz}/private/${{VEID}}"\n'
        f'CONFDIR="{vz}/conf"\n'
        f'DUMPDIR="{vz}/dump"\n'
        f'TEMPLATE="{vz}/template"\n'
        f'LOCKDIR="{vz}/lock"\n'
        'CGROUP_PARENT="vzpy-unit"\n'
    )
    return GlobalConfig.load(conf)


def write_ct_conf(gconf: GlobalConfig, ctid: str, text: str) -> Path:
    path = gconf.ct_conf_path(ctid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_paths_from_global_defaults(gconf: GlobalConfig, tmp_path: Path) -> None:
    vz = tmp_path / "vz"
    write_ct_conf(gconf, "101", 'HOSTNAME="ct101"\n')
    ct = Container("101", gconf)
    assert ct.ctid == "101"
    assert ct.conf_path == vz / "conf" / "101.conf"
    assert ct.private == vz / "private" / "101"
    assert ct.root == vz / "root" / "101"
    assert ct.state_path == vz / "lock" / "101.state.json"
    assert ct.default_dumpfile == vz / "dump" / "Dump.101"
    assert ct.veth == "veth101.0"
    assert ct.cgroups.parent == "vzpy-unit"
    assert ct.cgroups.ctid == "101"


def test_paths_from_the_ct_conf_win(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", 'VE_ROOT="/srv/roots/a"\nVE_PRIVATE="/srv/private/a"\n')
    ct = Container("101", gconf)
    assert ct.private == Path("/srv/private/a")
    assert ct.root == Path("/srv/roots/a")


def test_empty_conf_values_fall_back_to_global(gconf: GlobalConfig, tmp_path: Path) -> None:
    write_ct_conf(gconf, "101", 'VE_ROOT=""\nVE_PRIVATE=""\n')
    ct = Container("101", gconf)
    assert ct.private == tmp_path / "vz" / "private" / "101"
    assert ct.root == tmp_path / "vz" / "root" / "101"


def test_veid_in_the_ct_conf_is_expanded(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", 'VE_ROOT="/srv/root/$VEID"\nVE_PRIVATE="/srv/private/${VEID}"\n')
    ct = Container("101", gconf)
    assert ct.private == Path("/srv/private/101")
    assert ct.root == Path("/srv/root/101")


def test_named_ct_paths(gconf: GlobalConfig, tmp_path: Path) -> None:
    ct = Container("web-1", gconf)
    assert ct.conf_path == tmp_path / "vz" / "conf" / "web-1.conf"
    assert ct.state_path == tmp_path / "vz" / "lock" / "web-1.state.json"
    assert ct.default_dumpfile == tmp_path / "vz" / "dump" / "Dump.web-1"


@pytest.mark.parametrize("ctid", ["../101", "a/b", "", ".."])
def test_invalid_ctid_is_refused(gconf: GlobalConfig, ctid: str) -> None:
    with pytest.raises(InvalidValue):
        Container(ctid, gconf)


def test_missing_conf_is_config_not_found(gconf: GlobalConfig, tmp_path: Path) -> None:
    ct = Container("404", gconf)
    assert ct.exists() is False
    with pytest.raises(ConfigNotFound) as info:
        ct.conf  # noqa: B018
    assert info.value.exit_code == 14
    assert info.value.message == (
        f"CT 404 does not exist: {tmp_path}/vz/conf/404.conf not found; "
        "create it with `vzpy create 404 --ostemplate minimal`"
    )
    with pytest.raises(ConfigNotFound):
        ct.private  # noqa: B018


def test_conf_values(gconf: GlobalConfig) -> None:
    write_ct_conf(
        gconf,
        "101",
        'HOSTNAME="web.example"\nIP_ADDRESS="10.0.0.1  10.0.0.2"\nPHYSPAGES="0:256M"\nNUMPROC="100:120"\nCPUS="1.5"\n',
    )
    ct = Container("101", gconf)
    assert ct.exists() is True
    assert ct.hostname == "web.example"
    assert ct.ips == ["10.0.0.1", "10.0.0.2"]
    assert ct.limits == Limits(memory_bytes=256 << 20, cpu_percent=150.0, pids_max=120)


def test_conf_defaults(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", "# nothing\n")
    ct = Container("101", gconf)
    assert ct.hostname == "ct101"
    assert ct.ips == []
    assert ct.limits == Limits()


def test_physpages_in_pages(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", 'PHYSPAGES="0:65536P"\n')
    assert Container("101", gconf).limits.memory_bytes == 65536 * PAGE_SIZE


@pytest.mark.parametrize(
    ("physpages", "memory"),
    [
        ("0:262144", 262144 * PAGE_SIZE),  # a plain number is pages, as in vzctl's samples: 1 GiB
        ("262144", 262144 * PAGE_SIZE),
        ("0:1G", 1 << 30),
        ("0:1.5G", 3 << 29),
        ("0:unlimited", UNLIMITED),
        ("unlimited", UNLIMITED),
        (f"0:{2**63}", UNLIMITED),  # vzctl caps it at LONG_MAX, its unlimited
    ],
)
def test_physpages_units(gconf: GlobalConfig, physpages: str, memory: int) -> None:
    write_ct_conf(gconf, "101", f'PHYSPAGES="{physpages}"\n')
    assert Container("101", gconf).limits.memory_bytes == memory


def test_vzctl_limits_in_one_ct_conf(gconf: GlobalConfig) -> None:
    write_ct_conf(
        gconf,
        "101",
        'PHYSPAGES="0:262144"\nSWAPPAGES="0:128M"\nCPUUNITS="2000"\nCPULIMIT="50"\nNUMPROC="240:240"\n',
    )
    assert Container("101", gconf).limits == Limits(
        memory_bytes=1 << 30, swap_bytes=128 << 20, cpu_percent=50.0, cpu_shares=2000, pids_max=240
    )


@pytest.mark.parametrize(
    ("cpulimit", "cpus", "percent"),
    [
        ("50", None, 50.0),
        ("0", None, 0.0),
        (None, "1.5", 150.0),
        ("300", "1", 100.0),
        ("50", "2", 50.0),
        ("0", "2", 200.0),
    ],
)
def test_the_cfs_quota_is_the_lower_of_cpulimit_and_cpus(
    gconf: GlobalConfig, cpulimit: str | None, cpus: str | None, percent: float
) -> None:
    lines = [f'CPULIMIT="{cpulimit}"' if cpulimit else "", f'CPUS="{cpus}"' if cpus else ""]
    write_ct_conf(gconf, "101", "\n".join(lines) + "\n")
    assert Container("101", gconf).limits.cpu_percent == percent


def test_cpulimit_in_percent_of_the_host(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", 'CPULIMIT="50%"\n')
    assert Container("101", gconf).limits.cpu_percent == 50.0 * (os.cpu_count() or 1)


def test_ct_defaults_come_from_vz_conf_and_ctid_conf_overrides_them(gconf: GlobalConfig) -> None:
    assert gconf.conf is not None
    gconf.conf.values.update({"NAMESERVER": "10.1.1.1", "CPUUNITS": "500", "ONBOOT": "yes"})
    gconf.values.update(gconf.conf.values)
    write_ct_conf(gconf, "101", 'CPUUNITS="2000"\nSEARCHDOMAIN="example.com corp.example"\n')
    ct = Container("101", gconf)
    assert ct.nameservers == ["10.1.1.1"] and ct.searchdomains == ["example.com", "corp.example"]
    assert ct.limits.cpu_shares == 2000 and ct.onboot is True and ct.disabled is False


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('SWAPPAGES="lots"', "SWAPPAGES"),
        ('CPUUNITS="7"', "CPUUNITS"),
        ('CPULIMIT="150%"', "CPULIMIT"),
        ('NAMESERVER="8.8.8.8 not-an-ip"', "NAMESERVER"),
        ('SEARCHDOMAIN="a;b"', "SEARCHDOMAIN"),
        ('DISKSPACE="unlimitedX"', "DISKSPACE"),
        ('ONBOOT="maybe"', "ONBOOT"),
    ],
)
def test_a_bad_value_of_a_key_vzpy_applies_is_bad_config_at_its_line(gconf: GlobalConfig, line: str, key: str) -> None:
    path = write_ct_conf(gconf, "101", f'HOSTNAME="web"\n{line}\n')
    ct = Container("101", gconf)
    with pytest.raises(BadConfig) as info:
        ct.limits, ct.nameservers, ct.searchdomains, ct.disk_limits, ct.onboot  # noqa: B018
    assert info.value.message.startswith(f"{path}:2: invalid {key} value ") and info.value.exit_code == 85


def test_disk_limits_in_1k_blocks_and_sizes(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "101", 'DISKSPACE="1048576:1153434"\nDISKINODES="200000:220000"\n')
    limits = Container("101", gconf).disk_limits
    assert (limits.soft_bytes, limits.hard_bytes) == (1 << 30, 1153434 * 1024)
    assert (limits.soft_inodes, limits.hard_inodes, limits.configured) == (200000, 220000, True)
    write_ct_conf(gconf, "101", 'DISKSPACE="10G:11G"\n')
    assert Container("101", gconf).disk_limits.hard_bytes == 11 << 30


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('CPUS="nan"', "CPUS"),
        ('CPUS="1e400"', "CPUS"),
        ('NUMPROC="x:y"', "NUMPROC"),
        ('NUMPROC="99999999999"', "NUMPROC"),
        ('PHYSPAGES="0:lots"', "PHYSPAGES"),
        ('PHYSPAGES="x:256M"', "PHYSPAGES"),
    ],
)
def test_a_bad_limit_is_bad_config_at_its_line(gconf: GlobalConfig, line: str, key: str) -> None:
    path = write_ct_conf(gconf, "101", f'HOSTNAME="web"\n{line}\n')
    with pytest.raises(BadConfig) as info:
        Container("101", gconf).limits  # noqa: B018
    assert info.value.message.startswith(f"{path}:2: invalid {key} value ") and info.value.exit_code == 85


def test_a_200_character_hostname_is_bad_config_at_its_line(gconf: GlobalConfig) -> None:
    path = write_ct_conf(gconf, "101", f'\nHOSTNAME="{"h" * 200}"\n')
    with pytest.raises(BadConfig) as info:
        Container("101", gconf).hostname  # noqa: B018
    assert info.value.message == (
        f"{path}:2: invalid HOSTNAME value {'h' * 40!r}... (200 characters): 200 characters, "
        "the kernel holds at most 64; fix the line"
    )


def test_a_ctid_of_300_characters_is_invalid_value(gconf: GlobalConfig) -> None:
    with pytest.raises(InvalidValue) as info:
        Container("c" * 300, gconf)
    assert info.value.exit_code == 21 and len(info.value.message) < 120


def test_the_default_hostname_of_a_named_ct_is_a_valid_hostname(gconf: GlobalConfig) -> None:
    write_ct_conf(gconf, "web_1", "# nothing\n")
    assert Container("web_1", gconf).hostname == "ctweb-1"


# --- run state


def test_run_state_defaults() -> None:
    state = RunState()
    assert state == RunState(
        stage=Stage.STOPPED, init_pid=0, init_started=0.0, veth="", ips=[], dumpfile="", updated=0.0
    )
    assert state.init_alive() is False


def test_missing_state_file_is_a_stopped_ct(gconf: GlobalConfig) -> None:
    ct = Container("101", gconf)
    assert not ct.state_path.exists()
    assert ct.load_state() == RunState()
    assert ct.stage() is Stage.STOPPED


def test_run_state_round_trip(gconf: GlobalConfig) -> None:
    ct = Container("101", gconf)
    state = RunState(
        stage=Stage.DUMPED,
        init_pid=4242,
        init_started=1712345678.123456,
        veth="veth101.0",
        ips=["10.0.0.1", "fd00::1"],
        dumpfile="/vz/dump/Dump.101",
    )
    before = time.time()
    ct.save_state(state)
    assert before <= state.updated <= time.time()
    loaded = ct.load_state()
    assert loaded == state
    assert loaded.stage is Stage.DUMPED
    assert json.loads(ct.state_path.read_text())["stage"] == "dumped"
    assert sorted(p.name for p in ct.state_path.parent.iterdir()) == ["101.state.json"]


def test_save_state_creates_the_lockdir(gconf: GlobalConfig) -> None:
    ct = Container("101", gconf)
    assert not gconf.lockdir.exists()
    ct.save_state(RunState(stage=Stage.RUNNING, init_pid=1))
    assert gconf.lockdir.is_dir()
    assert ct.load_state().stage is Stage.RUNNING


def test_clear_state(gconf: GlobalConfig) -> None:
    ct = Container("101", gconf)
    ct.save_state(RunState(stage=Stage.RUNNING, init_pid=1))
    ct.clear_state()
    assert not ct.state_path.exists()
    ct.clear_state()  # absent is fine
    assert ct.load_state() == RunState()


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_init_alive_for_a_live_pid_with_its_create_time(child: subprocess.Popen[bytes]) -> None:
    started = psutil.Process(child.pid).create_time()
    assert RunState(stage=Stage.RUNNING, init_pid=child.pid, init_started=started).init_alive() is True


def test_init_alive_survives_the_json_round_trip(gconf: GlobalConfig, child: subprocess.Popen[bytes]) -> None:
    ct = Container("101", gconf)
    ct.save_state(
        RunState(stage=Stage.RUNNING, init_pid=child.pid, init_started=psutil.Process(child.pid).create_time())
    )
    assert ct.load_state().init_alive() is True


def test_init_alive_false_for_a_reused_pid(child: subprocess.Popen[bytes]) -> None:
    started = psutil.Process(child.pid).create_time()
    assert RunState(stage=Stage.RUNNING, init_pid=child.pid, init_started=started - 1.0).init_alive() is False
    assert RunState(stage=Stage.RUNNING, init_pid=child.pid, init_started=0.0).init_alive() is False


def test_init_alive_when_the_boot_time_moves(child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/stat's btime moves by a second now and then as NTP adjusts the clock, and psutil's create_time
    with it: the init recorded at start must still be recognised (not mistaken for a stopped CT)."""
    process = psutil.Process(child.pid)
    state = RunState(
        stage=Stage.RUNNING,
        init_pid=child.pid,
        init_started=process.create_time(),
        init_start_ticks=start_ticks(child.pid),
    )
    btime = psutil._pslinux.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: btime + 1.0)
    assert psutil.Process(child.pid).create_time() != state.init_started
    assert state.init_alive() is True
    reused = RunState(stage=Stage.RUNNING, init_pid=child.pid, init_start_ticks=start_ticks(child.pid) - 1)
    assert reused.init_alive() is False


def test_init_alive_false_for_a_dead_pid() -> None:
    process = subprocess.Popen(["true"])
    started = psutil.Process(process.pid).create_time()  # alive or a zombie until reaped
    process.wait(timeout=10)
    assert not psutil.pid_exists(process.pid)
    assert RunState(stage=Stage.RUNNING, init_pid=process.pid, init_started=started).init_alive() is False


def test_init_alive_false_for_a_zombie() -> None:
    process = subprocess.Popen(["true"])
    try:
        zombie = psutil.Process(process.pid)
        started = zombie.create_time()
        deadline = time.monotonic() + 10
        while zombie.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "child did not exit"
            time.sleep(0.01)
        assert RunState(stage=Stage.RUNNING, init_pid=process.pid, init_started=started).init_alive() is False
    finally:
        process.wait(timeout=10)


def test_stage_is_stopped_when_init_is_dead(gconf: GlobalConfig) -> None:
    # The persisted stage says running, but the init is gone: the CT is stopped (no cgroup is looked at).
    process = subprocess.Popen(["true"])
    process.wait(timeout=10)
    ct = Container("101", gconf)
    ct.save_state(RunState(stage=Stage.RUNNING, init_pid=process.pid, init_started=1.0))
    assert ct.stage() is Stage.STOPPED


def test_stage_is_stopped_when_persisted_stopped(gconf: GlobalConfig, child: subprocess.Popen[bytes]) -> None:
    ct = Container("101", gconf)
    started = psutil.Process(child.pid).create_time()
    ct.save_state(RunState(stage=Stage.STOPPED, init_pid=child.pid, init_started=started))
    assert ct.stage() is Stage.STOPPED
