"""vzpy chkpnt / restore, full and staged, on real CTs with real CRIU.

The state-fidelity workload (vzpy_lab.workload) runs inside the CT and verifies every item of the
reference page's list itself; a client outside the CT keeps an established TCP connection open across
every checkpoint and checks each byte comes back in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import VzRoot, criu_binary
from vzpy import scratch
from vzpy.config import GlobalConfig
from vzpy.container import Container
from vzpy_lab.workload.build import build_fidelity
from vzpy_lab.workload.client import ITEMS, EchoStream, FidelityClient, failures

pytestmark = pytest.mark.root
PORT = 7000
CAP_SYS_RESOURCE = 24


def root_has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    return bool(int(status.split("CapEff:")[1].split()[0], 16) & (1 << CAP_SYS_RESOURCE))


@pytest.fixture
def fidelity_ct(vzroot: VzRoot, tmp_path_factory: pytest.TempPathFactory):
    """CT 101 running the fidelity workload as a service, with an echo connection from the host."""
    binary = build_fidelity(tmp_path_factory.getbasetemp() / "workload")
    ip = vzroot.new_ip()
    vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "fid.test", check=True)
    shutil.copy(binary, vzroot.private("101") / "usr" / "bin" / "fidelity")
    # Without CAP_SYS_RESOURCE (this host) CRIU cannot read a non-root task's rlimits: -r keeps uid 0
    flags = "" if root_has_cap_sys_resource() else "-r "
    vzroot.add_service("101", "fidelity", f"exec /usr/bin/fidelity {flags}{PORT}")
    vzroot.run("start", "101", check=True)
    client = FidelityClient(ip, PORT)
    client.wait_ready(timeout=20)
    echo = EchoStream(ip, PORT + 1)
    echo.exchange(64 * 1024)
    try:
        yield vzroot, "101", ip, client, echo
    finally:
        echo.close()


def assert_all_ok(client: FidelityClient) -> None:
    result = client.verify()
    assert set(result) == set(ITEMS)
    assert failures(result) == {}, failures(result)


def assert_network_locked(ip: str) -> None:
    """Peers see silence, not a reset: even the handshake, which the kernel completes for a frozen process's
    listening socket, gets no answer."""
    with pytest.raises(TimeoutError):
        socket.create_connection((ip, PORT), timeout=1).close()


def test_chkpnt_then_restore_keeps_every_item_and_the_tcp_connection(fidelity_ct) -> None:
    vz, ctid, _ip, client, echo = fidelity_ct
    assert_all_ok(client)
    result = vz.run("chkpnt", ctid)
    assert result.returncode == 0, result.stderr
    dump = vz.base / "dump" / f"Dump.{ctid}"
    assert dump.stat().st_mode & 0o777 == 0o600
    assert vz.stage(ctid) == "stopped"
    info = vz.run("dumpinfo", str(dump), check=True).stdout
    assert f"CT {ctid}" in info and "fidelity" in info
    verified = vz.run("dumpinfo", "--verify", str(dump), check=True).stdout
    assert "verified: every member's size and blake3 digest match" in verified
    listed = json.loads(vz.run("dumpinfo", "--json", str(dump), check=True).stdout)
    assert listed["digest"] == "blake3" and all("blake3" in m for m in listed["members"].values())

    result = vz.run("restore", ctid)
    assert result.returncode == 0, result.stderr
    assert vz.stage(ctid) == "running"
    echo.exchange(256 * 1024)  # the same connection, every byte in order, no reset
    assert_all_ok(client)
    assert dump.exists(), "restore must keep the dump file"


def test_staged_chkpnt_and_restore_as_separate_invocations(fidelity_ct) -> None:
    vz, ctid, ip, client, echo = fidelity_ct
    dump = vz.base / "staged.dump"
    assert vz.run("chkpnt", ctid, "--suspend").returncode == 0
    assert vz.stage(ctid) == "suspended"
    assert_network_locked(ip)
    assert vz.run("chkpnt", ctid, "--dump", "--compress", "--dumpfile", str(dump)).returncode == 0
    assert vz.stage(ctid) == "dumped" and dump.exists()
    assert json.loads(vz.run("dumpinfo", "--json", str(dump), check=True).stdout)["compression"] == "zstd"
    assert vz.run("chkpnt", ctid, "--kill").returncode == 0
    assert vz.stage(ctid) == "stopped"

    assert vz.run("restore", ctid, "--undump", "--dumpfile", str(dump)).returncode == 0
    assert vz.stage(ctid) == "undumped"
    assert_network_locked(ip)
    assert vz.run("restore", ctid, "--resume").returncode == 0
    assert vz.stage(ctid) == "running"
    echo.exchange(128 * 1024)
    assert_all_ok(client)


def test_snapshot_leaves_the_ct_running_and_stays_restorable_with_fs(fidelity_ct) -> None:
    vz, ctid, _ip, client, echo = fidelity_ct
    plain, with_fs = vz.base / "plain.dump", vz.base / "withfs.dump"
    assert vz.run("chkpnt", ctid, "--snapshot", "--dumpfile", str(plain)).returncode == 0
    assert vz.stage(ctid) == "running"
    echo.exchange(64 * 1024)
    assert_all_ok(client)
    assert (
        vz.run("chkpnt", ctid, "--suspend", "--dump", "--resume", "--with-fs", "--dumpfile", str(with_fs)).returncode
        == 0
    )
    assert_all_ok(client)
    vz.run("exec", ctid, "sh", "-c", "echo changed > /etc/motd", check=True)
    vz.run("stop", ctid, check=True)
    echo.close()

    refused = vz.run("restore", ctid, "--dumpfile", str(plain))
    assert refused.returncode == 17 and "/etc/motd" in refused.stderr and "--skip-fs-check" in refused.stderr
    assert vz.stage(ctid) == "stopped"

    assert vz.run("restore", ctid, "--dumpfile", str(with_fs)).returncode == 0
    assert not (vz.private(ctid) / "etc" / "motd").exists(), "--with-fs must put the files back first"
    assert_all_ok(client)


def test_stages_out_of_order_are_refused_before_anything_changes(fidelity_ct) -> None:
    vz, ctid, _, client, _ = fidelity_ct
    for args, words in (
        (["chkpnt", ctid, "--dump"], "`vzpy chkpnt 101 --suspend`"),
        (["chkpnt", ctid, "--kill"], "allowed next"),
        (["chkpnt", ctid, "--resume"], "allowed next"),
        (["restore", ctid, "--resume"], "allowed next"),
    ):
        result = vz.run(*args)
        assert result.returncode == 16, (args, result.stderr)
        assert words in result.stderr and "CT 101 is running" in result.stderr
    for args in (["restore", ctid, "--undump"], ["restore", ctid]):  # vzctl: restore of a running CT is 32
        result = vz.run(*args)
        assert result.returncode == 32 and "CT 101 is already running" in result.stderr, (args, result.stderr)
    assert vz.stage(ctid) == "running"
    assert vz.run("chkpnt", ctid, "--kill", "--resume").returncode == 20
    vz.run("chkpnt", ctid, "--suspend", check=True)
    again = vz.run("chkpnt", ctid, "--suspend")
    assert again.returncode == 16 and "CT 101 is suspended" in again.stderr and "--dump" in again.stderr
    vz.run("chkpnt", ctid, "--resume", check=True)
    assert_all_ok(client)


def test_bad_dump_files_are_refused_and_change_nothing(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _, _, _ = fidelity_ct
    vz.run("chkpnt", ctid, check=True)
    good = vz.base / "dump" / f"Dump.{ctid}"
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "corrupt": data[: len(data) - 4096] + bytes([data[-4096] ^ 0xFF]) + data[len(data) - 4095 :],
        "foreign": os.urandom(4096),
        "empty": b"",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.dump"
        bad.write_bytes(content)
        result = vz.run("restore", ctid, "--dumpfile", str(bad))
        assert result.returncode == 17, (name, result.stderr)
        assert result.stderr.startswith("vzpy: error: ") and "dump file" in result.stderr, (name, result.stderr)
        assert vz.stage(ctid) == "stopped", name
        assert not Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}").exists(), name
    missing = vz.run("restore", ctid, "--dumpfile", str(tmp_path / "nope"))
    assert missing.returncode == 17 and "nope" in missing.stderr
    assert good.read_bytes() == data


def test_restore_on_a_second_root_with_the_same_files(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _ip, client, _ = fidelity_ct
    vz.run("chkpnt", ctid, check=True)
    other = VzRoot(tmp_path / "other", "second")
    try:
        (other.base / "private").mkdir(parents=True)
        subprocess.run(["cp", "-a", str(vz.private(ctid)), str(other.private(ctid))], check=True)
        dump = vz.base / "dump" / f"Dump.{ctid}"
        result = other.run("restore", ctid, "--dumpfile", str(dump))
        assert result.returncode == 0, result.stderr
        assert json.loads(other.run("status", "--json", ctid).stdout)["status"] == "running"
        assert_all_ok(client)
        cgroup = Path(f"/proc/{other.state(ctid)['init_pid']}/cgroup").read_text()
        assert f"{other.cgroup_parent}/{ctid}" in cgroup
        other.run("stop", ctid, check=True)

        (other.private(ctid) / "etc" / "hostname").write_text("tampered\n")
        refused = other.run("restore", ctid, "--dumpfile", str(dump))
        assert refused.returncode == 17 and "/etc/hostname" in refused.stderr
    finally:
        other.cleanup()


def test_failed_dump_resumes_the_ct(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _, client, echo = fidelity_ct
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        result = vz.run("chkpnt", ctid, "--dumpfile", str(small / "Dump"))
        assert result.returncode == 16, result.stderr  # ChkpntError: the dump file does not fit
        assert "space" in result.stderr
        assert vz.stage(ctid) == "running"
        assert not list(small.iterdir()), "a failed dump must leave no partial file"
        echo.exchange(16 * 1024)
        assert_all_ok(client)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_failed_restore_kills_partial_processes_and_keeps_the_dump(fidelity_ct) -> None:
    vz, ctid, _, _, _ = fidelity_ct
    vz.run("chkpnt", ctid, check=True)
    dump = vz.base / "dump" / f"Dump.{ctid}"
    before = dump.read_bytes()
    binary = vz.private(ctid) / "usr" / "bin" / "fidelity"
    binary.rename(binary.with_name("moved"))  # a file the dumped processes map is gone
    result = vz.run("restore", ctid, "--skip-fs-check")
    assert result.returncode == 17
    assert "CRIU log:" in result.stderr and "Error" in result.stderr
    assert vz.stage(ctid) == "stopped"
    assert not Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}").exists()
    assert dump.read_bytes() == before
    binary.with_name("moved").rename(binary)
    assert vz.run("restore", ctid).returncode == 0


def test_a_killed_vzpy_leaves_a_recoverable_stage(fidelity_ct) -> None:
    vz, ctid, _ip, client, _ = fidelity_ct
    freezer = Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}/freezer.state")
    freezer.write_text("FROZEN")  # as if vzpy died right after freezing, before saving the stage
    assert vz.stage(ctid) == "suspended"
    assert vz.run("chkpnt", ctid, "--resume").returncode == 0
    assert_all_ok(client)

    vz.run("chkpnt", ctid, check=True)
    restore = subprocess.Popen(["vzpy", "restore", ctid, "--undump"], env=vz.env)
    deadline = time.monotonic() + 30
    while not (freezer.exists() and freezer.read_text().strip() == "FROZEN"):
        assert time.monotonic() < deadline and restore.poll() is None
        time.sleep(0.002)
    restore.send_signal(signal.SIGKILL)
    restore.wait()
    stage = vz.stage(ctid)
    assert stage in ("undumped", "stopped")
    if stage == "undumped":
        assert vz.run("restore", ctid, "--kill").returncode == 0
    assert vz.stage(ctid) == "stopped"
    assert vz.run("restore", ctid).returncode == 0
    assert_all_ok(client)


# --- nothing hangs, nothing stays frozen


def hanging_criu(vz: VzRoot, tmp_path: Path, timeout: float = 3) -> Path:
    """Point vz.conf at a criu whose RPC worker never answers (its pid lands in the returned file), with a
    CRIU_TIMEOUT of `timeout` seconds; `criu --version` and `criu check` are the real ones."""
    pids = tmp_path / "hung.pids"
    wrapper = tmp_path / "criu"
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$1" = swrk ]; then echo $$ >> {pids}; exec sleep 600; fi\nexec {criu_binary()} "$@"\n'
    )
    wrapper.chmod(0o755)
    with vz.conf.open("a") as conf:
        conf.write(f'CRIU="{wrapper}"\nCRIU_TIMEOUT="{timeout:g}"\n')
    return pids


def real_criu(vz: VzRoot) -> None:
    lines = [line for line in vz.conf.read_text().splitlines() if not line.startswith(("CRIU=", "CRIU_TIMEOUT="))]
    vz.conf.write_text("\n".join(lines) + "\n")


def kill_hung(pids: Path) -> None:
    for pid in pids.read_text().split() if pids.exists() else []:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_hung_criu_is_killed_at_its_deadline_and_the_ct_resumed(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _ip, client, echo = fidelity_ct
    pids = hanging_criu(vz, tmp_path)
    try:
        result = vz.run("chkpnt", ctid, timeout=60)
        assert result.returncode == 16, result.stderr
        assert "timed out after 3s" in result.stderr and "criu dump" in result.stderr
        assert vz.stage(ctid) == "running"
        echo.exchange(16 * 1024)  # thawed and unlocked
        assert_all_ok(client)

        real_criu(vz)
        vz.run("chkpnt", ctid, check=True)
        pids = hanging_criu(vz, tmp_path)
        result = vz.run("restore", ctid, timeout=60)
        assert result.returncode == 17, result.stderr
        assert "timed out after 3s" in result.stderr and "criu restore" in result.stderr
        assert vz.stage(ctid) == "stopped"
        assert not Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}").exists()
    finally:
        kill_hung(pids)
    real_criu(vz)
    assert vz.run("restore", ctid).returncode == 0
    assert_all_ok(client)


CRIU_LOCK_TABLE = "CRIU-5e1f0c2a-7d3b-4c1e-9a"
CRIU_LOCK = (
    f"table inet {CRIU_LOCK_TABLE} {{\n"
    "chain output { type filter hook output priority filter; policy drop; }\n"
    "chain input { type filter hook input priority filter; policy drop; }\n}"
)


def test_a_criu_killed_holding_its_network_lock_leaves_the_ct_reachable(fidelity_ct, tmp_path: Path) -> None:
    """CRIU locks the network with a table of its own (CRIU-<run id>) and removes it as it finishes; one killed
    at its deadline cannot. This CRIU locks the way CRIU does, then hangs until killed."""
    vz, ctid, _ip, client, echo = fidelity_ct
    pids = hanging_criu(vz, tmp_path)
    wrapper = tmp_path / "criu"
    netns = f"/proc/{vz.state(ctid)['init_pid']}/ns/net"
    lock = f"nsenter --net={netns} -- nft -f - <<'EOF' || exit 1\n{CRIU_LOCK}\nEOF\n"
    wrapper.write_text(wrapper.read_text().replace("then echo $$", f"then {lock}echo $$", 1))
    try:
        result = vz.run("chkpnt", ctid, timeout=60)
        assert result.returncode == 16, result.stderr
        assert "timed out after 3s" in result.stderr
    finally:
        kill_hung(pids)
    assert vz.stage(ctid) == "running"
    nft = ["nsenter", f"--net={netns}", "--", "nft", "list", "tables"]
    listed = subprocess.run(nft, capture_output=True, text=True, timeout=30)
    assert CRIU_LOCK_TABLE not in listed.stdout, listed.stdout
    echo.exchange(16 * 1024)
    assert_all_ok(client)


def test_a_killed_chkpnt_leaves_no_scratch_after_the_next_command(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _ip, client, _ = fidelity_ct
    pids = hanging_criu(vz, tmp_path, timeout=300)
    ct = Container(ctid, GlobalConfig.load(vz.conf))
    try:
        chkpnt = subprocess.Popen(["vzpy", "chkpnt", ctid], env=vz.env)
        deadline = time.monotonic() + 30
        while not scratch.leftovers(ct):  # the dump's scratch dir exists: CRIU (hung) runs
            assert time.monotonic() < deadline and chkpnt.poll() is None
            time.sleep(0.01)
        chkpnt.send_signal(signal.SIGKILL)
        chkpnt.wait()
    finally:
        kill_hung(pids)
    left = scratch.leftovers(ct)
    assert left and all(p.exists() for p in left)
    real_criu(vz)
    assert vz.stage(ctid) == "suspended"
    assert vz.run("chkpnt", ctid, "--resume").returncode == 0
    assert not any(p.exists() for p in left)
    assert_all_ok(client)


def test_bad_dump_file_targets_are_refused_before_the_ct_is_suspended(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _ip, client, echo = fidelity_ct
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args, words in (
        (["--dumpfile", str(tmp_path / "missing" / "Dump")], "does not exist"),
        (["--snapshot", "--dumpfile", str(tmp_path / "missing" / "Dump")], "does not exist"),
        (["--dumpfile", "/dev/null"], "is a character device, not a regular file"),
        (["--dumpfile", str(fifo)], "is a FIFO, not a regular file"),
        (["--dumpfile", str(tmp_path)], "is a directory, not a regular file"),
    ):
        result = vz.run("chkpnt", ctid, *args, timeout=30)
        assert result.returncode == 16, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert vz.stage(ctid) == "running", args
        echo.exchange(4096)  # neither frozen nor locked
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert_all_ok(client)


def test_restore_and_dumpinfo_of_a_fifo_are_refused_at_once(fidelity_ct, tmp_path: Path) -> None:
    vz, ctid, _, _, _ = fidelity_ct
    vz.run("chkpnt", ctid, check=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["restore", ctid, "--dumpfile", str(fifo)], ["dumpinfo", str(fifo)]):
        result = vz.run(*args, timeout=30)  # reading a FIFO would block forever holding the CT's lock
        assert result.returncode == 17, (args, result.stderr)
        assert "is a FIFO, not a dump file" in result.stderr, result.stderr
    assert vz.stage(ctid) == "stopped"
    assert vz.run("restore", ctid).returncode == 0


def test_an_unfinished_migration_keeps_this_copy_from_running(fidelity_ct) -> None:
    vz, ctid, _ip, client, _ = fidelity_ct
    marker = vz.base / "lock" / f"{ctid}.migration.json"
    vz.run("chkpnt", ctid, "--suspend", check=True)
    marker.write_text(json.dumps({"host": "dst.test"}))
    for args in (["chkpnt", ctid, "--resume"], ["chkpnt", ctid, "--dump", "--resume"]):
        result = vz.run(*args)
        assert result.returncode == 9, result.stderr
        assert f"run `vzpy migrate --recover dst.test {ctid}` first" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert vz.stage(ctid) == "suspended"
    marker.unlink()
    vz.run("chkpnt", ctid, "--resume", check=True)
    assert_all_ok(client)
    vz.run("stop", ctid, check=True)
    marker.write_text(json.dumps({"host": "dst.test"}))
    assert vz.run("start", ctid).returncode == 9
    marker.unlink()
