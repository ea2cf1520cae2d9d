"""Pure logic of the migration ladder: which path two hosts take and why, pre-copy's stop rule, the parent
links the destination builds for pre-dump iterations, and the stats a dump leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vzpy.criu import features
from vzpy.criu import images as criu_images
from vzpy.criu.binary import CriuBinary, CriuVersion
from vzpy.criu.features import HostCapabilities
from vzpy.migrate import CopyFailed, MigrateUsage, ops, paths
from vzpy.migrate.precopy import StopRule


def facts(dirty: bool = False, lazy: bool | None = False, note: str = "") -> dict[str, Any]:
    return {
        "kernel": "6.1.0-27-cloud-amd64",
        "criu_version": "4.2.1",
        "mem_dirty_track": dirty,
        "page_server": True,
        "lazy_pages": lazy,
        "lazy_pages_note": note,
    }


# --- path selection --------------------------------------------------------------------------------------


def test_this_machines_kernel_takes_stop_and_copy_and_says_why() -> None:
    choice = paths.choose(facts(note="tee: Operation not permitted"), facts())
    assert choice.path == "stop-and-copy"
    assert choice.blocked["pre-copy"] is not None and "mem_dirty_track" in choice.blocked["pre-copy"]
    assert "6.1.0-27-cloud-amd64" in choice.blocked["pre-copy"]
    assert "tee: Operation not permitted" in (choice.blocked["post-copy"] or "")
    assert choice.reasons[-1].startswith("stop-and-copy:")
    assert choice.as_dict()["possible"] == ["stop-and-copy"]


def test_a_source_that_tracks_dirty_memory_pre_copies_by_default() -> None:
    assert paths.choose(facts(dirty=True), facts()).path == "pre-copy"


def test_post_copy_only_when_both_hosts_did_a_lazy_round_trip_and_it_is_asked_or_allowed() -> None:
    both = (facts(dirty=True, lazy=True), facts(lazy=True))
    assert paths.choose(*both).path == "pre-copy"
    assert paths.choose(*both, postcopy_allowed=True).path == "post-copy"
    assert paths.choose(*both, "post-copy").path == "post-copy"
    assert paths.choose(facts(lazy=True), facts(lazy=None), postcopy_allowed=True).path == "stop-and-copy"


@pytest.mark.parametrize(
    ("requested", "source", "dest", "says"),
    [
        ("pre-copy", facts(), facts(dirty=True), "the source's kernel 6.1.0-27-cloud-amd64 (CRIU 4.2.1) lacks"),
        ("post-copy", facts(lazy=True), facts(lazy=False, note="no uffd"), "on the destination's kernel"),
        ("post-copy", facts(lazy=None), facts(lazy=True), "not probed"),
    ],
)
def test_a_path_asked_for_that_cannot_be_taken_is_a_one_line_error(
    requested: str, source: dict[str, Any], dest: dict[str, Any], says: str
) -> None:
    with pytest.raises(paths.PathUnavailable) as info:
        paths.choose(source, dest, requested)
    message = info.value.message
    assert says in message and "\n" not in message and f"--{requested.replace('-', '')}" in message
    assert isinstance(info.value, MigrateUsage)


def test_a_ct_that_forks_fast_never_takes_post_copy() -> None:
    both = (facts(dirty=True, lazy=True), facts(lazy=True))
    assert paths.fork_rate_blocker("151", paths.POSTCOPY_MAX_FORKS_PER_SECOND - 0.5) is None
    fast = paths.fork_rate_blocker("151", 120.0)
    assert fast is not None and "CT 151" in fast and "120 processes a second" in fast
    with pytest.raises(paths.PathUnavailable) as info:
        paths.choose(*both, "post-copy", ct_postcopy_blocker=fast)
    assert "lazy-pages" in info.value.message and info.value.message.endswith("use --precopy")
    assert paths.choose(*both, postcopy_allowed=True, ct_postcopy_blocker=fast).path == "pre-copy"
    only_stop = paths.choose(facts(lazy=True), facts(lazy=True), postcopy_allowed=True, ct_postcopy_blocker=fast)
    assert only_stop.path == "stop-and-copy"


class _Cgroups:
    """A CT whose cgroup gains `per_read` new processes at every read (each lives until the next read)."""

    def __init__(self, per_read: int) -> None:
        self.per_read, self.next_pid = per_read, 1000

    def pids(self) -> list[int]:
        pids = list(range(self.next_pid, self.next_pid + self.per_read))
        self.next_pid += self.per_read
        return [1, *pids]


def test_fork_rate_counts_processes_that_appear_in_the_cgroup() -> None:
    from vzpy.migrate.preflight import fork_rate

    busy: Any = type("Ct", (), {"cgroups": _Cgroups(per_read=2)})()
    idle: Any = type("Ct", (), {"cgroups": _Cgroups(per_read=0)})()
    assert fork_rate(busy, seconds=0.1) > paths.POSTCOPY_MAX_FORKS_PER_SECOND
    assert fork_rate(idle, seconds=0.1) == 0


def test_stop_and_copy_can_always_be_asked_for() -> None:
    assert paths.choose(facts(dirty=True, lazy=True), facts(lazy=True), "stop-and-copy").path == "stop-and-copy"


def test_an_old_destination_that_sends_no_facts_still_receives_stop_and_copy_and_pre_copy() -> None:
    assert paths.choose(facts(dirty=True), {}).path == "pre-copy"
    assert paths.choose(facts(lazy=True), {}).blocked["post-copy"] is not None


@pytest.mark.parametrize(
    ("value", "allowed"), [("yes", True), ("YES", True), ("no", False), (None, False), ("", False)]
)
def test_the_post_copy_policy(value: str | None, allowed: bool) -> None:
    assert paths.postcopy_policy(value) is allowed


def test_host_capabilities_give_the_facts_the_choice_needs() -> None:
    caps = HostCapabilities(
        kernel="6.18",
        criu_path="/opt/criu",
        criu_version="4.2.1",
        features={"mem_dirty_track": False},
        page_server=True,
        lazy_pages=False,
        lazy_pages_note="tee",
        lazy_probe_seconds=0.5,
        freezer=None,
        iptables=False,
    )
    got = caps.migration_facts()
    assert got == {**facts(note="tee"), "kernel": "6.18"}
    assert paths.choose(got, got).path == "stop-and-copy"


# --- pre-copy's stop rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stop"),
    [
        ([16000], None),  # the first pass sends everything: always go on
        ([16000, 4000], None),
        ([16000, 64], "small (64 pages, at most 64)"),
        ([30], "small"),
        ([8256, 520, 520], "stopped shrinking (520 then 520 pages, less than 10% fewer)"),  # measured in the lab
        ([16000, 500, 460], "stopped shrinking"),  # 8% fewer
        ([16000, 500, 440], None),  # 12% fewer
        ([16000, 8000, 4000, 2000, 1000, 500, 250, 120], "8 iterations done"),
    ],
)
def test_the_default_stop_rule(written: list[int], stop: str | None) -> None:
    why = StopRule().why_stop(written)
    assert why is None if stop is None else (why is not None and stop in why), why


def test_the_stop_rule_is_tunable_and_checked() -> None:
    rule = StopRule(max_iterations=3, small_pages=1000, min_shrink=0)
    assert rule.why_stop([16000, 900]) is not None
    assert "stopped shrinking" in (rule.why_stop([16000, 5000, 5001]) or "")
    assert rule.why_stop([16000, 5000, 5000]) == "3 iterations done"  # 0%: only growth stops it
    for bad in ({"max_iterations": 0}, {"small_pages": -1}, {"min_shrink": 100}):
        with pytest.raises(MigrateUsage):
            StopRule(**bad)  # type: ignore[arg-type]


# --- the destination's parent links ----------------------------------------------------------------------


def test_each_pre_dump_there_links_to_the_one_before(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for sub in ("pre-1", "pre-2"):
        (images / sub).mkdir(parents=True)
    ops._link_parent(images, images / "pre-2", "pre-1")
    ops._link_parent(images, images, "pre-2")
    assert (images / "pre-2" / "parent").readlink() == Path("../pre-1")
    assert (images / "parent").readlink() == Path("pre-2")
    assert (images / "parent" / "parent").resolve() == (images / "pre-1").resolve()
    ops._link_parent(images, images, "")  # a retried stop-and-copy: no parent
    assert not (images / "parent").is_symlink()


@pytest.mark.parametrize("parent", ["pre-9", "images"])
def test_a_parent_that_is_not_a_pre_dump_there_is_refused(tmp_path: Path, parent: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CopyFailed, match="no images of pre-dump"):
        ops._link_parent(images, images, parent)


# --- what a dump counted ---------------------------------------------------------------------------------


def test_dump_stats_reads_crius_stats_image(tmp_path: Path) -> None:
    from pycriu import images as pycriu_images

    dump = {
        "freezing_time": 1,
        "frozen_time": 2,
        "memdump_time": 3,
        "memwrite_time": 4,
        "pages_scanned": 100,
        "pages_skipped_parent": 60,
        "pages_written": 40,
        "pages_lazy": 0,
    }
    with open(tmp_path / "stats-dump", "wb") as f:
        pycriu_images.dump({"magic": "STATS", "entries": [{"dump": dump}]}, f)
    stats = criu_images.dump_stats(tmp_path)
    assert stats is not None
    assert (stats["pages_written"], stats["pages_skipped_parent"], stats["pages_lazy"]) == (40, 60, 0)
    assert criu_images.dump_stats(tmp_path / "nothing") is None


# --- the facts' cache: a lazy-pages probe that ran out of time is no fact -----------------------------------


@pytest.mark.parametrize(
    ("lazy", "note", "kept"),
    [
        (False, "a lazy-pages round trip failed here: dump.log: page-pipe: tee: 65536: Operation not permitted", True),
        (True, "lazy dump + lazy-pages + lazy restore round trip worked", True),
        (False, f"a lazy-pages round trip failed here: {features.NO_LOG_ERROR}", False),
        (False, f"{features.NOT_STARTED}: timed out", False),
    ],
)
def test_only_a_conclusive_lazy_probe_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lazy: bool, note: str, kept: bool
) -> None:
    facts_run = {
        "features": dict.fromkeys(features.CRIU_FEATURES, True),
        "page_server": True,
        "lazy_pages": lazy,
        "lazy_pages_note": note,
        "lazy_probe_seconds": 20.0,
    }
    monkeypatch.setattr(features, "_criu_facts", lambda binary, probe_lazy: facts_run)
    binary = CriuBinary(tmp_path / "criu", CriuVersion(4, 2, 1))
    caps = features.detect_capabilities(binary, tmp_path / "cache")
    assert caps.lazy_pages is lazy and (tmp_path / "cache" / features.CACHE_FILE).exists() is kept


def test_pagemap_pages_counts_what_a_lazy_dump_kept_back(tmp_path: Path) -> None:
    from pycriu import images as pycriu_images

    entries = [
        {"pages_id": 1},
        {"vaddr": "0x400000", "compat_nr_pages": 3, "flags": "PE_PRESENT"},
        {"vaddr": "0x600000", "compat_nr_pages": 0, "nr_pages": 100, "flags": "PE_PRESENT | PE_LAZY"},
        {"vaddr": "0x700000", "compat_nr_pages": 0, "nr_pages": 5, "flags": "PE_LAZY"},
        {"vaddr": "0x800000", "compat_nr_pages": 0, "nr_pages": 7, "flags": "PE_PARENT"},
    ]
    for pid in (1, 2):
        with open(tmp_path / f"pagemap-{pid}.img", "wb") as f:
            pycriu_images.dump({"magic": "PAGEMAP", "entries": entries}, f)
    assert criu_images.pagemap_pages(tmp_path) == (6, 210)
