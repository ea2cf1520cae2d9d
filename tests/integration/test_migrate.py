"""vzpy migrate between two test hosts (own netns + mount ns + /etc/vz + a real sshd each), with a
client outside both that keeps an established TCP connection to the CT through the migration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpy_lab.netns import TestHost, TestNetwork
from vzpy_lab.workload.build import build_fidelity
from vzpy_lab.workload.client import EchoStream, FidelityClient, failures

pytestmark = pytest.mark.root
PORT = 7000
CTID = "101"


def vzpy(host: TestHost, *args: str, timeout: float = 180) -> object:
    return host.run(["vzpy", *args], timeout=timeout)


def status(host: TestHost, ctid: str = CTID) -> str:
    result = vzpy(host, "status", "--json", ctid)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return data["status"] if data["exist"] else "absent"


@pytest.fixture
def workload_ct(host_a: TestHost, host_b: TestHost, test_network: TestNetwork, tmp_path_factory):
    """CT 101 on host_a running the fidelity workload; a client connection from the client namespace."""
    binary = build_fidelity(tmp_path_factory.getbasetemp() / "workload")
    ip = test_network.new_ct_address()
    created = vzpy(host_a, "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "mig.test")
    assert created.returncode == 0, created.stderr
    private = host_a.path(f"/vz/private/{CTID}")
    shutil.copy(binary, private / "usr" / "bin" / "fidelity")
    service = private / "etc" / "vzpy" / "services" / "fidelity"
    service.write_text(f"#!/bin/sh\nexec /usr/bin/fidelity -r {PORT}\n")
    service.chmod(0o755)
    assert vzpy(host_a, "start", CTID).returncode == 0

    def connect(address: tuple[str, int], timeout: float):
        return test_network.client_connect(address[0], address[1], timeout)

    client = FidelityClient(ip, PORT, connect=connect)
    client.wait_ready(timeout=20)
    echo = EchoStream(ip, PORT + 1, connect=connect)
    echo.exchange(64 * 1024)
    try:
        yield ip, client, echo
    finally:
        echo.close()
        for host in (host_a, host_b):
            host.remove_ct(CTID)


def assert_all_ok(client: FidelityClient) -> None:
    result = client.verify()
    assert failures(result) == {}, failures(result)


def test_online_migration_there_and_back_keeps_the_connection(host_a, host_b, workload_ct) -> None:
    _ip, client, echo = workload_ct
    result = vzpy(host_a, "migrate", "--online", "--json", host_b.address, CTID)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["path"].startswith("stop-and-copy") and summary["frozen_seconds"] > 0
    assert summary["bytes_moved"] >= 64 << 20  # the workload's 64 MiB of memory, counted as received
    assert [p["name"] for p in summary["phases"]][-2:] == ["resume on destination", "clean up source"]
    assert status(host_b) == "running" and status(host_a) == "absent"
    assert not host_a.path(f"/vz/private/{CTID}").exists()
    echo.exchange(256 * 1024)  # the same TCP connection: every byte, in order, no reset
    assert_all_ok(client)

    back = vzpy(host_b, "migrate", "--online", "-t", host_a.address, CTID)
    assert back.returncode == 0, back.stderr
    assert "frozen" in back.stdout
    assert status(host_a) == "running" and status(host_b) == "absent"
    echo.exchange(256 * 1024)
    assert_all_ok(client)
    assert not list(host_a.path("/vz/dump").glob(".vzpy-migrate-*")), "source images must be removed"
    assert not list(host_b.path("/vz/dump").glob("Migrate.*")), "destination images must be removed"


def test_offline_migration_moves_a_running_ct_stopped_and_starts_it(host_a, host_b, workload_ct) -> None:
    _ip, client, _ = workload_ct
    result = vzpy(host_a, "migrate", "--remove-area", "no", host_b.address, CTID)
    assert result.returncode == 0, result.stderr
    assert status(host_b) == "running" and status(host_a) == "absent"
    assert host_a.path(f"/vz/private/{CTID}.migrated").is_dir()
    client.wait_ready(timeout=20)
    assert_all_ok(client)


def test_check_only_and_a_destination_that_has_the_ctid(host_a, host_b, workload_ct) -> None:
    ok = vzpy(host_a, "migrate", "--check-only", "--online", host_b.address, CTID)
    assert ok.returncode == 0, ok.stderr
    assert "preflight" in ok.stdout and status(host_a) == "running"
    taken = vzpy(host_b, "create", CTID, "--ostemplate", "minimal")
    assert taken.returncode == 0
    refused = vzpy(host_a, "migrate", "--online", host_b.address, CTID)
    assert refused.returncode == 9, refused.stderr  # vzmigrate's MIG_ERR_EXISTS
    assert "already exists" in refused.stderr
    assert status(host_a) == "running"
    vzpy(host_b, "destroy", CTID)


def test_unknown_host_key_is_refused_with_its_fingerprint(host_a, host_b, workload_ct, tmp_path: Path) -> None:
    empty = host_a.path("/vz/empty_known_hosts")
    empty.write_text("")
    result = vzpy(host_a, "migrate", "--online", "--known-hosts", "/vz/empty_known_hosts", host_b.address, CTID)
    assert result.returncode == 4, result.stderr  # MIG_ERR_CANT_CONNECT
    assert "SHA256:" in result.stderr and "known_hosts" in result.stderr
    assert status(host_a) == "running"


def test_failing_remote_restore_rolls_back_to_the_source(host_a, host_b, workload_ct) -> None:
    """The destination's real CRIU fails the restore itself (CRIU's own fault injection: CRIU_FAULT=2 restores
    the root task only, then fails), after the pages and images arrived: the CT keeps running on host_a with
    its connection, and host_b is left clean."""
    _ip, client, echo = workload_ct
    wrapper = host_b.path("/vz/vzpy-with-criu-fault")
    wrapper.write_text('#!/bin/sh\nCRIU_FAULT=2 exec vzpy "$@"\n')
    wrapper.chmod(0o755)
    try:
        result = vzpy(host_a, "migrate", "--online", "--remote-vzpy", "/vz/vzpy-with-criu-fault", host_b.address, CTID)
    finally:
        wrapper.unlink()
    output = result.stdout + result.stderr
    assert result.returncode == 7, output  # MIG_ERR_RESTORE_VPS
    assert "copy images: done" in output and "rolling back" in output, output
    assert "resume on destination" not in output, output
    assert status(host_a) == "running" and status(host_b) == "absent"
    assert not host_b.path(f"/vz/private/{CTID}").exists() or not any(host_b.path(f"/vz/private/{CTID}").iterdir())
    echo.exchange(64 * 1024)
    assert_all_ok(client)


def _start_migration(host_a: TestHost, host_b: TestHost, *extra: str) -> subprocess.Popen[str]:
    # a slow link (--bwlimit) keeps the migration in its first sync long enough to interfere with it
    argv = ["vzpy", "migrate", "--online", "--rsync-opts=--bwlimit=3000", *extra, host_b.address, CTID]
    return host_a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 60) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never showed; output:\n{''.join(seen)}")


def _wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _add_big_file(host: TestHost) -> None:
    (host.path(f"/vz/private/{CTID}") / "var" / "big").write_bytes(os.urandom(24 << 20))


def test_a_dropped_ssh_link_rolls_back_to_the_source(host_a, host_b, workload_ct) -> None:
    _, client, echo = workload_ct
    _add_big_file(host_a)
    migration = _start_migration(host_a, host_b)
    _wait_for_line(migration, "sync files ...")
    assert host_b.drop_ssh_sessions() > 0
    output = migration.communicate(timeout=120)[0]
    assert migration.returncode != 0, output
    assert status(host_a) == "running"
    echo.exchange(64 * 1024)
    assert_all_ok(client)
    # the agent on host_b lost its channel and rolled back on its own
    _wait_until(lambda: status(host_b) == "absent" and not host_b.path(f"/vz/dump/Migrate.{CTID}").exists())


def test_a_killed_vzpy_is_recovered_with_one_command(host_a, host_b, workload_ct) -> None:
    _, client, echo = workload_ct
    _add_big_file(host_a)
    migration = _start_migration(host_a, host_b)
    _wait_for_line(migration, "suspend: done")
    migration.send_signal(signal.SIGKILL)
    migration.wait(timeout=30)
    assert status(host_a) == "suspended"  # frozen, as vzpy left it
    recovered = vzpy(host_a, "migrate", "--recover", host_b.address, CTID)
    assert recovered.returncode == 0, recovered.stderr
    assert "runs here" in recovered.stdout
    assert status(host_a) == "running" and status(host_b) == "absent"
    echo.exchange(64 * 1024)
    assert_all_ok(client)


def test_a_failing_dump_on_the_source_rolls_back(host_a, host_b, workload_ct) -> None:
    """CRIU unusable on the source at dump time (after the CT was frozen): it must run on here."""
    _, client, echo = workload_ct
    conf = host_a.path("/etc/vz/vz.conf")
    original = conf.read_text()
    conf.write_text(original + 'CRIU="/bin/false"\n')
    try:
        result = vzpy(host_a, "migrate", "--online", host_b.address, CTID)
    finally:
        conf.write_text(original)
    assert result.returncode == 8, result.stdout + result.stderr  # MIG_ERR_CHECKPOINT
    assert "rolling back: suspend" in result.stdout
    assert status(host_a) == "running" and status(host_b) == "absent"
    echo.exchange(64 * 1024)
    assert_all_ok(client)


SMALL_CTID = "102"


@pytest.fixture
def small_ct(host_a: TestHost, host_b: TestHost, test_network: TestNetwork):
    """CT 102 on host_a: the minimal template's init and nothing else (a migration takes a second or two)."""
    ip = test_network.new_ct_address()
    created = vzpy(host_a, "create", SMALL_CTID, "--ostemplate", "minimal", "--ipadd", ip)
    assert created.returncode == 0, created.stderr
    assert vzpy(host_a, "start", SMALL_CTID).returncode == 0
    try:
        yield ip
    finally:
        for host in (host_a, host_b):
            host.remove_ct(SMALL_CTID)


