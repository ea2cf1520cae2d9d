"""OpenVZ hosts' configs through the real `vzpy` command line: stock-style vz.conf files (tests/data), a vzctl
CTID.conf's keys reaching the cgroups and the CT's resolv.conf, `set` changing only what it is asked, DISABLED,
`set --ipdel` removing the host's route, and templates in OpenVZ's `$TEMPLATE/cache/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root

DATA = Path(__file__).parent.parent / "data"
PAGE = os.sysconf("SC_PAGE_SIZE")
CGROUPS = Path("/sys/fs/cgroup")


def use_vz_conf(vz: VzRoot, name: str) -> None:
    """tests/data/NAME as the root's vz.conf, plus the keys that keep it isolated (vzctl has no CONFDIR key)."""
    text = (DATA / name).read_text().replace("@BASE@", str(vz.base))
    isolation = f'CONFDIR="{vz.base}/etc/conf"\nCGROUP_PARENT="{vz.cgroup_parent}"\nVETH_PREFIX="{vz.veth_prefix}"\n'
    vz.conf.write_text(text + isolation)


def cgroup(vz: VzRoot, ctid: str, controller: str, name: str) -> str:
    return (CGROUPS / controller / vz.cgroup_parent / ctid / name).read_text().strip()


def ct_conf(vz: VzRoot, ctid: str) -> Path:
    return vz.base / "etc" / "conf" / f"{ctid}.conf"


