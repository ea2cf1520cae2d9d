"""The boot service without a reboot: the commands of packaging/vzpy.service (ExecStop, then ExecStart, parsed
from the unit file) run against an isolated root with real CTs and real CRIU.

A running CT holding state (the fidelity workload and an established TCP connection from the host) is
checkpointed at "shutdown" and comes back at "boot" with the same processes and the same connection; a CT
with ONBOOT=yes is started, one with ONBOOT=no is not; each step is in the operation log.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import VzRoot
from vzpy_lab.workload.build import build_fidelity
from vzpy_lab.workload.client import ITEMS, EchoStream, FidelityClient, failures

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "vzpy.service"
PORT = 7000
CAP_SYS_RESOURCE = 24


def unit_command(key: str) -> list[str]:
    """ExecStart/ExecStop of the unit as argv: systemd's prefixes ("-" ignore failure, "@", "+", "!", ":")
    are not part of the command."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in units
    parser.read_string(UNIT.read_text())
    return shlex.split(parser["Service"][key].lstrip("-@+!:"))


def run_unit(vz: VzRoot, key: str) -> subprocess.CompletedProcess[str]:
    env = {**vz.env, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(unit_command(key), env=env, capture_output=True, text=True, timeout=600)


def status(vz: VzRoot, ctid: str) -> str:
    return json.loads(vz.run("status", "--json", ctid, check=True).stdout)["status"]


def set_key(vz: VzRoot, ctid: str, line: str) -> None:
    conf = vz.base / "etc" / "conf" / f"{ctid}.conf"
    conf.write_text(conf.read_text() + line + "\n")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def root_has_cap_sys_resource() -> bool:
    text = Path("/proc/self/status").read_text()
    return bool(int(text.split("CapEff:")[1].split()[0], 16) & (1 << CAP_SYS_RESOURCE))


def test_unit_runs_vzpy_boot_and_keeps_the_ct_on_failures() -> None:
    assert unit_command("ExecStart")[1:] == ["boot", "start"]
    assert unit_command("ExecStop")[1:] == ["boot", "stop"]
    text = UNIT.read_text()
    assert "ExecStart=-" in text and "KillMode=process" in text and "WantedBy=multi-user.target" in text


def test_shutdown_checkpoints_and_boot_restores_processes_and_connections(
    vzroot: VzRoot, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    vz = vzroot
    log = tmp_path / "ops.log"
    with vz.conf.open("a") as f:
        f.write(f'LOGFILE="{log}"\n')
    binary = build_fidelity(tmp_path_factory.getbasetemp() / "workload")
    ip = vz.new_ip()
    vz.run("create", "101", "--ostemplate", "minimal", "--ipadd", ip, check=True)
    shutil.copy(binary, vz.private("101") / "usr" / "bin" / "fidelity")
    flags = "" if root_has_cap_sys_resource() else "-r "
    vz.add_service("101", "fidelity", f"exec /usr/bin/fidelity {flags}{PORT}")
    vz.run("create", "102", "--ostemplate", "minimal", check=True)
    vz.run("create", "103", "--ostemplate", "minimal", check=True)
    set_key(vz, "102", 'ONBOOT="yes"')
    set_key(vz, "103", 'ONBOOT="no"')
    vz.run("start", "101", check=True)
    client = FidelityClient(ip, PORT)
    client.wait_ready(timeout=20)
    echo = EchoStream(ip, PORT + 1)
    try:
        echo.exchange(64 * 1024)
        init_pid = vz.state("101")["init_pid"]

        stopped = run_unit(vz, "ExecStop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert status(vz, "101") != "running"
        assert not alive(init_pid), "the CT's init survived the shutdown"
        dump = vz.base / "dump" / "Dump.101"
        assert dump.is_file()
        assert json.loads((vz.base / "lock" / "101.boot-dump").read_text())["dumpfile"] == str(dump)

        started = run_unit(vz, "ExecStart")
        assert started.returncode == 0, started.stdout + started.stderr
        assert status(vz, "101") == "running"
        echo.exchange(256 * 1024)  # the same TCP connection, every byte in order
        result = client.verify()
        assert set(result) == set(ITEMS) and failures(result) == {}, failures(result)
        assert status(vz, "102") == "running"
        assert status(vz, "103") == "stopped"
        assert not dump.exists() and not (vz.base / "lock" / "101.boot-dump").exists()
    finally:
        echo.close()
    lines = log.read_text().splitlines()
    for expected in ("CT 101: chkpnt: exit 0", "CT 101: restore: exit 0", "CT 102: start: exit 0"):
        assert any(expected in line for line in lines), (expected, lines)
    assert not any("CT 103: start" in line or "CT 103: restore" in line for line in lines)


def test_stop_mode_stops_and_a_failing_ct_does_not_stop_the_others(vzroot: VzRoot) -> None:
    vz = vzroot
    with vz.conf.open("a") as f:
        f.write('VE_STOP_MODE="stop"\n')
    for ctid in ("101", "102"):
        vz.run("create", ctid, "--ostemplate", "minimal", check=True)
        set_key(vz, ctid, 'ONBOOT="yes"')
    set_key(vz, "101", 'BOOTORDER="10"')
    # CT 101's private area is gone: its start fails, CT 102's must not suffer for it
    shutil.rmtree(vz.private("101"))
    started = run_unit(vz, "ExecStart")
    assert started.returncode != 0
    assert "101 (start: exit 43)" in started.stderr
    assert status(vz, "102") == "running"

    stopped = run_unit(vz, "ExecStop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert status(vz, "102") == "stopped"
    assert not (vz.base / "dump" / "Dump.102").exists() and not (vz.base / "lock" / "102.boot-dump").exists()
    assert os.path.exists(vz.base / "etc" / "conf" / "102.conf")
