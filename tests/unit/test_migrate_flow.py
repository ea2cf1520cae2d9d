"""The source's migration flow without root or a network: a fake remote agent and fake CT operations
record what the flow does, in order. Rollback order, the point of no return (a commit whose reply is
lost never resumes the source), the frozen-time budget, and --recover in both branches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from helpers import write_vz_conf
from vzpy.config import GlobalConfig
from vzpy.container import Container, RunState
from vzpy.errors import ChkpntError, VzError
from vzpy.migrate import (
    CheckpointFailed,
    ConnectionBroken,
    CopyFailed,
    MigrateError,
    MigrateUsage,
    MigrationLocked,
    RestoreFailed,
    fault,
    flow,
    marker,
    paths,
    precopy,
)
from vzpy.migrate.ssh import Target
from vzpy.stage import Stage

CTID = "101"
HOST = "10.0.0.2"


@dataclass
class World:
    """What happened, in order: ("src", what) for the source CT, ("dst", op) for agent calls."""

    journal: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, BaseException] = field(default_factory=dict)  # agent op -> raised instead of doing it
    lose_reply: set[str] = field(default_factory=set)  # agent ops done, whose reply is lost
    committed: bool = False
    usable: bool = True
    remote_state: str = "prepared"  # what recover_state says
    source_facts: dict[str, Any] = field(default_factory=lambda: facts())  # this host's (no soft-dirty)
    dest_facts: dict[str, Any] = field(default_factory=lambda: facts())
    predump_pages: list[int] = field(default_factory=list)  # pages each pre-dump writes
    frozen_pages: int = 50  # pages the final dump writes
    lazy_pages: int = 0  # pages a lazy dump serves after the restore there
    page_servers: list[tuple[str, str]] = field(default_factory=list)  # (subdir, parent) started there
    dump_parents: list[str | None] = field(default_factory=list)  # what the dumps were told to build on
    lazy_release: threading.Event = field(default_factory=threading.Event)  # the lazy dump may end
    stats: dict[str, int] = field(default_factory=dict)  # what the last (fake) CRIU dump counted
    lazy_never_ready: bool = False  # the lazy dump never says its images are written
    remaps: list[str] = field(default_factory=list)  # link-remap files the dump put in the CT's tree

    def predumps(self) -> int:
        return self.names("src").count("pre-dump")

    def did(self, side: str, what: str) -> None:
        self.journal.append((side, what))

    def names(self, side: str) -> list[str]:
        return [what for s, what in self.journal if s == side]


def facts(dirty: bool = False, lazy: bool | None = False) -> dict[str, Any]:
    """A host's migration facts (HostCapabilities.migration_facts)."""
    return {
        "kernel": "6.1.0-test",
        "criu_version": "4.2.1",
        "mem_dirty_track": dirty,
        "page_server": True,
        "lazy_pages": lazy,
        "lazy_pages_note": "" if lazy else "tee: Operation not permitted",
    }


class FakeAgent:
    def __init__(self, world: World) -> None:
        self.world = world
        self.hello: dict[str, Any] = {"criu": {"ok": True, "migration": world.dest_facts}}

    @property
    def usable(self) -> bool:
        return self.world.usable

    def _call(self, op: str, result: Any = None, commit: bool = False) -> Any:
        world = self.world
        if not world.usable:
            raise ConnectionBroken(f"connection unusable ({op})")
        world.did("dst", op)
        if op in world.fail:
            error = world.fail[op]
            if isinstance(error, ConnectionBroken):
                world.usable = False
            raise error
        if commit:
            world.committed = True
        if op in world.lose_reply:
            world.usable = False
            raise ConnectionBroken(f"the destination closed the connection during {op}")
        return result

    def ct_exists(self, ctid: str, ips: Any = (), *, timeout: float | None = None) -> dict[str, Any]:
        return self._call("ct_exists", {"exists": self.world.committed, "ips_in_use": {}})

    def prepare(self, ctid: str, conf_text: str, *, token: str, keep_dst: bool = False) -> dict[str, Any]:
        return self._call("prepare", {"private": "/vz/private/101", "images_dir": "/vz/dump/Migrate.101/images"})

    def page_server_start(self, ctid: str, subdir: str = "", parent: str = "") -> int:
        self.world.page_servers.append((subdir, parent))
        return self._call("page_server_start", 4321)

    def lazy_port(self, ctid: str) -> int:
        return self._call("lazy_port", 4322)

    def lazy_wait(self, ctid: str, *, timeout: float) -> int:
        return self._call("lazy_wait", 0)

    def page_server_wait(self, ctid: str, subdir: str = "", timeout: float = 600) -> int:
        return self._call("page_server_wait", 1000)

    def page_server_stop(self, ctid: str, subdir: str = "", *, timeout: float | None = None) -> None:
        self._call("page_server_stop")

    def put_images(self, ctid: str, files: Any, *, timeout: float | None = None) -> int:
        return self._call("put_images", len(files))

    restore_takes_images = False  # protocol 1.1

    def restore(
        self, ctid: str, fs_fingerprint: Any, *, timeout: float = 600, lazy_port: int | None = None, images: Any = None
    ) -> int:
        self.world.images_with_restore = images
        return self._call("restore" if lazy_port is None else "lazy restore", 77)

    def resume(self, ctid: str, *, timeout: float, held: Any = None) -> dict[str, Any]:
        reply = self._call("resume", {"announced": ["eth0"], "frozen": 0.5}, commit=True)
        self.world.lazy_release.set()  # it runs there: the lazy pages go
        return reply

    def start(self, ctid: str, *, start: bool, timeout: float) -> dict[str, Any]:
        return self._call("start", {}, commit=True)

    def cleanup(self, ctid: str, keep_dst: bool | None = None, *, wait: float | None = None) -> list[str]:
        return self._call("cleanup", [])

    def recover_state(self, ctid: str, *, wait: float) -> dict[str, Any]:
        return self._call("recover_state", {"state": "committed" if self.world.committed else self.world.remote_state})

    def recover_commit(self, ctid: str, *, start: bool) -> dict[str, Any]:
        return self._call("recover_commit", {"woken": True})

    def close(self) -> None:
        self.world.did("dst", "bye")


