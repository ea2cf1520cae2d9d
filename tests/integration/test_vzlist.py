"""`vzlist` as operators' scripts call it: the installed vzpy under the name vzlist (argv[0]), real CTs.

A running CT, a stopped one, one whose dump waits (staged `chkpnt --suspend` + `--dump`, then `--kill`), and
one whose CTID.conf is not even text: the others list normally, exit codes are vzlist's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VZPY, VzRoot

pytestmark = pytest.mark.root

HEADER = "      CTID      NPROC STATUS    IP_ADDR         HOSTNAME"


class Vzlist:
    """The installed vzpy entry point, run through a symlink named vzlist."""

    def __init__(self, vz: VzRoot, bindir: Path) -> None:
        bindir.mkdir()
        self.path = bindir / "vzlist"
        self.path.symlink_to(VZPY)
        self.vz = vz

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.path), *args], env=self.vz.env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def hosts_cts(vzroot: VzRoot, tmp_path: Path) -> Iterator[tuple[Vzlist, dict[str, str]]]:
    ips = {ctid: vzroot.new_ip() for ctid in ("101", "102", "103")}
    for ctid, ip in ips.items():
        vzroot.run("create", ctid, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", f"ct{ctid}.test", check=True)
    vzroot.add_service("101", "sleeper", "exec sleep 1000")
    for ctid in ("101", "103"):
        vzroot.run("start", ctid, check=True)
    vzroot.run("chkpnt", "103", "--suspend", check=True)
    vzroot.run("chkpnt", "103", "--dump", check=True)
    broken = vzroot.conf.parent / "conf" / "104.conf"
    broken.write_bytes(b"\xff\xfe\x00 a config overwritten with binary garbage")
    yield Vzlist(vzroot, tmp_path / "bin"), ips


def test_vzlist_lists_and_exits_as_vzlist(hosts_cts: tuple[Vzlist, dict[str, str]]) -> None:
    vzlist, ips = hosts_cts
    vz = vzlist.vz

    result = vzlist()  # running CTs only
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == HEADER
    assert [line.split()[0::2] for line in lines[1:]] == [["101", "running", "ct101.test"]]
    assert lines[1].split()[3] == ips["101"]
    assert int(lines[1].split()[1]) >= 2  # init and the sleeper

    result = vzlist("-a")
    assert result.returncode == 0
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[2]) for row in rows] == [
        ("101", "running"),
        ("102", "stopped"),
        ("103", "suspended"),  # frozen, its dump written: not running
        ("104", "stopped"),  # no processes; its config unreadable
    ]
    assert rows[3] == ["104", "-", "stopped", "-", "-"]
    assert "CT 104: cannot read " in result.stderr and result.stderr.count("warning") == 1

    assert vzlist("-H", "-o", "ctid").stdout.split() == ["101"]
    assert vzlist("-a", "-H", "-o", "ctid").stdout.split() == ["101", "102", "103", "104"]
    assert vzlist("-1", "-S").stdout.split() == ["102", "103", "104"]
    assert vzlist("-a", "-H", "-o", "ctid", "-s", "-numproc").stdout.split()[0] == "101"
    assert vzlist("-a", "-H", "-o", "ctid,status", "-s", "status").stdout.split()[0::2] == ["101", "102", "104", "103"]

    rows = json.loads(vzlist("-j", "-a").stdout)
    by_id = {row["ctid"]: row for row in rows}
    assert sorted(by_id) == [101, 102, 103, 104]
    assert by_id[101]["ip"] == [ips["101"]] and by_id[101]["hostname"] == "ct101.test"
    assert by_id[101]["numproc"]["held"] >= 2 and by_id[101]["physpages"]["held"] > 0
    assert by_id[101]["uptime"] > 0 and by_id[102]["uptime"] == 0
    assert by_id[102]["numproc"]["held"] == 0 and by_id[102]["status"] == "stopped"
    assert by_id[104]["hostname"] is None and by_id[104]["ip"] == []
    same = ("-a", "-o", "ctid,status,ip,hostname,onboot,private,cpuunits")
    assert json.loads(vz.run("list", "--json", *same).stdout) == json.loads(vzlist("-j", *same).stdout)

    fields = vzlist("-L")
    assert fields.returncode == 0 and "numproc.b       NPROC.B" in fields.stdout.splitlines()

    # the dump is all that is left of 103 once its processes are killed: still suspended, as vzctl shows it
    vz.run("chkpnt", "103", "--kill", check=True)
    assert vzlist("-H", "-o", "status", "103").stdout == "suspended\n"

    # vzlist's exit codes: 1 for a bad field, sort field or CTID, or none of the CTs asked for
    assert (vzlist("-o", "ctid,bogus").returncode, vzlist("-s", "bogus").returncode) == (1, 1)
    assert vzlist("-j", "-o", "numproc.l").returncode == 1
    assert vzlist("--bogus").returncode == 1
    missing = vzlist("999")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "Container(s) not found\n")
    assert vzlist("101", "999").returncode == 0
