"""Start-up cost of light commands: importing the CLI, and running `status`/`list`, loads no heavy library.

pyroute2, psutil, paramiko, pycriu (protobuf) and zstandard cost up to ~0.3 s of imports together; only the
commands that do network, process, migration, CRIU or compression work may load them. Each check runs in a
fresh interpreter (this one has imported everything already) with this checkout's src/ first on PYTHONPATH.
No timing here: the figures are measured by bench/startup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_vz_conf

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("pyroute2", "psutil", "paramiko", "pycriu", "google", "zstandard")

# prints, after running the given vzpy command lines in-process, the heavy modules they loaded
PROBE = """
import json, sys
from vzpy.cli import cli
for argv in json.loads(sys.argv[1]):
    cli.main(argv, prog_name="vzpy", standalone_mode=False)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print("HEAVY=" + json.dumps(heavy))
"""


def loaded_heavy_modules(env: dict[str, str], *argvs: list[str]) -> tuple[list[str], str]:
    """The heavy top-level packages loaded by importing vzpy.cli and running `argvs`, and the commands' output."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)],
        env={**env, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    output, _, heavy = result.stdout.rpartition("HEAVY=")
    return json.loads(heavy), output


@pytest.fixture
def vz_env(tmp_path: Path) -> dict[str, str]:
    """An isolated vz.conf whose paths all lie in tmp_path (no CT yet)."""
    conf = write_vz_conf(tmp_path / "vz.conf", tmp_path, CGROUP_PARENT="vzpy-startup-test-absent")
    for name in ("conf", "lock"):
        (tmp_path / name).mkdir()
    return {**os.environ, "VZPY_CONF": str(conf)}


@pytest.fixture
def live_process() -> Iterator[int]:
    """A process that stands in for a running CT's init."""
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            yield sleeper.pid
        finally:
            sleeper.kill()


def add_ct(env: dict[str, str], ctid: str, *, init_pid: int = 0) -> None:
    """CTID.conf for a stopped CT, or with a state file saying it runs with `init_pid` as its init."""
    base = Path(env["VZPY_CONF"]).parent
    (base / "conf" / f"{ctid}.conf").write_text(f'HOSTNAME="ct{ctid}"\nIP_ADDRESS="10.0.0.{ctid[-1]}"\n')
    if init_pid:
        ticks = int(Path(f"/proc/{init_pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        state = {"stage": "running", "init_pid": init_pid, "init_start_ticks": ticks, "veth": f"veth{ctid}.0"}
        (base / "lock" / f"{ctid}.state.json").write_text(json.dumps(state))


def test_importing_the_cli_loads_no_heavy_library(vz_env: dict[str, str]) -> None:
    heavy, _ = loaded_heavy_modules(vz_env)
    assert heavy == []


def test_status_and_list_load_no_heavy_library(vz_env: dict[str, str], live_process: int) -> None:
    add_ct(vz_env, "101", init_pid=live_process)
    add_ct(vz_env, "102")
    heavy, output = loaded_heavy_modules(
        vz_env, ["status", "101"], ["status", "102"], ["status", "103"], ["list", "-a"], ["list", "--json"]
    )
    # the commands really looked at a running, a stopped and a missing CT
    assert "CTID 101 exist unmounted running" in output
    assert "CTID 102 exist unmounted down" in output
    assert "CTID 103 deleted unmounted down" in output
    assert "10.0.0.1" in output and "stopped" in output
    assert heavy == []