class FakeLink:
    def __init__(self, world: World) -> None:
        self.agent = FakeAgent(world)
        self.session = SimpleNamespace(openssh=lambda **kw: "openssh")
        self.world = world

    def close(self) -> None:
        self.agent.close()


class FakeTunnel:
    local_port = 5555

    def __init__(self, world: World) -> None:
        self.world = world

    def start(self) -> FakeTunnel:
        self.world.did("src", "tunnel up")
        return self

    def close(self) -> None:
        self.world.did("src", "tunnel down")

    def __enter__(self) -> FakeTunnel:  # a pre-dump's own tunnel: not journaled
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def gconf(tmp_path: Path) -> GlobalConfig:
    return GlobalConfig.load(write_vz_conf(tmp_path / "vz.conf", tmp_path))


def make_ct(gconf: GlobalConfig, stage: Stage = Stage.RUNNING) -> Container:
    gconf.confdir.mkdir(parents=True, exist_ok=True)
    gconf.ct_conf_path(CTID).write_text('HOSTNAME="web"\nIP_ADDRESS="10.0.0.101"\n')
    ct = Container(CTID, gconf)
    (ct.private / "etc").mkdir(parents=True)
    set_stage(ct, stage)
    return ct


def set_stage(ct: Container, stage: Stage) -> None:
    """A live stage is held by this test process standing in for the CT's init."""
    me = psutil.Process()
    ct.save_state(RunState(stage=stage, init_pid=me.pid, init_started=me.create_time()))


