"""A CT started by vzpy is checkpointable by construction: the `criu` binary itself dumps and restores it.

This uses CRIU directly (not vzpy's chkpnt), with the options vzpy's checkpoint code uses, so that a
container change that makes CRIU refuse shows up here first. If this fails, fix the container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import criu_binary, http_get, ns_pids

pytestmark = pytest.mark.root


def criu(*args: str, images: Path, log: str) -> None:
    binary = criu_binary()
    assert binary, "no criu binary: run `make setup`"
    result = subprocess.run([binary, *args, "-D", str(images), "-v4", "-o", log], capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in (images / log).read_text().splitlines() if "Error" in line]
        pytest.fail(f"criu {args[0]} refused the CT (log {images / log}):\n" + "\n".join(errors[-10:]))


def test_criu_dumps_and_restores_a_running_ct(running_ct, tmp_path: Path) -> None:
    vz, ctid, ip = running_ct
    assert http_get(ip) == "hello from 101\n"
    init = vz.state(ctid)["init_pid"]
    freezer = f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{ctid}"
    images = tmp_path / "images"
    images.mkdir(mode=0o700)

    criu(
        "dump",
        "-t",
        str(init),
        "--tcp-established",
        "--network-lock",
        "nftables",
        "--freeze-cgroup",
        freezer,
        "--manage-cgroups=soft",
        "--leave-running",
        images=images,
        log="dump.log",
    )
    assert json.loads(vz.run("status", "--json", ctid).stdout)["status"] == "running"
    assert http_get(ip) == "hello from 101\n", "the CT did not keep running after --leave-running"
    assert list(images.glob("pages-*.img")), "CRIU dumped no memory pages"
    assert list(images.glob("netdev-*.img")), "CRIU did not dump the CT's network namespace"

    vz.run("stop", "--fast", ctid, check=True)
    root = vz.base / "root" / ctid
    root.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(vz.private(ctid)), str(root)], check=True)
    subprocess.run(["mount", "--make-private", str(root)], check=True)
    for controller in ("freezer", "memory", "cpu", "pids"):
        Path(f"/sys/fs/cgroup/{controller}/{vz.cgroup_parent}/{ctid}").mkdir(parents=True, exist_ok=True)
    pidfile = images / "restored.pid"
    criu(
        "restore",
        "--root",
        str(root),
        "--tcp-established",
        "--network-lock",
        "nftables",
        "--manage-cgroups=soft",
        "--veth-pair",
        f"eth0={vz.veth(ctid)}",
        "--restore-detached",
        "--pidfile",
        str(pidfile),
        images=images,
        log="restore.log",
    )
    restored = int(pidfile.read_text())
    try:
        subprocess.run(["ip", "link", "set", vz.veth(ctid), "up"], check=True)
        subprocess.run(["ip", "route", "replace", f"{ip}/32", "dev", vz.veth(ctid)], check=True)
        assert http_get(ip) == "hello from 101\n", "the restored CT's service does not answer"
        assert ns_pids(restored)[-1] == 1, "the restored init is not PID 1 of its namespace"
    finally:
        os.kill(restored, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (Path(freezer) / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
    # what the restore left (root mount, cgroups, route) is cleaned up by the next start
    vz.run("start", ctid, check=True)
    assert http_get(ip) == "hello from 101\n"


def test_vzpy_check_reports_this_hosts_features_truthfully() -> None:
    result = subprocess.run(["vzpy", "check", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    binary = criu_binary()
    for feature in ("mem_dirty_track", "uffd", "network_lock_nftables"):
        probe = subprocess.run([binary, "check", "--feature", feature], capture_output=True)
        assert report["features"][feature]["ok"] == (probe.returncode == 0), feature
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    assert report["criu"]["version"] in version
    pre_copy = report["features"]["mem_dirty_track"]["ok"]
    assert any(("pre-copy migration unavailable" in m) != pre_copy for m in report["messages"])
    text = subprocess.run(["vzpy", "check"], capture_output=True, text=True).stdout
    assert f"CRIU {report['criu']['version']}" in text
