"""An operator's script in vzctl syntax, run through the `vzctl` name (a link to the installed vzpy whose basename
is vzctl), against an isolated root with a legacy-style vz.conf and an OpenVZ-style CTID.conf: results and exit
codes as vzctl gives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import VZPY, VzRoot

pytestmark = pytest.mark.root

# Lines of a vz.conf as OpenVZ shipped it (legacy keys vzpy has no use for are ignored).
LEGACY_VZ_CONF = """\
## Global parameters
VIRTUOZZO=yes
LOCKDIR=/vz/lock
DUMPDIR=/vz/dump
VE0CPUUNITS=1000
## Logging parameters
LOGGING=yes
LOG_LEVEL=0
VERBOSE=0
## Disk quota parameters
DISK_QUOTA=yes
VZFASTBOOT=no
## Network traffic parameters
TRAFFIC_SHAPING=no
IPV6="yes"
IPTABLES="ipt_REJECT ipt_tos ipt_limit ipt_multiport iptable_filter iptable_mangle ipt_TCPMSS"
"""
# An OpenVZ CTID.conf's limits: pages, unlimited, barrier:limit pairs, inline comments.
OPENVZ_CT_CONF = """\
ONBOOT="no"
PHYSPAGES="0:65536"   # 256 MiB in 4 KiB pages
SWAPPAGES="0:unlimited"
NUMPROC="unlimited"
CPUUNITS="1000"
STOP_TIMEOUT=30       # seconds
NAMESERVER="10.0.0.53"
"""

# Each step: a label, then the command; the script prints "label exit-code" per step and keeps its output.
OPERATOR_SCRIPT = r"""
step() { label=$1; shift; "$@" >"$OUT/$label.out" 2>"$OUT/$label.err"; echo "$label $?"; }
step status0 vzctl --quiet status 101
step start vzctl start 101
step status1 vzctl status 101
step pipeline vzctl exec 101 'echo hello | tr a-z A-Z'
step joined vzctl exec 101 echo one '' two
step exec_false vzctl exec 101 'exit 5'
step exec2_code vzctl exec2 101 'exit 7'
step exec2_stdin sh -c 'printf "echo from-stdin\nexit 3\n" | vzctl exec2 101 -'
step ask1 vzctl exec2 101 'kill -USR1 $(cat /tmp/token.pid)'
step resolv vzctl exec 101 cat /etc/resolv.conf
"""
SUSPEND_SCRIPT = r"""
step() { label=$1; shift; "$@" >"$OUT/$label.out" 2>"$OUT/$label.err"; echo "$label $?"; }
for ct in $(vzlist -H -o ctid); do
  step suspend vzctl suspend $ct --skip_arpdetect --flags 0 --context=1
done
step status2 vzctl status 101
step start2 vzctl start 101
step status3 vzctl status 101
step ask2 vzctl exec2 101 'kill -USR1 $(cat /tmp/token.pid)'
"""
END_SCRIPT = r"""
step() { label=$1; shift; "$@" >"$OUT/$label.out" 2>"$OUT/$label.err"; echo "$label $?"; }
step destroy_running vzctl destroy 101
step delete_running vzctl delete 101
step resume_running vzctl resume 101
step stop vzctl stop 101
step stop_again vzctl stop 101
step exec_stopped vzctl exec 101 true
step exec2_stopped vzctl exec2 101 true
step no_ctid vzctl start
step bad_command vzctl frobnicate 101
step delete vzctl delete 101
step status4 vzctl status 101
"""
# A service holding a token in memory only: on SIGUSR1 it writes it to /tmp/answer. A restored CT answers
# with the token it had; a CT started afresh has a new one (or no such process).
TOKEN_SERVICE = (
    "token=$(cat /proc/sys/kernel/random/uuid)\n"
    "echo $$ > /tmp/token.pid\n"
    "trap 'echo $token > /tmp/answer' USR1\n"
    "while :; do sleep 1 & wait $!; done"
)


@pytest.fixture
def vzctl_bin(tmp_path: Path) -> Path:
    """A directory whose `vzctl` and `vzlist` are links to the installed vzpy: the program sees argv[0] =
    .../vzctl (or vzlist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("vzctl", "vzlist"):
        (bin_dir / name).symlink_to(VZPY)
    return bin_dir


def run_script(vz: VzRoot, bin_dir: Path, out: Path, script: str) -> dict[str, int]:
    out.mkdir(exist_ok=True)
    env = {**vz.env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out)}
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {label: int(code) for label, code in (line.split() for line in result.stdout.splitlines())}


