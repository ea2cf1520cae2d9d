"""vzlist's logic without root: field names, -o/-s parsing, the table, sorting, -j's keys and types.

Rows are fake CtInfo objects (pure formatting), except the tests at the end, which run `vzlist_main` on an
isolated vz.conf whose CTs do not run (or whose "init" is a sleep process: no cgroup, no namespace).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_vz_conf
from vzpy.cli import listing
from vzpy.cli.listing import CtInfo, ListingError, Request, Usage

LONG_MAX = 2**63 - 1
# vzlist 4.x's field names (vzlist -L), each of which `-o` must accept
VZLIST_FIELDS = [
    "ctid",
    "veid",
    "vpsid",
    "private",
    "root",
    "mount_opts",
    "origin_sample",
    "hostname",
    "name",
    "smart_name",
    "description",
    "ostemplate",
    "ip",
    "nameserver",
    "searchdomain",
    "status",
    "diskspace",
    "diskspace.s",
    "diskspace.h",
    "diskinodes",
    "diskinodes.s",
    "diskinodes.h",
    "laverage",
    "uptime",
    "cpulimit",
    "cpuunits",
    "cpus",
    "ioprio",
    "iolimit",
    "iopslimit",
    "onboot",
    "bootorder",
    "layout",
    "features",
    "vswap",
    "disabled",
    "vm_overcommit",
    "netfilter",
    "capability",
]
UBC_NAMES = [
    "kmemsize",
    "lockedpages",
    "privvmpages",
    "shmpages",
    "numproc",
    "physpages",
    "vmguarpages",
    "oomguarpages",
    "numtcpsock",
    "numflock",
    "numpty",
    "numsiginfo",
    "tcpsndbuf",
    "tcprcvbuf",
    "othersockbuf",
    "dgramrcvbuf",
    "numothersock",
    "dcachesize",
    "numfile",
    "numiptent",
    "swappages",
]
HEADER = "      CTID      NPROC STATUS    IP_ADDR         HOSTNAME"


def ct(ctid: str, status: str = "running", nproc: int = 3, **conf: str) -> CtInfo:
    ips = conf.pop("ips", "").split()
    return CtInfo(
        ctid=ctid,
        status=status,
        conf=conf,
        ips=ips,
        hostname=conf.get("HOSTNAME"),
        usage=Usage(numproc=nproc, memory=(100, 200, 0), uptime=90061.5) if status == "running" else Usage(),
    )


def request(output: str | None = None, **options: object) -> Request:
    return listing.build_request(output=output, sort=None, ids_only=False, names=False, as_json=False, **options)


# --- fields


def test_every_vzlist_field_name_is_accepted() -> None:
    names = VZLIST_FIELDS + [name + suffix for name in UBC_NAMES for suffix in ("", ".m", ".b", ".l", ".f")]
    fields = listing.parse_fields(",".join(names), as_json=False)
    assert [f.name for f in fields or []] == names
    assert {line.split()[0] for line in listing.field_names_listing()} == set(names)


def test_list_shows_name_and_header_per_line() -> None:
    lines = listing.field_names_listing()
    assert lines[0] == "ctid            CTID"
    assert "numproc.l       NPROC.L" in lines
    assert "diskspace.h     DSPACE.H" in lines


def test_unknown_field_is_vzlists_error_exit_1() -> None:
    with pytest.raises(ListingError) as e:
        listing.parse_fields("ctid,bogus", as_json=False)
    assert e.value.exit_code == 1
    assert e.value.message.startswith("Unknown field: bogus")


def test_suffixed_fields_are_refused_in_json() -> None:
    with pytest.raises(ListingError, match=re.escape("Field `numproc.l' is not available in JSON output")):
        listing.parse_fields("ctid,numproc.l", as_json=True)
    assert listing.parse_fields(None, as_json=True) is None  # every field


def test_sort_field_and_reverse() -> None:
    field, reverse = listing.parse_sort("-numproc")
    assert field is not None and field.name == "numproc" and reverse
    with pytest.raises(ListingError, match="Invalid sort field name: -bogus"):
        listing.parse_sort("-bogus")


@pytest.mark.parametrize("ctid", ["a/b", "..x/", ""])
def test_invalid_ctid_argument(ctid: str) -> None:
    with pytest.raises(ListingError, match=re.escape(f"CT ID {ctid} is invalid.")):
        request(ctids=(ctid,))


# --- the table


def test_default_table_is_vzlists() -> None:
    rows = [ct("101", HOSTNAME="web", ips="10.0.0.1 10.0.0.2"), ct("102", "stopped", HOSTNAME="db")]
    assert listing.table(rows, request()) == [
        HEADER,
        "       101          3 running   10.0.0.1        web",
        "       102          - stopped   -               db",
    ]


def test_one_ctid_per_line_with_dash_1() -> None:
    req = listing.build_request(output=None, sort=None, ids_only=True, names=False, as_json=False)
    assert listing.table([ct("101"), ct("1000")], req) == ["       101", "      1000"]


def test_no_header() -> None:
    assert listing.table([ct("7")], request("ctid", header=False)) == ["         7"]


def test_long_values_are_cut_unless_last_or_no_trim() -> None:
    long_name = "h" * 40
    row = ct("101", HOSTNAME=long_name, ips="10.0.0.1 10.0.0.2")
    assert listing.table([row], request("hostname,ctid", header=False)) == [f"{'h' * 32}        101"]
    assert listing.table([row], request("ctid,hostname", header=False)) == [f"       101 {long_name}"]
    assert listing.table([row], request("hostname,ctid", header=False, trim=False)) == [f"{long_name}        101"]
    # the ip column shows its first address unless it is the last column
    assert listing.table([row], request("ip,ctid", header=False)) == ["10.0.0.1               101"]
    assert listing.table([row], request("ctid,ip", header=False)) == ["       101 10.0.0.1 10.0.0.2"]


def test_beancounter_columns_and_suffixes() -> None:
    row = ct("101", PHYSPAGES="1000:2G", NUMPROC="unlimited")
    out = listing.table([row], request("physpages,physpages.m,physpages.b,physpages.l,physpages.f,numproc.l"))
    assert out == [
        "     PHYSP    PHYSP.M    PHYSP.B    PHYSP.L    PHYSP.F    NPROC.L",
        f"       100        200       1000 {2 * 2**30 // os.sysconf('SC_PAGE_SIZE'):>10}          0 {LONG_MAX}",
    ]


def test_config_fields_and_what_vzpy_cannot_know() -> None:
    row = ct("101", ONBOOT="yes", CPUUNITS="1000", CPULIMIT="25%", DESCRIPTION="a\x1b[31mb")
    out = listing.table([row], request("onboot,cpuunits,cpulimit,laverage,diskspace,layout,uptime,description"))
    assert out[1] == "   yes    1000      25              -          - simfs  001d01h:01m:01s a?[31mb"


def test_uptime_of_a_stopped_ct_is_a_dash() -> None:
    assert listing.table([ct("101", "stopped")], request("uptime", header=False)) == ["              -"]


# --- selecting and sorting


def test_running_only_by_default_all_with_a_not_running_with_s() -> None:
    rows = [ct("1"), ct("2", "stopped"), ct("3", "suspended"), ct("4", "mounted")]
    assert [c.ctid for c in listing.visible(rows, request())] == ["1"]
    assert [c.ctid for c in listing.visible(rows, request(show_all=True))] == ["1", "2", "3", "4"]
    assert [c.ctid for c in listing.visible(rows, request(only_stopped=True))] == ["2", "3", "4"]
    assert [c.ctid for c in listing.visible(rows, request(ctids=("2",)))] == ["1", "2", "3", "4"]


def test_patterns_filter_hostname_name_and_description() -> None:
    rows = [ct("1", HOSTNAME="web1", NAME="alpha"), ct("2", HOSTNAME="db1", DESCRIPTION="main db")]
    assert [c.ctid for c in listing.visible(rows, request(hostname="web*"))] == ["1"]
    assert [c.ctid for c in listing.visible(rows, request(name="al?ha"))] == ["1"]
    assert [c.ctid for c in listing.visible(rows, request(description="*db"))] == ["2"]
    assert listing.visible(rows, request(description="x*")) == []


def test_sort_numerically_by_ctid_and_by_a_field_reversed() -> None:
    rows = [ct("10", nproc=5), ct("9", nproc=5), ct("100", nproc=1), ct("2", "stopped")]
    by_id = listing.sort_cts(rows, None, reverse=False)
    assert [c.ctid for c in by_id] == ["2", "9", "10", "100"]
    numproc = listing.FIELDS_BY_NAME["numproc"]
    # a CT without the value (stopped: no processes counted) sorts first; reversed as a whole, as vzlist does
    assert [c.ctid for c in listing.sort_cts(rows, numproc, reverse=False)] == ["2", "100", "9", "10"]
    assert [c.ctid for c in listing.sort_cts(rows, numproc, reverse=True)] == ["10", "9", "100", "2"]


def test_sort_by_status_in_vzlists_order_then_ctid() -> None:
    rows = [ct("1", "suspended"), ct("2", "stopped"), ct("3", "mounted"), ct("4"), ct("5", "stopped")]
    status = listing.FIELDS_BY_NAME["status"]
    assert [c.ctid for c in listing.sort_cts(rows, status, reverse=False)] == ["4", "2", "5", "3", "1"]


def test_sort_by_hostname_puts_missing_first() -> None:
    rows = [ct("1", HOSTNAME="b"), ct("2"), ct("3", HOSTNAME="a")]
    hostname = listing.FIELDS_BY_NAME["hostname"]
    assert [c.ctid for c in listing.sort_cts(rows, hostname, reverse=False)] == ["2", "3", "1"]


# --- JSON


def test_json_keys_and_types() -> None:
    row = ct("101", HOSTNAME="web", ips="10.0.0.1 10.0.0.2", ONBOOT="no", PHYSPAGES="262144", CPUS="2")
    (obj,) = listing.json_rows([row], None)
    assert list(obj)[:3] == ["ctid", "veid", "vpsid"]
    assert {name for name in obj} == {f.name for f in listing.FIELDS if not f.index}
    assert obj["ctid"] == 101 and obj["smart_name"] == 101
    assert obj["ip"] == ["10.0.0.1", "10.0.0.2"] and obj["nameserver"] == []
    assert obj["status"] == "running" and obj["hostname"] == "web" and obj["name"] is None
    assert obj["numproc"] == {"held": 3, "maxheld": None, "barrier": LONG_MAX, "limit": LONG_MAX, "failcnt": None}
    assert obj["physpages"] == {"held": 100, "maxheld": 200, "barrier": 262144, "limit": 262144, "failcnt": 0}
    assert obj["onboot"] is False and obj["disabled"] is False and obj["vswap"] is True
    assert obj["cpus"] == 2 and obj["cpuunits"] is None and obj["iolimit"] == 0
    assert obj["uptime"] == 90061.5 and obj["laverage"] is None and obj["diskspace"] is None


def test_json_of_a_stopped_ct_counts_nothing_held() -> None:
    (obj,) = listing.json_rows([ct("7", "stopped", NUMPROC="100:200")], listing.parse_fields("numproc", as_json=True))
    assert obj == {"numproc": {"held": 0, "maxheld": 0, "barrier": 100, "limit": 200, "failcnt": 0}}


def test_json_of_a_named_ct_and_a_broken_one() -> None:
    broken = CtInfo(ctid="web", status="stopped", broken=True)
    fields = listing.parse_fields("ctid,hostname,physpages,onboot,ip", as_json=True)
    assert listing.json_rows([broken], fields) == [
        {"ctid": "web", "hostname": None, "physpages": None, "onboot": None, "ip": []}
    ]


def test_json_layout_is_vzlists() -> None:
    fields = listing.parse_fields("ctid,ip,numproc", as_json=True)
    text = listing.json_text(listing.json_rows([ct("1", ips="10.0.0.1"), ct("2", "stopped")], fields))
    assert text.startswith('[\n  {\n    "ctid": 1,\n    "ip": ["10.0.0.1"],\n    "numproc": {\n      "held": 3,\n')
    assert '      "failcnt": null\n    }\n  },\n  {\n    "ctid": 2,\n    "ip": [],\n' in text
    assert text.endswith("    }\n  }\n]\n")
    assert [row["ctid"] for row in json.loads(text)] == [1, 2]
    assert listing.json_text([]) == "[]\n"


# --- vzlist_main on an isolated vz.conf (no CT runs)


@pytest.fixture
def vzroot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    conf = write_vz_conf(tmp_path / "vz.conf", tmp_path, CGROUP_PARENT="vzpy-unit-vzlist-absent")
    for name in ("conf", "lock", "dump"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("VZPY_CONF", str(conf))
    return tmp_path


def add_ct(base: Path, ctid: str, text: str = "", private: bool = True) -> None:
    (base / "conf" / f"{ctid}.conf").write_text(text or f'HOSTNAME="ct{ctid}"\nIP_ADDRESS="10.0.0.{ctid[-1]}"\n')
    if private:
        (base / "private" / ctid).mkdir(parents=True)


@pytest.fixture
def fake_init() -> Iterator[int]:
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            yield sleeper.pid
        finally:
            sleeper.kill()


def persist_stage(base: Path, ctid: str, stage: str, pid: int) -> None:
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    state = {"stage": stage, "init_pid": pid, "init_start_ticks": ticks, "veth": f"veth{ctid}.0"}
    (base / "lock" / f"{ctid}.state.json").write_text(json.dumps(state))


def vzlist(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = listing.vzlist_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_vzlist_main_lists_statuses_and_survives_a_broken_config(
    vzroot: Path, capsys: pytest.CaptureFixture[str], fake_init: int
) -> None:
    add_ct(vzroot, "101")
    persist_stage(vzroot, "101", "running", fake_init)
    add_ct(vzroot, "102")
    add_ct(vzroot, "103")
    dump = vzroot / "dump" / "Dump.103"
    dump.write_bytes(b"a dump waits")  # as `chkpnt` leaves a stopped CT: its dump file recorded
    (vzroot / "lock" / "103.state.json").write_text(json.dumps({"stage": "stopped", "dumpfile": str(dump)}))
    add_ct(vzroot, "104")
    (vzroot / "conf" / "104.conf").write_bytes(b"\xff\xfe not text")
    code, out, err = vzlist(capsys, "-a", "-o", "ctid,status,hostname")
    assert code == 0
    assert out.splitlines() == [
        "      CTID STATUS    HOSTNAME",
        "       101 running   ct101",
        "       102 stopped   ct102",
        "       103 suspended ct103",
        "       104 stopped   -",
    ]
    assert err.count("CT 104: cannot read ") == 1 and "listed without its configuration" in err

    assert vzlist(capsys, "-1") == (0, "       101\n", "")
    assert vzlist(capsys, "-S", "-H", "-o", "ctid", "-s", "-ctid")[:2] == (0, "       104\n       103\n       102\n")


def test_vzlist_main_frozen_ct_is_suspended(vzroot: Path, capsys: pytest.CaptureFixture[str], fake_init: int) -> None:
    add_ct(vzroot, "101")
    persist_stage(vzroot, "101", "dumped", fake_init)
    assert vzlist(capsys, "-H", "-o", "status", "101") == (0, "suspended\n", "")
    assert vzlist(capsys, "-H")[:2] == (0, "")  # not running: not in the default list


def test_vzlist_main_errors_exit_1(vzroot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_ct(vzroot, "101")
    code, out, err = vzlist(capsys, "-o", "ctid,nope")
    assert (code, out) == (1, "") and err.startswith("Unknown field: nope")
    code, out, err = vzlist(capsys, "-s", "nope")
    assert (code, out) == (1, "") and err.startswith("Invalid sort field name: nope")
    assert vzlist(capsys, "-j", "-o", "numproc.b")[0] == 1
    assert vzlist(capsys, "--no-such-option")[0] == 1
    assert vzlist(capsys, "a/b") == (1, "", "CT ID a/b is invalid.\n")
    # a CTID named but absent: not found, exit 1; without CTIDs none running is no error
    assert vzlist(capsys, "999") == (1, "", "Container(s) not found\n")
    assert vzlist(capsys) == (0, "", "Container(s) not found\n")
    assert vzlist(capsys, "-j") == (0, "[]\n", "")


def test_vzlist_main_finds_a_ct_by_name_and_lists_fields(vzroot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_ct(vzroot, "101", 'NAME="web"\n')
    add_ct(vzroot, "102")
    assert vzlist(capsys, "-1", "web") == (0, "       101\n", "")
    code, out, _ = vzlist(capsys, "-L")
    assert code == 0 and out.splitlines()[0] == "ctid            CTID"


def test_vzlist_main_j_has_vzlists_types(vzroot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_ct(vzroot, "101", 'IP_ADDRESS="10.0.0.1"\nONBOOT="yes"\nPHYSPAGES="0:262144"\nCPUUNITS="1000"\n')
    code, out, _ = vzlist(capsys, "-j", "-a")
    (obj,) = json.loads(out)
    assert code == 0
    assert obj["ctid"] == 101 and obj["ip"] == ["10.0.0.1"] and obj["onboot"] is True and obj["cpuunits"] == 1000
    assert obj["status"] == "stopped" and obj["physpages"]["limit"] == 262144 and obj["physpages"]["held"] == 0
    assert obj["private"] == str(vzroot / "private" / "101")
