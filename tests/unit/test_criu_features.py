"""The migration plan and report derived from host capabilities, freezer detection, and the cache file."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vzpy.criu.features import (
    CACHE_FILE,
    CRIU_FEATURES,
    HostCapabilities,
    _load_cache,
    _save_cache,
    derive_plan,
    find_freezer,
    report,
)
from vzpy.criu.options import NetworkLock
from vzpy.host.mounts import fstype_at, parse_mountinfo

TEE_FAILURE = "a lazy-pages round trip failed here: dump.log: page-pipe: tee: 65536: Operation not permitted"


def host(**changes: Any) -> HostCapabilities:
    """A host like the one vzpy is developed on: everything but mem_dirty_track, lazy pages broken."""
    features = {name: name != "mem_dirty_track" for name in CRIU_FEATURES}
    features.update(changes.pop("features", {}))
    caps = HostCapabilities(
        kernel="6.18.44",
        criu_path="/opt/vzpy/criu/bin/criu",
        criu_version="4.2.1",
        features=features,
        page_server=True,
        lazy_pages=False,
        lazy_pages_note=TEE_FAILURE,
        lazy_probe_seconds=0.16,
        freezer=("v1", "/sys/fs/cgroup/freezer"),
        iptables=True,
    )
    return replace(caps, **changes)


# --- plan ---


def test_without_dirty_tracking_the_plan_is_stop_and_copy_over_the_page_server() -> None:
    plan = derive_plan(host())
    assert plan.memory == "stop-and-copy"
    assert plan.page_server
    assert plan.sentences[0] == (
        "pre-copy migration unavailable: kernel lacks soft-dirty tracking (mem_dirty_track); "
        "using stop-and-copy with page-server streaming"
    )


def test_with_dirty_tracking_the_plan_is_pre_copy() -> None:
    plan = derive_plan(host(features={"mem_dirty_track": True}))
    assert plan.memory == "pre-copy"
    assert plan.sentences[0].startswith("pre-copy migration available")


def test_without_page_server_images_are_copied() -> None:
    plan = derive_plan(host(page_server=False))
    assert not plan.page_server
    assert plan.sentences[0].endswith("using stop-and-copy with image files copied after the dump")


def test_post_copy_needs_a_working_round_trip_not_just_the_uffd_bit() -> None:
    plan = derive_plan(host())
    assert not plan.postcopy_available
    assert f"post-copy migration unavailable: {TEE_FAILURE}" in plan.sentences


def test_post_copy_available_when_the_round_trip_worked() -> None:
    plan = derive_plan(host(lazy_pages=True, lazy_pages_note="worked"))
    assert plan.postcopy_available
    assert plan.memory == "stop-and-copy"  # never picked by default
    assert "post-copy migration available: a lazy-pages round trip worked here" in plan.sentences


def test_post_copy_not_probed_is_not_available() -> None:
    plan = derive_plan(host(lazy_pages=None, lazy_pages_note="not probed"))
    assert not plan.postcopy_available
    assert any(s.startswith("post-copy migration not verified") for s in plan.sentences)


def test_network_lock_prefers_nftables() -> None:
    plan = derive_plan(host())
    assert plan.network_lock is NetworkLock.NFTABLES
    assert plan.tcp_established
    assert "network lock: nftables (network_lock_nftables)" in plan.sentences


def test_network_lock_falls_back_to_iptables() -> None:
    plan = derive_plan(host(features={"network_lock_nftables": False}))
    assert plan.network_lock is NetworkLock.IPTABLES
    assert plan.tcp_established


def test_without_any_network_lock_tcp_cannot_migrate() -> None:
    plan = derive_plan(host(features={"network_lock_nftables": False}, iptables=False))
    assert plan.network_lock is None
    assert not plan.tcp_established
    assert any(s.startswith("network lock unavailable") for s in plan.sentences)


def test_freezer_decides_how_the_ct_is_frozen() -> None:
    assert derive_plan(host()).freeze_cgroup
    plan = derive_plan(host(freezer=None))
    assert not plan.freeze_cgroup
    assert "no cgroup freezer: CRIU freezes tasks one by one with ptrace" in plan.sentences


# --- report ---


def test_report_rows_cover_every_feature_that_matters() -> None:
    rows = {row.feature: row for row in report(host()).rows}
    assert set(rows) == {
        *CRIU_FEATURES,
        "lazy_pages",
        "tcp_repair",
        "page_server",
        "cgroup_freezer",
        "iptables",
        "kerndat_cache",
    }
    assert not rows["mem_dirty_track"].ok
    assert rows["uffd"].ok and not rows["lazy_pages"].ok  # the bit says yes, the round trip no
    assert rows["lazy_pages"].note == TEE_FAILURE
    assert rows["cgroup_freezer"].note == "cgroup v1 freezer at /sys/fs/cgroup/freezer"
    feature, ok, note = rows["tcp_repair"]  # rows are (feature, ok, note) tuples
    assert (feature, ok) == ("tcp_repair", True) and note


def test_report_as_dict_is_json() -> None:
    data = json.loads(json.dumps(report(host()).as_dict()))
    assert data["criu"] == {"path": "/opt/vzpy/criu/bin/criu", "version": "4.2.1"}
    assert data["features"]["mem_dirty_track"]["ok"] is False
    assert data["plan"]["memory"] == "stop-and-copy"
    assert data["plan"]["network_lock"] == "nftables"
    assert data["messages"][0].startswith("pre-copy migration unavailable")


def test_criu_keeps_its_kernel_probe_only_on_a_tmpfs_run() -> None:
    cached = {row.feature: row for row in report(host()).rows}["kerndat_cache"]
    uncached = {row.feature: row for row in report(host(run_fstype="ext4")).rows}["kerndat_cache"]
    assert cached.ok and cached.note == "CRIU caches its kernel probe in /run/criu.kdat (tmpfs)"
    assert not uncached.ok and uncached.note.startswith(
        "/run is not a tmpfs (ext4): CRIU probes the kernel afresh in every dump and restore"
    )


def test_the_filesystem_of_a_path_is_its_deepest_latest_mount() -> None:
    table = parse_mountinfo(
        b"20 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"21 20 0:5 / /run rw - tmpfs tmpfs rw\n"
        b"22 21 0:6 / /run rw - ext4 /dev/sdb1 rw\n"
        b"23 21 0:7 / /run/user rw - tmpfs tmpfs rw\n"
        b"24 20 0:8 / /runx rw - tmpfs tmpfs rw\n"
    )
    assert fstype_at(Path("/run"), table) == "ext4"  # mounted over the tmpfs
    assert fstype_at(Path("/run/user/0"), table) == "tmpfs"
    assert fstype_at(Path("/srv"), table) == "ext4"
    assert fstype_at(Path("/run"), table[:1]) == "ext4"
    assert fstype_at(Path("/run"), []) == ""


# --- freezer detection ---

V1_MOUNTS = parse_mountinfo(
    b"22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw\n"
    b"30 22 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
    b"31 22 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory\n"
    b"32 22 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,freezer\n"
)


def test_v1_freezer_is_found() -> None:
    assert find_freezer(V1_MOUNTS) == ("v1", "/sys/fs/cgroup/freezer")


def test_v2_freezer_needs_cgroup_freeze_files(tmp_path: Path) -> None:
    mounts = parse_mountinfo(b"30 1 0:27 / " + os.fsencode(tmp_path) + b" rw,nosuid - cgroup2 cgroup2 rw\n")
    assert find_freezer(mounts) is None
    (tmp_path / "system.slice").mkdir()
    (tmp_path / "system.slice" / "cgroup.freeze").write_text("0\n")
    assert find_freezer(mounts) == ("v2", str(tmp_path))


def test_no_cgroups_no_freezer() -> None:
    assert find_freezer(parse_mountinfo(b"20 1 0:5 / /proc rw - proc proc rw\n")) is None


# --- cache file ---

KEY = {"format": 1, "kernel": "6.18.44", "criu_path": "/c", "criu_version": "4.2.1", "criu_mtime_ns": 1}
FACTS = {
    "features": {name: True for name in CRIU_FEATURES},
    "page_server": True,
    "lazy_pages": False,
    "lazy_pages_note": TEE_FAILURE,
    "lazy_probe_seconds": 0.2,
}


def test_cache_round_trip(tmp_path: Path) -> None:
    _save_cache(tmp_path / "cache", KEY, FACTS)
    assert _load_cache(tmp_path / "cache", KEY) == FACTS


@pytest.mark.parametrize("field", ["kernel", "criu_version", "criu_path", "criu_mtime_ns"])
def test_cache_of_another_kernel_or_criu_is_ignored(tmp_path: Path, field: str) -> None:
    _save_cache(tmp_path, KEY, FACTS)
    assert _load_cache(tmp_path, {**KEY, field: "other"}) is None


def test_corrupt_or_foreign_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert _load_cache(tmp_path, KEY) is None
    (tmp_path / CACHE_FILE).write_text(json.dumps({"key": KEY, "facts": {"features": {}}}))
    assert _load_cache(tmp_path, KEY) is None


def test_unwritable_cache_dir_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    _save_cache(blocker / "cache", KEY, FACTS)  # cannot create a dir under a file: silently skipped
    assert _load_cache(blocker / "cache", KEY) is None