@pytest.fixture
def world(gconf: GlobalConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World()

    def source(what: str, stage: Stage | None = None) -> Any:
        def act(ct: Container, *args: Any, **kw: Any) -> None:
            w.did("src", what)
            if stage is not None:
                set_stage(ct, stage)
            if what in w.fail:
                raise w.fail[what]

        return act

    def dump_images(ct: Container, images: Path, *args: Any, **kw: Any) -> None:
        lazy = kw.get("lazy", False)
        w.did("src", "lazy dump" if lazy else "dump")
        w.dump_parents.append(kw.get("parent"))
        if "dump" in w.fail:
            raise w.fail["dump"]
        if lazy:
            if not w.lazy_never_ready:
                kw["on_images"]()
            if not w.lazy_release.wait(10):
                raise ChkpntError("the fake lazy dump was never released")
            if "lazy pages" in w.fail:
                raise w.fail["lazy pages"]
        w.stats = {"pages_written": w.frozen_pages, "pages_lazy": w.lazy_pages if lazy else 0}

    def pre_dump_images(ct: Container, images: Path, page_server: Any, *, parent: str | None) -> None:
        w.did("src", "pre-dump")
        w.dump_parents.append(parent)
        if "pre-dump" in w.fail:
            raise w.fail["pre-dump"]
        w.stats = {"pages_written": w.predump_pages[w.predumps() - 1], "pages_skipped_parent": 7}

    logs = gconf.dumpdir / ".logs" / CTID

    def dump_stats(work_dir: Path) -> dict[str, int]:
        assert work_dir == logs  # CRIU writes its stats into its work dir, not the images dir
        return w.stats

    checkpoint = SimpleNamespace(
        suspend=source("suspend", Stage.SUSPENDED),
        wake=source("wake", Stage.RUNNING),
        dump_images=dump_images,
        pre_dump_images=pre_dump_images,
        log_dir=lambda ct: logs,
        memory_usage=lambda ct: 1 << 20,
        fs_fingerprint=lambda ct: {"files": {}},
    )
    lifecycle = SimpleNamespace(
        stop=source("stop", Stage.STOPPED), start=source("start", Stage.RUNNING), kill=source("kill", Stage.STOPPED)
    )
    monkeypatch.setattr(flow, "checkpoint", checkpoint)
    monkeypatch.setattr(flow, "lifecycle", lifecycle)
    monkeypatch.setattr(flow, "connect", lambda options: (w.did("dst", "connect"), FakeLink(w))[1])
    monkeypatch.setattr(flow, "OpenSshTunnel", lambda ssh, port: FakeTunnel(w))
    monkeypatch.setattr(flow, "ReverseSshTunnel", lambda ssh, there, here: FakeTunnel(w))
    monkeypatch.setattr(flow, "listening", lambda address, port: True)
    monkeypatch.setattr(flow.LazyDump, "stop", lambda self: (w.did("src", "lazy stop"), w.lazy_release.set()))
    pagemap_pages = lambda images: (w.frozen_pages, w.lazy_pages)  # noqa: E731
    linked_remaps = lambda images: list(w.remaps)  # noqa: E731
    monkeypatch.setattr(
        flow,
        "criu_images",
        SimpleNamespace(dump_stats=dump_stats, pagemap_pages=pagemap_pages, linked_remaps=linked_remaps),
    )

    def remaps(what: str) -> Callable[[Container, list[str]], None]:
        return lambda ct, names: w.did("src", f"{what} {' '.join(names)}") if names else None

    monkeypatch.setattr(flow, "linkremap", SimpleNamespace(reinstate=remaps("reinstate"), remove=remaps("remove")))
    monkeypatch.setattr(flow, "source_migration_facts", lambda ct: w.source_facts)
    monkeypatch.setattr(flow, "check", lambda *a, **kw: [])
    monkeypatch.setattr(flow, "disk_usage", lambda path: 0)
    monkeypatch.setattr(flow, "dump_blockers", lambda ct: [])

    def sync_tree(source_dir: Path, dest: str, ssh: Any, **kw: Any) -> Any:
        w.did("src", "sync")
        if "sync" in w.fail:
            raise w.fail["sync"]
        return SimpleNamespace(bytes=10, sent=10)

    monkeypatch.setattr(flow, "sync_tree", sync_tree)

    class FakeFinalSync:  # vzpy.migrate.finalsync: the frozen final sync's rsync runs, journaled as a sync
        started = False

        def start(self, *args: Any) -> None:
            self.started = True

        def run(self, changes: Any, timeout: float) -> list[Any]:
            assert self.started, "the final sync's rsync runs were never started"
            sync_tree(Path(), "", None)
            return []

        def close(self) -> None:
            self.started = False

    monkeypatch.setattr(flow, "FinalSync", FakeFinalSync)
    monkeypatch.delenv(fault.ENV, raising=False)
    yield w


def options(online: bool = True, **kw: Any) -> flow.MigrateOptions:
    return flow.MigrateOptions(target=Target("root", HOST), online=online, **kw)


def run(ct: Container, online: bool = True, **kw: Any) -> flow.Summary:
    return flow.Migration(ct, options(online, **kw), progress=lambda message: None).run()


# --- success ---------------------------------------------------------------------------------------------


def test_online_success_runs_every_step_in_order_and_retires_the_source(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    summary = run(ct)
    assert world.names("dst") == [
        "connect",
        "ct_exists",
        "prepare",
        "page_server_start",
        "page_server_wait",
        "put_images",
        "restore",
        "resume",
        "bye",
    ]
    assert world.names("src") == ["tunnel up", "sync", "suspend", "dump", "sync", "tunnel down", "kill"]
    assert summary.announced == ["eth0"] and summary.warnings == []
    assert not ct.conf_path.exists() and ct.conf_path.with_name(f"{CTID}.conf.migrated").exists()
    assert not ct.private.exists()
    assert not marker.path(gconf, CTID).exists()


def test_a_destination_on_protocol_1_2_gets_the_images_with_the_restore(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct = make_ct(gconf)
    monkeypatch.setattr(FakeAgent, "restore_takes_images", True)
    run(ct)
    dst = world.names("dst")
    assert "put_images" not in dst and dst[dst.index("page_server_wait") + 1] == "restore"
    assert isinstance(world.images_with_restore, dict)  # type: ignore[attr-defined]


# --- before the point of no return: roll back ----------------------------------------------------------------


def test_a_failed_restore_cleans_the_destination_before_the_source_resumes(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    world.fail["restore"] = RestoreFailed("criu restore failed")
    with pytest.raises(RestoreFailed):
        run(ct)
    after = world.journal[world.journal.index(("dst", "restore")) + 1 :]
    # the restored (frozen) copy there goes first, then the source wakes, then the tunnel and the rest
    assert after[:3] == [("dst", "cleanup"), ("src", "wake"), ("src", "tunnel down")]
    assert after.count(("src", "wake")) == 1
    assert ("dst", "resume") not in world.journal
    assert ct.stage() is Stage.RUNNING and ct.conf_path.exists()
    assert not marker.path(gconf, CTID).exists()


@pytest.mark.parametrize(
    ("online", "step"),
    [
        (True, "prepare"),
        (True, "tunnel"),
        (True, "sync"),
        (True, "suspend"),
        (True, "final-sync"),
        (True, "dump"),
        (True, "copy-images"),
        (True, "restore"),
        (True, "resume"),
        (False, "sync"),
        (False, "stop"),
        (False, "final-sync"),
        (False, "start"),
    ],
)
def test_an_injected_failure_before_the_commit_leaves_the_ct_running_here(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch, online: bool, step: str
) -> None:
    ct = make_ct(gconf)
    monkeypatch.setenv(fault.ENV, f"source:fail:{step}")
    with pytest.raises(fault.InjectedFault):
        run(ct, online)
    assert ct.stage() is Stage.RUNNING and ct.conf_path.exists()
    assert not world.committed and (("dst", "cleanup") in world.journal) == (step != "prepare")
    assert world.names("src").count("wake") + world.names("src").count("start") <= 1
    assert not marker.path(gconf, CTID).exists()


def test_the_frozen_time_budget_aborts_and_resumes_the_source(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)

    def slow_dump(ct: Container, *args: Any, **kw: Any) -> None:
        world.did("src", "dump")
        time.sleep(0.05)  # longer than the whole budget
        raise ChkpntError(f"criu dump timed out after {kw['timeout']:.2f}s (CRIU killed)")

    flow.checkpoint.dump_images = slow_dump
    with pytest.raises(flow.FrozenTooLong, match=r"frozen for .* --max-frozen 0.03s") as info:
        run(ct, max_frozen=0.03)
    assert "dump" in info.value.message and "resumed here" in info.value.message
    assert ct.stage() is Stage.RUNNING and ("dst", "restore") not in world.journal


@pytest.mark.parametrize("remove_area", [True, False])
def test_preflight_is_told_what_stands_where_r_no_keeps_the_area(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch, remove_area: bool
) -> None:
    ct = make_ct(gconf)
    ct.private.with_name(f"{CTID}.migrated").write_text("in the way")
    facts: list[Any] = []
    monkeypatch.setattr(flow, "check", lambda hello, exists, source, **kw: facts.append(source) or [])
    run(ct, remove_area=remove_area)
    expected = "" if remove_area else str(ct.private.with_name(f"{CTID}.migrated"))
    assert [source.old_area_in_way for source in facts] == [expected]


def test_a_failed_dump_wakes_the_ct_before_asking_the_destination_anything(gconf: GlobalConfig, world: World) -> None:
    """Over a link gone silent each request to the destination waits out its timeout: the CT must not wait
    frozen behind them."""
    ct = make_ct(gconf)
    world.fail["dump"] = ChkpntError("criu dump of pid 7 ran past its 2s; its page-server connection was closed")
    with pytest.raises(CheckpointFailed, match="page-server connection was closed"):
        run(ct)
    journal = world.journal
    frozen = journal[journal.index(("src", "dump")) : journal.index(("src", "wake"))]
    assert [entry for entry in frozen if entry[0] == "dst"] == []
    assert ("dst", "page_server_stop") in journal[journal.index(("src", "wake")) :]
    assert ct.stage() is Stage.RUNNING


def test_a_definite_no_from_the_destination_rolls_back_after_the_commit_request(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    world.fail["resume"] = RestoreFailed("could not be resumed")  # an error reply: the agent uncommitted
    with pytest.raises(RestoreFailed):
        run(ct)
    dst = world.names("dst")
    assert dst[dst.index("resume") :][:3] == ["resume", "ct_exists", "cleanup"]  # asked, then rolled back
    assert ct.stage() is Stage.RUNNING and not marker.path(gconf, CTID).exists()


# --- the point of no return -------------------------------------------------------------------------------


@pytest.mark.parametrize("committed", [True, False])
def test_a_lost_reply_to_resume_never_resumes_the_source(gconf: GlobalConfig, world: World, committed: bool) -> None:
    ct = make_ct(gconf)
    if committed:
        world.lose_reply.add("resume")  # resumed there, the reply lost
    else:
        world.fail["resume"] = ConnectionBroken("the link dropped before the request arrived")
    with pytest.raises(flow.OutcomeInDoubt) as info:
        run(ct)
    assert f"vzpy migrate --recover root@{HOST} {CTID}" in info.value.message
    assert info.value.exit_code == ConnectionBroken.exit_code
    suspended_at = world.journal.index(("src", "suspend"))
    assert ("src", "wake") not in world.journal[suspended_at:]
    assert ("dst", "cleanup") not in world.journal
    assert ct.stage() is Stage.SUSPENDED and ct.conf_path.exists()
    record = json.loads(marker.path(gconf, CTID).read_text())
    assert record["host"] == f"root@{HOST}" and record["online"] is True


def test_the_marker_is_written_before_the_commit_request_is_sent(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    seen: list[bool] = []
    resume = FakeAgent.resume

    def watching(self: FakeAgent, ctid: str, *, timeout: float, held: Any = None) -> dict[str, Any]:
        seen.append(marker.path(gconf, CTID).exists())
        return resume(self, ctid, timeout=timeout, held=held)

    FakeAgent.resume = watching  # type: ignore[method-assign]
    try:
        run(ct)
    finally:
        FakeAgent.resume = resume  # type: ignore[method-assign]
    assert seen == [True] and not marker.path(gconf, CTID).exists()


def test_offline_commit_with_a_lost_reply_leaves_the_source_stopped(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    world.lose_reply.add("start")
    with pytest.raises(flow.OutcomeInDoubt, match="stays stopped"):
        run(ct, online=False)
    assert world.names("src") == ["sync", "stop", "sync"]
    assert ct.stage() is Stage.STOPPED and json.loads(marker.path(gconf, CTID).read_text())["was_running"]


def test_a_cleanup_failure_after_the_commit_is_a_warning(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    world.fail["kill"] = VzError("cannot kill")
    summary = run(ct)
    assert summary.frozen_seconds is not None
    assert len(summary.warnings) == 1 and "vzpy migrate --recover" in summary.warnings[0]
    # the copy here may still run: its files stay, and the marker keeps it from being resumed or started
    assert marker.path(gconf, CTID).exists() and ct.conf_path.exists() and ct.private.exists()


def test_a_ct_whose_migration_is_in_doubt_is_not_migrated_again(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf, Stage.STOPPED)
    marker.write(gconf, marker.Marker("root@10.0.0.9", CTID, online=False, was_running=True))
    with pytest.raises(MigrationLocked, match=f"vzpy migrate --recover root@10.0.0.9 {CTID}"):
        run(ct, online=False)
    assert world.journal == []


# --- the path: stop-and-copy, pre-copy, post-copy ------------------------------------------------------------


def test_without_dirty_tracking_the_path_is_stop_and_copy_with_no_pre_dump(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    summary = run(ct)
    assert summary.path == "stop-and-copy" and world.predumps() == 0 and summary.iterations == []
    assert world.page_servers == [("", "")] and world.dump_parents == [None]
    assert summary.pages_while_frozen == summary.pages_total == 50
    assert any("mem_dirty_track" in reason for reason in summary.path_reasons)


@pytest.mark.parametrize("requested", [None, "pre-copy"])
def test_unknown_criu_facts_here_mean_stop_and_copy_or_refusing_another_path(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch, requested: str | None
) -> None:
    def broken(ct: Container) -> dict[str, Any]:
        raise VzError("/bin/false --version failed")

    monkeypatch.setattr(flow, "source_migration_facts", broken)
    if requested is not None:
        with pytest.raises(paths.PathUnavailable):
            run(make_ct(gconf), path=requested)
        return
    summary = run(make_ct(gconf))
    assert summary.path == "stop-and-copy" and "CRIU facts are unknown" in summary.path_reasons[0]


def precopy_world(world: World, pages: list[int]) -> None:
    world.source_facts = facts(dirty=True)
    world.predump_pages = pages


def test_pre_copy_sends_each_iteration_onto_the_last_and_only_the_rest_while_frozen(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    precopy_world(world, [16000, 300, 40])
    summary = run(ct)
    assert summary.path == "pre-copy"
    src = world.names("src")
    # files first, then the memory while the CT runs, then the freeze
    assert src[: src.index("suspend") + 2] == [
        "sync",
        "pre-dump",
        "pre-dump",
        "pre-dump",
        "tunnel up",
        "suspend",
        "dump",
    ]
    assert world.page_servers == [("pre-1", ""), ("pre-2", "pre-1"), ("pre-3", "pre-2"), ("", "pre-3")]
    assert world.dump_parents == [None, "../pre-1", "../pre-2", "pre-3"]
    assert [i.pages for i in summary.iterations] == [16000, 300, 40]
    assert summary.stop_reason is not None and "small" in summary.stop_reason
    out = summary.as_dict()
    assert out["pages_while_frozen"] == 50 and out["pages_total"] == 16000 + 300 + 40 + 50
    assert [set(i) for i in out["iterations"]] == [{"pages", "pages_skipped", "seconds"}] * 3
    assert ct.conf_path.with_name(f"{CTID}.conf.migrated").exists()


def test_pre_copy_stops_when_the_dirty_set_stops_shrinking(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    precopy_world(world, [16000, 500, 600, 100])
    summary = run(ct)
    assert world.predumps() == 3 and "stopped shrinking" in (summary.stop_reason or "")


def test_pre_copy_follows_its_tuned_stop_rule(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    precopy_world(world, [16000, 8000, 4000, 2000])
    summary = run(ct, stop_rule=precopy.StopRule(max_iterations=2))
    assert world.predumps() == 2 and summary.stop_reason == "2 iterations done"


@pytest.mark.parametrize(
    "step",
    ["prepare", "sync", "precopy", "tunnel", "suspend", "dump", "final-sync", "copy-images", "restore", "resume"],
)
def test_pre_copy_rolls_back_at_each_step_before_the_commit(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    ct = make_ct(gconf)
    precopy_world(world, [16000, 40])
    monkeypatch.setenv(fault.ENV, f"source:fail:{step}")
    with pytest.raises(fault.InjectedFault):
        run(ct)
    assert ct.stage() is Stage.RUNNING and ct.conf_path.exists() and not world.committed
    # the destination's images (pre-dumps included) go with its cleanup
    assert (("dst", "cleanup") in world.journal) == (step != "prepare")
    assert world.names("src").count("wake") <= 1 and not marker.path(gconf, CTID).exists()
    assert not list(gconf.dumpdir.glob(".vzpy-migrate-*"))


def test_a_failed_pre_dump_stops_its_page_server_there_and_the_ct_keeps_running(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    precopy_world(world, [16000, 300])
    world.fail["pre-dump"] = ChkpntError("criu pre-dump failed")
    with pytest.raises(CheckpointFailed, match="pre-dump of CT 101 failed"):
        run(ct)
    dst = world.names("dst")
    assert dst[dst.index("page_server_start") :][:3] == ["page_server_start", "page_server_stop", "cleanup"]
    assert "suspend" not in world.names("src") and ct.stage() is Stage.RUNNING


@pytest.mark.parametrize(
    ("requested", "source", "dest", "missing"),
    [
        ("pre-copy", facts(), facts(), "soft-dirty"),
        ("post-copy", facts(lazy=True), facts(lazy=False), "destination"),
        ("post-copy", facts(lazy=None), facts(lazy=True), "source"),
    ],
)
def test_a_path_the_hosts_cannot_take_is_refused_before_anything_is_copied(
    gconf: GlobalConfig,
    world: World,
    requested: str,
    source: dict[str, Any],
    dest: dict[str, Any],
    missing: str,
) -> None:
    ct = make_ct(gconf)
    world.source_facts, world.dest_facts = source, dest
    with pytest.raises(paths.PathUnavailable, match=missing) as info:
        run(ct, path=requested)
    assert "\n" not in info.value.message and "--stop-and-copy" in info.value.message
    assert world.names("dst") == ["connect", "ct_exists", "bye"] and world.names("src") == []
    assert ct.stage() is Stage.RUNNING


def test_a_path_needs_online(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    with pytest.raises(MigrateUsage, match="--online"):
        run(ct, online=False, path="pre-copy")
    assert world.journal == []


def test_post_copy_is_never_taken_unless_asked_or_allowed(gconf: GlobalConfig, world: World) -> None:
    world.source_facts = facts(dirty=True, lazy=True)
    world.dest_facts = facts(lazy=True)
    world.predump_pages = [16000, 10]
    summary = run(make_ct(gconf))
    assert summary.path == "pre-copy" and "lazy dump" not in world.names("src")
    assert "--postcopy" in summary.path_reasons[-1]


def postcopy_world(world: World) -> None:
    world.source_facts = facts(lazy=True)
    world.dest_facts = facts(lazy=True)
    world.frozen_pages, world.lazy_pages = 20, 16000


def test_post_copy_restores_there_first_and_serves_the_pages_until_all_arrived(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    seen: list[bool] = []
    restore = FakeAgent.restore

    def watching(self: FakeAgent, *args: Any, **kw: Any) -> int:
        seen.append(marker.path(gconf, CTID).exists())  # the point of no return is before the lazy restore
        return restore(self, *args, **kw)

    FakeAgent.restore = watching  # type: ignore[method-assign]
    try:
        summary = run(ct, path="post-copy")
    finally:
        FakeAgent.restore = restore  # type: ignore[method-assign]
    assert seen == [True] and summary.path == "post-copy"
    assert world.names("dst")[2:] == [
        "prepare",
        "lazy_port",
        "put_images",
        "lazy restore",
        "resume",
        "lazy_wait",
        "bye",
    ]
    assert world.names("src") == ["tunnel up", "sync", "suspend", "lazy dump", "sync", "tunnel down", "kill"]
    assert summary.pages_while_frozen == 20 and summary.pages_total == 16020
    assert not marker.path(gconf, CTID).exists()


def test_post_copy_when_allowed_by_policy(gconf: GlobalConfig, world: World) -> None:
    postcopy_world(world)
    assert run(make_ct(gconf), postcopy_allowed=True).path == "post-copy"


@pytest.mark.parametrize(
    "step", ["prepare", "tunnel", "sync", "suspend", "lazy-dump", "final-sync", "copy-images", "lazy-restore"]
)
def test_post_copy_rolls_back_at_each_step_before_the_lazy_restore_request(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    monkeypatch.setenv(fault.ENV, f"source:fail:{step}")
    with pytest.raises(fault.InjectedFault):
        run(ct, path="post-copy")
    assert ct.stage() is Stage.RUNNING and ct.conf_path.exists() and not world.committed
    assert world.names("src").count("wake") <= 1 and not marker.path(gconf, CTID).exists()
    if step in ("final-sync", "copy-images", "lazy-restore"):
        assert world.lazy_release.is_set()  # the lazy dump was told to stop before the CT woke here


def test_post_copy_the_link_remap_files_crius_lazy_dump_deleted_go_with_the_final_sync(
    gconf: GlobalConfig, world: World
) -> None:
    postcopy_world(world)
    world.remaps = ["/tmp/link_remap.19"]
    run(make_ct(gconf), path="post-copy")
    src = world.names("src")
    assert src[src.index("lazy dump") + 1 : src.index("lazy dump") + 3] == ["reinstate /tmp/link_remap.19", "sync"]
    assert "remove /tmp/link_remap.19" not in src  # the source copy goes as a whole


def test_post_copy_rolled_back_after_the_dump_takes_the_link_remap_files_out_of_the_tree(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    world.remaps = ["/tmp/link_remap.19"]
    monkeypatch.setenv(fault.ENV, "source:fail:copy-images")
    with pytest.raises(fault.InjectedFault):
        run(ct, path="post-copy")
    src = world.names("src")
    assert src.index("lazy stop") < src.index("remove /tmp/link_remap.19") < src.index("wake")


def test_post_copy_a_lazy_dump_that_never_gets_ready_is_stopped_before_the_ct_wakes_here(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    world.lazy_never_ready = True
    with pytest.raises(flow.FrozenTooLong):
        run(ct, path="post-copy", max_frozen=0.2)
    src = world.names("src")
    assert src.index("lazy stop") < src.index("wake") and ct.stage() is Stage.RUNNING


def test_post_copy_a_failed_lazy_restore_that_left_nothing_there_resumes_the_source(
    gconf: GlobalConfig, world: World
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    world.fail["lazy restore"] = RestoreFailed("criu restore failed")
    with pytest.raises(RestoreFailed):
        run(ct, path="post-copy")
    assert ct.stage() is Stage.RUNNING and not marker.path(gconf, CTID).exists()


def test_post_copy_past_the_lazy_restore_a_failure_never_resumes_the_source(
    gconf: GlobalConfig, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    monkeypatch.setenv(fault.ENV, "source:fail:resume")
    with pytest.raises(flow.OutcomeInDoubt, match="vzpy migrate --recover"):
        run(ct, path="post-copy")
    assert ct.stage() is Stage.SUSPENDED and marker.path(gconf, CTID).exists()
    assert "wake" not in world.names("src") and ("dst", "cleanup") not in world.journal


def test_post_copy_pages_lost_after_the_ct_ran_there_is_said_plainly(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    postcopy_world(world)
    world.fail["lazy pages"] = ChkpntError("page server: connection reset")
    with pytest.raises(MigrateError, match=r"runs on 10\.0\.0\.2 but the rest of its memory could not be sent.*lost"):
        run(ct, path="post-copy")
    assert world.committed and "wake" not in world.names("src") and ("dst", "cleanup") not in world.journal


# --- --recover --------------------------------------------------------------------------------------------


def in_doubt(gconf: GlobalConfig, world: World, committed: bool) -> Container:
    ct = make_ct(gconf, Stage.SUSPENDED)
    marker.write(gconf, marker.Marker(f"root@{HOST}", CTID, online=True, was_running=True))
    world.committed = committed
    return ct


def test_recover_after_the_destination_committed_retires_the_source(gconf: GlobalConfig, world: World) -> None:
    ct = in_doubt(gconf, world, committed=True)
    scratch = gconf.dumpdir / f".vzpy-migrate-{CTID}-abcd1234"
    scratch.mkdir(parents=True)
    said = flow.recover(ct, options(), progress=lambda message: None)
    assert "runs on" in said
    assert world.names("dst") == ["connect", "recover_state", "recover_commit", "bye"]
    assert world.names("src") == ["kill"]
    assert not ct.conf_path.exists() and not ct.private.exists() and not scratch.exists()
    assert not marker.path(gconf, CTID).exists()


def test_recover_when_the_destination_did_not_commit_resumes_the_source(gconf: GlobalConfig, world: World) -> None:
    ct = in_doubt(gconf, world, committed=False)
    said = flow.recover(ct, options(), progress=lambda message: None)
    assert "runs here" in said
    assert world.names("dst") == ["connect", "recover_state", "cleanup", "bye"]
    assert world.names("src") == ["wake"] and ct.stage() is Stage.RUNNING
    assert ct.conf_path.exists() and not marker.path(gconf, CTID).exists()


def test_recover_asks_the_host_the_ct_went_to_and_no_other(gconf: GlobalConfig, world: World) -> None:
    ct = in_doubt(gconf, world, committed=False)
    other = flow.MigrateOptions(target=Target("root", "10.0.0.3"), online=True)
    with pytest.raises(MigrateUsage, match=f"went to root@{HOST}.*vzpy migrate --recover root@{HOST} {CTID}"):
        flow.recover(ct, other, progress=lambda message: None)
    assert world.journal == [] and marker.path(gconf, CTID).exists()


def test_recover_of_an_offline_migration_starts_the_source_again(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf, Stage.STOPPED)
    marker.write(gconf, marker.Marker(f"root@{HOST}", CTID, online=False, was_running=True))
    flow.recover(ct, options(online=False), progress=lambda message: None)
    assert world.names("src") == ["start"] and not marker.path(gconf, CTID).exists()


def test_a_new_migration_removes_scratch_dirs_of_killed_ones(gconf: GlobalConfig, world: World) -> None:
    ct = make_ct(gconf)
    ours = gconf.dumpdir / f".vzpy-migrate-{CTID}-k1ll3d00"
    other = gconf.dumpdir / f".vzpy-migrate-{CTID}1-k1ll3d00"  # CT 1011's
    ours.mkdir(parents=True)
    other.mkdir()
    run(ct)
    assert not ours.exists() and other.exists()


def test_fault_specs() -> None:
    assert fault.parse("source:before:dump, agent:after:resume,bogus,x:y:z") == {
        ("source", "before", "dump"),
        ("agent", "after", "resume"),
    }
    assert fault.agent_part("source:before:dump,agent:after:resume") == "agent:after:resume"
    fault.hit("", "source", "before", "dump")  # nothing set: nothing happens
    with pytest.raises(fault.InjectedFault):
        fault.hit("source:fail:dump", "source", "fail", "dump")
    assert os.getpid() > 0  # still alive: no spec for this point


def test_copy_failed_is_not_ambiguous() -> None:
    assert not isinstance(CopyFailed("x"), flow.AMBIGUOUS)


def loaded_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_no_import_cycle_the_source_never_loads_the_agent_nor_the_agent_the_source() -> None:
    source = loaded_modules("vzpy.migrate.flow")
    assert "vzpy.migrate.remote" in source
    assert not {"vzpy.migrate.agent", "vzpy.migrate.ops", "vzpy.migrate.session"} & source
    agent = loaded_modules("vzpy.migrate.agent")
    assert "vzpy.migrate.ops" in agent and not {"vzpy.migrate.flow", "vzpy.migrate.remote"} & agent