def test_the_destination_announces_the_ct_only_where_its_network_is(host_a, host_b, small_ct) -> None:
    """host_b gets a second interface on another network: the CT's address is announced on eth0 (the
    CT's network) and nowhere else, as vzctl's NEIGHBOUR_DEVS=detect does."""
    ip = small_ct
    setup = [
        ["ip", "link", "add", "vzx0", "type", "veth", "peer", "name", "vzx1"],
        ["ip", "addr", "add", "192.168.231.1/24", "dev", "vzx0"],
        ["ip", "link", "set", "vzx0", "up"],
        ["ip", "link", "set", "vzx1", "up"],
    ]
    for argv in setup:
        assert host_b.run(argv).returncode == 0
    try:
        script = f"from vzpy.runtime.network import announce; print(','.join(announce({ip!r})))"
        direct = host_b.run([sys.executable, "-c", script])
        assert direct.returncode == 0 and direct.stdout.strip() == "eth0", direct.stdout + direct.stderr
        result = vzpy(host_a, "migrate", "--online", "--json", host_b.address, SMALL_CTID)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["announced"] == ["eth0"]
        assert status(host_b, SMALL_CTID) == "running" and status(host_a, SMALL_CTID) == "absent"
    finally:
        host_b.run(["ip", "link", "del", "vzx0"])