def read(out: Path, label: str, stream: str = "out") -> str:
    return (out / f"{label}.{stream}").read_text()


def wait_for_answer(vz: VzRoot) -> str:
    answer = vz.private("101") / "tmp" / "answer"
    deadline = time.monotonic() + 30
    while not answer.exists() or not answer.read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the token service did not answer"
        time.sleep(0.05)
    text = answer.read_text().strip()
    answer.unlink()
    return text


def test_an_operator_script_in_vzctl_syntax(vzroot: VzRoot, vzctl_bin: Path, tmp_path: Path) -> None:
    vzroot.conf.write_text(LEGACY_VZ_CONF + vzroot.conf.read_text())  # the test's own paths come last and win
    vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", vzroot.new_ip(), check=True)
    conf = vzroot.base / "etc" / "conf" / "101.conf"
    conf.write_text(conf.read_text() + OPENVZ_CT_CONF)
    vzroot.add_service("101", "token", TOKEN_SERVICE)
    out = tmp_path / "out"

    codes = run_script(vzroot, vzctl_bin, out, OPERATOR_SCRIPT)
    assert codes["status0"] == 0 and read(out, "status0") == "CTID 101 exist unmounted down\n"
    assert codes["start"] == 0, read(out, "start", "err")
    assert read(out, "status1") == "CTID 101 exist mounted running\n"
    assert (codes["pipeline"], read(out, "pipeline")) == (0, "HELLO\n")  # one line for the CT's shell
    assert (codes["joined"], read(out, "joined")) == (0, "one  two\n")  # joined by spaces, '' kept
    assert codes["exec_false"] == 8  # vzctl exec: any failure is VZ_COMMAND_EXECUTION_ERROR
    assert codes["exec2_code"] == 7  # exec2: the command's own code
    assert (codes["exec2_stdin"], read(out, "exec2_stdin")) == (3, "from-stdin\n")
    assert codes["ask1"] == 0, read(out, "ask1", "err")
    token = wait_for_answer(vzroot)
    assert "nameserver 10.0.0.53\n" in read(out, "resolv")  # NAMESERVER of the OpenVZ CTID.conf
    memory = Path(f"/sys/fs/cgroup/memory/{vzroot.cgroup_parent}/101/memory.limit_in_bytes")
    assert int(memory.read_text()) == 65536 * os.sysconf("SC_PAGE_SIZE")  # PHYSPAGES in pages

    codes = run_script(vzroot, vzctl_bin, out, SUSPEND_SCRIPT)
    assert codes["suspend"] == 0, read(out, "suspend", "err")
    assert read(out, "status2") == "CTID 101 exist unmounted down suspended\n"
    assert codes["start2"] == 0, read(out, "start2", "err")
    assert "trying to restore" in read(out, "start2")
    assert read(out, "status3") == "CTID 101 exist mounted running\n"
    assert codes["ask2"] == 0, read(out, "ask2", "err")
    assert wait_for_answer(vzroot) == token  # the same processes, restored: not started afresh

    codes = run_script(vzroot, vzctl_bin, out, END_SCRIPT)
    assert codes["destroy_running"] == 32 and "stop it first" in read(out, "destroy_running", "err")
    assert codes["delete_running"] == 32
    assert codes["resume_running"] == 32 and "already running" in read(out, "resume_running", "err")
    assert codes["stop"] == 0
    assert codes["stop_again"] == 0 and "not running" in read(out, "stop_again", "err")
    assert codes["exec_stopped"] == 8
    assert codes["exec2_stopped"] == 31
    assert codes["no_ctid"] == 21 and "CT ID missing" in read(out, "no_ctid", "err")
    assert codes["bad_command"] == 20 and "frobnicate" in read(out, "bad_command", "err")
    assert codes["delete"] == 0, read(out, "delete", "err")
    assert read(out, "status4") == "CTID 101 deleted unmounted down\n"


def test_stop_of_a_restored_ct_leaves_no_dump_waiting(running_ct) -> None:
    """A dump restored once no longer waits: the next stop/start is a plain start, status has no sixth word."""
    vz, ctid, _ = running_ct
    vz.run("chkpnt", ctid, check=True)
    assert json.loads(vz.run("status", "--json", ctid).stdout)["suspended"] is True
    vz.run("restore", ctid, check=True)
    vz.run("stop", ctid, check=True)
    assert vz.run("status", ctid).stdout == f"CTID {ctid} exist unmounted down\n"
    started = vz.run("start", ctid, check=True)
    assert "trying to restore" not in started.stdout