def host_route(ip: str) -> str:
    return subprocess.run(["ip", "route", "show", f"{ip}/32"], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("name", ["legacy-vz.conf", "openvz7-vz.conf"])
def test_a_stock_style_vz_conf_runs_a_ct(vzroot: VzRoot, name: str) -> None:
    use_vz_conf(vzroot, name)
    created = vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    assert "warning" not in created.stderr  # every stock key is known, the inline comment is not a value
    vzroot.run("start", "101", check=True)
    assert vzroot.run("status", "101").stdout == "CTID 101 exist mounted running\n"
    assert (vzroot.base / "private" / "101" / "sbin").is_dir()  # VE_PRIVATE=.../private/$VEID, unquoted
    assert vzroot.run("stop", "101").returncode == 0


def test_a_bad_line_is_skipped_with_a_warning_not_fatal(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = ct_conf(vzroot, "101")
    conf.write_text(conf.read_text() + "this is no KEY=value line\nFUTURE_KEY=1\n")
    started = vzroot.run("start", "101")
    assert started.returncode == 0, started.stderr
    assert f"vzpy: warning: {conf}:" in started.stderr and "unknown parameter FUTURE_KEY" in started.stderr


def test_an_openvz_ct_conf_reaches_the_cgroups_and_resolv_conf(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = ct_conf(vzroot, "101")
    conf.write_text(conf.read_text() + (DATA / "openvz-ct.conf").read_text())
    started = vzroot.run("start", "101")
    assert started.returncode == 0, started.stderr
    memory = 262144 * PAGE  # PHYSPAGES="0:262144": pages, 1 GiB
    assert int(cgroup(vzroot, "101", "memory", "memory.limit_in_bytes")) == memory == 1 << 30
    assert int(cgroup(vzroot, "101", "memory", "memory.memsw.limit_in_bytes")) == memory + 65536 * PAGE
    assert cgroup(vzroot, "101", "cpu", "cpu.shares") == "2000"
    assert cgroup(vzroot, "101", "cpu", "cpu.cfs_quota_us") == "50000"  # CPULIMIT=50: half of one CPU
    assert cgroup(vzroot, "101", "pids", "pids.max") == "240"
    resolv = vzroot.run("exec", "101", "cat", "/etc/resolv.conf", check=True).stdout
    assert resolv == "search corp.example\nnameserver 10.9.9.1\nnameserver 10.9.9.2\n"
    # this kernel has no project quota for the private area's fs: said, once, with the reason
    assert started.stderr.count("DISKSPACE/DISKINODES are not enforced") == 1


def test_set_changes_only_what_it_is_asked(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    vzroot.run("set", "101", "--memory", "1G", "--save", check=True)
    vzroot.run("start", "101", check=True)
    vzroot.run("set", "101", "--memory", "512M", check=True)  # live only, not saved
    vzroot.run("set", "101", "--numproc", "100", check=True)
    assert int(cgroup(vzroot, "101", "memory", "memory.limit_in_bytes")) == 512 << 20  # not reverted to 1G
    assert cgroup(vzroot, "101", "pids", "pids.max") == "100"
    vzroot.run("set", "101", "--cpuunits", "300", "--cpulimit", "25", "--swappages", "0:256M", check=True)
    assert cgroup(vzroot, "101", "cpu", "cpu.shares") == "300"
    assert cgroup(vzroot, "101", "cpu", "cpu.cfs_quota_us") == "25000"
    assert int(cgroup(vzroot, "101", "memory", "memory.memsw.limit_in_bytes")) == (512 << 20) + (256 << 20)
    assert int(cgroup(vzroot, "101", "memory", "memory.limit_in_bytes")) == 512 << 20
    text = ct_conf(vzroot, "101").read_text()
    assert 'PHYSPAGES="0:1G"' in text and "CPUUNITS" not in text and "SWAPPAGES" not in text
    vzroot.run("set", "101", "--physpages", "0:262144", "--cpuunits", "1000", "--save", check=True)
    assert int(cgroup(vzroot, "101", "memory", "memory.limit_in_bytes")) == 262144 * PAGE
    assert 'PHYSPAGES="0:262144"' in ct_conf(vzroot, "101").read_text()
    refused = vzroot.run("set", "101", "--cpuunits", "7")
    assert refused.returncode == 21 and "invalid CPUUNITS value '7'" in refused.stderr


def test_disabled_ct_does_not_start(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = ct_conf(vzroot, "101")
    conf.write_text(conf.read_text() + "DISABLED=yes\n")
    refused = vzroot.run("start", "101")
    assert refused.returncode == 105
    assert refused.stderr.startswith("vzpy: error: CT 101 is disabled (DISABLED=yes at ")
    assert vzroot.run("status", "101").stdout == "CTID 101 exist unmounted down\n"
    vzroot.run("set", "101", "--disabled", "no", "--save", check=True)
    vzroot.run("start", "101", check=True)
    vzroot.run("set", "101", "--disabled", "yes", "--save", check=True)
    assert 'DISABLED="yes"' in conf.read_text()


def test_ipdel_removes_the_hosts_route(vzroot: VzRoot) -> None:
    first, second = vzroot.new_ip(), vzroot.new_ip()
    vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", first, "--ipadd", second, check=True)
    vzroot.run("start", "101", check=True)
    assert vzroot.veth("101") in host_route(second)
    vzroot.run("set", "101", "--ipdel", second, "--save", check=True)
    assert host_route(second) == ""
    assert vzroot.veth("101") in host_route(first)


@pytest.mark.parametrize("link", ["/{outside}", "../../../../../../../../..{outside}"])
def test_resolv_conf_is_written_inside_the_ct_through_a_planted_symlink(vzroot: VzRoot, link: str) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    outside = vzroot.base / "host-file"
    outside.write_text("host data\n")
    resolv = vzroot.private("101") / "etc" / "resolv.conf"
    resolv.symlink_to(link.format(outside=outside).replace("//", "/"))
    conf = ct_conf(vzroot, "101")
    conf.write_text(conf.read_text() + 'NAMESERVER="10.9.9.1"\nSEARCHDOMAIN=corp.example\n')
    vzroot.run("start", "101", check=True)
    assert outside.read_text() == "host data\n"
    assert not resolv.is_symlink()
    assert resolv.read_text() == "search corp.example\nnameserver 10.9.9.1\n"
    # live, on the running CT: the CT plants the link again
    resolv.unlink()
    resolv.symlink_to(link.format(outside=outside).replace("//", "/"))
    vzroot.run("set", "101", "--nameserver", "10.9.9.7", check=True)
    assert outside.read_text() == "host data\n"
    assert vzroot.run("exec", "101", "cat", "/etc/resolv.conf", check=True).stdout == "nameserver 10.9.9.7\n"


def test_set_nameserver_keeps_the_other_lines(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    resolv = vzroot.private("101") / "etc" / "resolv.conf"
    resolv.write_text("# by hand\nnameserver 1.1.1.1\noptions ndots:2\nsearch old.example\n")
    vzroot.run("start", "101", check=True)
    vzroot.run("set", "101", "--nameserver", "10.9.9.1", "--nameserver", "10.9.9.2", check=True)
    assert (
        resolv.read_text()
        == "# by hand\noptions ndots:2\nsearch old.example\nnameserver 10.9.9.1\nnameserver 10.9.9.2\n"
    )


def test_a_template_in_openvz_cache_dir(vzroot: VzRoot) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    cache = vzroot.base / "template" / "cache"
    cache.mkdir(parents=True)
    packed = subprocess.run(
        ["tar", "-czf", str(cache / "busybox-1.tar.gz"), "-C", str(vzroot.private("101")), "."], capture_output=True
    )
    assert packed.returncode == 0, packed.stderr
    assert "busybox-1" in vzroot.run("template", "list", check=True).stdout.split()
    vzroot.run("create", "102", "--ostemplate", "busybox-1", check=True)
    vzroot.run("start", "102", check=True)
    assert vzroot.run("exec", "102", "echo", "up", check=True).stdout == "up\n"


ANNOUNCE = """
import json, socket, sys
from vzpy.runtime import network
peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
peer.bind(("b1", 0))
peer.settimeout(10)
result = {mode: network.announce("192.0.2.50", ("a1",), mode, devices) for mode, devices in
          [("detect", ()), ("all", ()), ("list", ("b0", "c0", "missing0"))]}
frame = peer.recv(2048)
result["heard_on_b1"] = frame[28:32] == bytes([192, 0, 2, 50]) and frame[38:42] == bytes([192, 0, 2, 50])
print(json.dumps(result))
"""


def test_neighbour_devs_chooses_where_the_ct_is_announced() -> None:
    ns = f"vzpy-nd-{os.getpid()}"
    ip = ["ip", "-n", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for a, b in (("a0", "a1"), ("b0", "b1"), ("c0", "c1")):
            subprocess.run([*ip, "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        for dev in ("c0", "c1"):
            subprocess.run([*ip, "link", "set", dev, "arp", "off"], check=True)  # NOARP: never announced on
        for dev in ("lo", "a0", "a1", "b0", "b1", "c0", "c1"):
            subprocess.run([*ip, "link", "set", dev, "up"], check=True)
        subprocess.run([*ip, "addr", "add", "192.0.2.1/24", "dev", "a0"], check=True)
        run = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", ANNOUNCE], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["detect"] == ["a0"]  # the interface whose network holds the address
        assert sorted(result["all"]) == ["a0", "b0", "b1"]  # up, ARP-capable; not lo, c0/c1 or the excluded a1
        assert result["list"] == ["b0"]
        assert result["heard_on_b1"] is True  # a real gratuitous ARP for the address went out of b0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_start_announces_the_ct_on_neighbour_devs(vzroot: VzRoot) -> None:
    import socket

    near, far = f"vtnd{os.getpid() % 100000}a", f"vtnd{os.getpid() % 100000}b"
    subprocess.run(["ip", "link", "add", near, "type", "veth", "peer", "name", far], check=True)
    try:
        for dev in (near, far):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        with vzroot.conf.open("a") as conf:
            conf.write(f'NEIGHBOUR_DEVS="list:{near}"\n')
        ip = vzroot.new_ip()
        vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", ip, check=True)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as listener:
            listener.bind((far, 0))
            listener.settimeout(20)
            vzroot.run("start", "101", check=True)
            frame = listener.recv(2048)
        packed = socket.inet_aton(ip)
        assert frame[28:32] == packed and frame[38:42] == packed  # sender and target: the CT's address
    finally:
        subprocess.run(["ip", "link", "del", near], check=False)


def test_limits_come_back_with_a_restore(vzroot: VzRoot, tmp_path: Path) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    conf = ct_conf(vzroot, "101")
    conf.write_text(conf.read_text() + 'PHYSPAGES="0:131072"\nSWAPPAGES="0:32768"\nCPUUNITS=700\nCPULIMIT=30\n')
    vzroot.run("start", "101", check=True)
    dump = tmp_path / "Dump.101"
    vzroot.run("chkpnt", "101", "--dumpfile", str(dump), check=True, timeout=180)
    vzroot.run("restore", "101", "--dumpfile", str(dump), check=True, timeout=180)
    assert int(cgroup(vzroot, "101", "memory", "memory.limit_in_bytes")) == 131072 * PAGE
    assert int(cgroup(vzroot, "101", "memory", "memory.memsw.limit_in_bytes")) == (131072 + 32768) * PAGE
    assert (cgroup(vzroot, "101", "cpu", "cpu.shares"), cgroup(vzroot, "101", "cpu", "cpu.cfs_quota_us")) == (
        "700",
        "30000",
    )
