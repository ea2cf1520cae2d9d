"""Gaps an audit of the "Trust" issue found: a dump file the CT can reach, a CRIU deadline that is no
deadline, and a migrated CT's source area deleted through a mount. Real CTs through the real `vzpy`
command line (and, for the source cleanup of a migration, vzpy's own function on a real CT)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers import VZPY, VzRoot
from vzpy.config import GlobalConfig
from vzpy.container import Container
from vzpy.migrate.flow import finish_source

pytestmark = pytest.mark.root


def status(vz: VzRoot, ctid: str) -> str:
    return vz.run("status", ctid, check=True).stdout.strip()


# --- a dump file inside the CT's own tree is written through, and read back from, what the CT controls


def test_a_dump_file_inside_the_cts_areas_is_refused_before_the_ct_is_suspended(
    running_ct: tuple[VzRoot, str, str], tmp_path: Path
) -> None:
    vz, ctid, _ = running_ct
    link = tmp_path / "link-into-ct"
    link.symlink_to(vz.private(ctid) / "tmp")
    inside = [vz.private(ctid) / "Dump", vz.base / "root" / ctid / "tmp" / "Dump", link / "Dump"]
    for target in inside:
        result = vz.run("chkpnt", ctid, "--dumpfile", str(target))
        assert result.returncode == 16, result.stderr
        assert f"inside CT {ctid}'s area" in result.stderr and len(result.stderr.splitlines()) == 1
        assert "suspended" not in result.stdout
        assert status(vz, ctid).endswith("running")
        assert not target.exists()
    vz.run("create", "102", "--ostemplate", "minimal", check=True)  # another CT's area is no better
    result = vz.run("chkpnt", ctid, "--dumpfile", str(vz.private("102") / "Dump"))
    assert result.returncode == 16 and "inside CT 102's area" in result.stderr, result.stderr
    assert status(vz, ctid).endswith("running")


def test_a_dump_file_inside_the_cts_area_is_not_restored(running_ct: tuple[VzRoot, str, str]) -> None:
    vz, ctid, _ = running_ct
    dumpfile = vz.base / "dump" / f"Dump.{ctid}"
    vz.run("chkpnt", ctid, check=True)
    planted = vz.private(ctid) / "Dump"
    planted.write_bytes(dumpfile.read_bytes())  # where the CT could have replaced it
    result = vz.run("restore", ctid, "--dumpfile", str(planted), "--skip-fs-check")
    assert result.returncode == 17, result.stderr
    assert f"inside CT {ctid}'s area" in result.stderr
    assert status(vz, ctid).endswith("down suspended")  # its own dump still waits


# --- every CRIU run has a deadline: CRIU_TIMEOUT must be a finite number of seconds


@pytest.mark.parametrize("value", ["nan", "1e400", "inf", "0"])
def test_a_bad_criu_timeout_is_refused_before_the_ct_is_suspended(
    running_ct: tuple[VzRoot, str, str], value: str
) -> None:
    vz, ctid, _ = running_ct
    with open(vz.conf, "a") as conf:
        conf.write(f'CRIU_TIMEOUT="{value}"\n')
    line = len(vz.conf.read_text().splitlines())
    result = vz.run("chkpnt", ctid)
    assert result.returncode == 85, result.stderr
    assert result.stderr.startswith(f"vzpy: error: {vz.conf}:{line}: invalid CRIU_TIMEOUT value '{value}'")
    assert "suspended" not in result.stdout
    assert status(vz, ctid).endswith("running")


# --- the source of a finished migration: its private area is removed, never what is mounted in it


def test_the_migrated_source_is_not_deleted_through_a_mount_in_its_area(vzroot: VzRoot, tmp_path: Path) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "victim").write_text("host data\n")
    mountpoint = vzroot.private("101") / "mnt" / "bound"
    mountpoint.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(host_dir), str(mountpoint)], check=True)
    try:
        ct = Container("101", GlobalConfig.load(vzroot.conf))
        problems = finish_source(ct, remove_area=True)
        assert any(f"{mountpoint} is mounted inside CT 101's areas" in problem for problem in problems), problems
        assert (host_dir / "victim").read_text() == "host data\n"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
    assert os.listdir(host_dir) == ["victim"]


# --- no place for CRIU's logs: a one-line error before anything changes, never an internal error


def test_a_file_in_the_way_of_the_log_dir_is_refused_before_the_ct_is_suspended(
    running_ct: tuple[VzRoot, str, str],
) -> None:
    vz, ctid, _ = running_ct
    vz.run("chkpnt", ctid, check=True)
    logs = vz.base / "dump" / ".logs"
    subprocess.run(["rm", "-rf", str(logs)], check=True)
    logs.write_text("in the way\n")
    restored = vz.run("restore", ctid)
    assert restored.returncode != 0 and "internal error" not in restored.stderr, restored.stderr
    assert restored.stderr == f"vzpy: error: cannot make directory {logs}: File exists; " + (
        "remove what is in the way or change DUMPDIR in vz.conf\n"
    )
    assert status(vz, ctid).endswith("down suspended")
    vz.run("start", ctid, check=True)
    dumped = vz.run("chkpnt", ctid)
    assert dumped.returncode != 0 and "internal error" not in dumped.stderr, dumped.stderr
    assert "suspended" not in dumped.stdout
    assert status(vz, ctid).endswith("running")


# --- a memory limit no CT can start in is a validation error, not "the starter process exited without a word"


def test_a_memory_limit_too_small_to_start_in_is_refused_with_its_line(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = vzroot.base / "etc" / "conf" / "101.conf"
    with open(conf, "a") as f:
        f.write('PHYSPAGES="0:1"\n')
    line = len(conf.read_text().splitlines())
    started = vzroot.run("start", "101")
    assert started.returncode == 85, started.stderr
    assert started.stderr.startswith(f"vzpy: error: {conf}:{line}: invalid PHYSPAGES value '0:1': a limit below 4M")
    assert status(vzroot, "101").endswith("down")
    refused = vzroot.run("set", "101", "--memory", "1", "--save")
    assert refused.returncode == 21 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "invalid memory '1'" in refused.stderr


# --- a CT's cgroups are removed with any child cgroups in them (e.g. the ones CRIU recreates for tasks dumped
# outside the CT's cgroup, as a CT started by an older vzpy without the devices controller)


def test_a_ct_with_a_child_cgroup_stops_and_leaves_no_cgroup(running_ct: tuple[VzRoot, str, str]) -> None:
    vz, ctid, _ = running_ct
    child = Path(f"/sys/fs/cgroup/pids/{vz.cgroup_parent}/{ctid}/sub")
    child.mkdir()
    (child / "cgroup.procs").write_text(str(vz.state(ctid)["init_pid"]))
    stopped = vz.run("stop", "--fast", ctid)
    assert stopped.returncode == 0, stopped.stderr
    assert not child.parent.exists()


# --- a process name the CT chose never reaches the operator's terminal as escape sequences


def test_dumpinfo_on_a_terminal_shows_no_escape_sequence_from_a_ct_process_name(
    running_ct: tuple[VzRoot, str, str],
) -> None:
    vz, ctid, _ = running_ct
    rename = 'printf "\\033[41mEVIL" > /proc/$$/comm; sleep 600; true'
    vz.run("exec", ctid, "sh", "-c", f"sh -c '{rename}' </dev/null >/dev/null 2>&1 &", check=True)
    vz.run("chkpnt", ctid, "--snapshot", check=True)
    dumpfile = vz.base / "dump" / f"Dump.{ctid}"
    command = shlex.join([VZPY, "dumpinfo", str(dumpfile)])
    on_tty = subprocess.run(["script", "-qc", command, "/dev/null"], env=vz.env, capture_output=True, timeout=60)
    assert on_tty.returncode == 0 and b"EVIL" in on_tty.stdout, on_tty.stdout
    assert b"\x1b" not in on_tty.stdout


def test_a_file_name_the_ct_chose_reaches_the_error_without_control_characters(
    running_ct: tuple[VzRoot, str, str],
) -> None:
    vz, ctid, _ = running_ct
    vz.run("chkpnt", ctid, check=True)
    (vz.private(ctid) / "\x1b[41mX\nY").write_text("added after the checkpoint\n")
    refused = vz.run("restore", ctid)
    assert refused.returncode == 17, refused.stderr
    first = refused.stderr.splitlines()[0]
    assert "/?[41mX?Y added" in first, refused.stderr
    assert "\x1b" not in refused.stderr


def test_a_bad_ip_address_in_the_ct_config_is_refused_with_its_line(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = vzroot.base / "etc" / "conf" / "101.conf"
    with open(conf, "a") as f:
        f.write('IP_ADDRESS="1.2.3"\n')
    line = len(conf.read_text().splitlines())
    started = vzroot.run("start", "101")
    assert started.returncode == 85, started.stderr
    assert started.stderr.startswith(f"vzpy: error: {conf}:{line}: invalid IP address '1.2.3'"), started.stderr