def test_restart_checks_the_new_config_before_stopping(running_ct) -> None:
    vz, ctid, _ = running_ct
    conf = vz.base / "etc" / "conf" / f"{ctid}.conf"
    conf.write_text(conf.read_text() + 'HOSTNAME="not a hostname"\n')
    result = vz.run("restart", ctid)
    assert result.returncode == 85, result.stderr
    assert json.loads(vz.run("status", "--json", ctid).stdout)["status"] == "running"


def test_stop_waits_stop_timeout_then_kills(running_ct) -> None:
    """STOP_TIMEOUT from CTID.conf (set by `set --stop-timeout --save`, vzctl's) bounds the wait for an init
    that does not shut down: the rest is killed and stop succeeds."""
    vz, ctid, _ = running_ct
    refused = vz.run("set", ctid, "--stop-timeout", "1")
    assert refused.returncode == 20 and "--save" in refused.stderr  # vzctl: a CTID.conf setting only
    vz.run("set", ctid, "--stop-timeout", "1", "--save", check=True)
    conf = vz.base / "etc" / "conf" / f"{ctid}.conf"
    assert 'STOP_TIMEOUT="1"' in conf.read_text()
    os.kill(vz.state(ctid)["init_pid"], signal.SIGSTOP)  # its SIGTERM stays pending: it never shuts down
    result = vz.run("stop", ctid, timeout=100)  # well below the default 120 s
    assert result.returncode == 0, result.stderr
    assert f"CT {ctid} did not stop within 1s (STOP_TIMEOUT); killing it" in result.stdout
    assert json.loads(vz.run("status", "--json", ctid).stdout)["status"] == "stopped"


def test_vzpy_exec_single_line_and_stdin(running_ct) -> None:
    """`vzpy exec`: one argument is a line for the CT's shell, `-` reads commands from stdin, several words
    stay argv (no shell): exit codes pass through in each form."""
    vz, ctid, _ = running_ct
    line = vz.run("exec", ctid, "echo hello | tr a-z A-Z; exit 4", stdin=subprocess.DEVNULL)
    assert (line.returncode, line.stdout) == (4, "HELLO\n")
    piped = vz.run("exec", ctid, "-", input="echo $((6 * 7))\nexit 5\n")
    assert (piped.returncode, piped.stdout) == (5, "42\n")
    argv = vz.run("exec", ctid, "echo", "a | b", stdin=subprocess.DEVNULL)
    assert (argv.returncode, argv.stdout) == (0, "a | b\n")
    assert vz.run("exec", ctid, "sh", "-c", "exit 7", stdin=subprocess.DEVNULL).returncode == 7


def test_vzmigrate_name_live_migration(host_a, host_b, test_network) -> None:
    """vzmigrate's syntax through its name on a test host: `-f` alone (never eating HOST), --dry-run, --live,
    --ssh-mux; its exit code for a missing CT; then a real live migration."""
    vzmigrate = host_a.path("/vz/bin/vzmigrate")
    vzmigrate.parent.mkdir(parents=True, exist_ok=True)
    vzmigrate.symlink_to(VZPY)
    ctid, ip = "111", test_network.new_ct_address()
    try:
        assert host_a.run(["vzpy", "create", ctid, "--ostemplate", "minimal", "--ipadd", ip]).returncode == 0
        assert host_a.run(["vzpy", "start", ctid]).returncode == 0
        dry = host_a.run(["/vz/bin/vzmigrate", "--dry-run", "--live", "--ssh-mux", "-f", host_b.address, ctid])
        assert dry.returncode == 0, dry.stderr
        assert "preflight" in dry.stdout
        missing = host_a.run(["/vz/bin/vzmigrate", "--live", host_b.address, "404"])
        assert missing.returncode == 10, missing.stderr  # MIG_ERR_NOEXIST
        usage = host_a.run(["/vz/bin/vzmigrate", "--live", host_b.address])
        assert usage.returncode == 1, usage.stderr  # MIG_ERR_USAGE
        moved = host_a.run(["/vz/bin/vzmigrate", "--live", "-r", "yes", host_b.address, ctid], timeout=300)
        assert moved.returncode == 0, moved.stderr
        status = host_b.run(["vzpy", "status", ctid])
        assert status.stdout == f"CTID {ctid} exist mounted running\n"
        assert host_a.run(["vzpy", "status", ctid]).stdout == f"CTID {ctid} deleted unmounted down\n"
    finally:
        for host in (host_a, host_b):
            host.remove_ct(ctid)
        vzmigrate.unlink()
