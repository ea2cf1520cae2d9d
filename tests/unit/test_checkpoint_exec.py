"""The stage entry and the checkpoint executors, driven with fakes for CRIU, the cgroups and the network lock.

Root-free: the CT's state file, dump-file targets, scratch dirs and link-remap files are real files under
tmp_path; everything that would touch the kernel (freezer, nftables, CRIU, killing processes) is a fake that
records what it was asked to do, in order.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import write_vz_conf
from vzpy import checkpoint, linkremap, scratch, stage
from vzpy.config import GlobalConfig
from vzpy.container import Container, RunState
from vzpy.criu import CriuOptions
from vzpy.dumpable import NotDumpable
from vzpy.errors import ChkpntError, MigrationInDoubt, NotRunning, RestoreError, WrongStage
from vzpy.stage import Action, Facts, Stage

S, A = Stage, Action


@dataclass
class FakeCgroups:
    events: list[str]
    tasks: list[int] = field(default_factory=list)
    state: str = "THAWED"
    parent: str = "vzpy"

    def pids(self) -> list[int]:
        return list(self.tasks)

    def freezer_state(self) -> str:
        return self.state

    def freeze(self) -> None:
        self.events.append("freeze")
        self.state = "FROZEN"

    def thaw(self) -> None:
        self.events.append("thaw")
        self.state = "THAWED"

    def path(self, controller: str) -> Path:
        return Path("/sys/fs/cgroup") / controller / self.parent / "101"

    def read(self, controller: str, name: str) -> str:
        return str(1 << 20)


class FakeContainer(Container):
    """A real Container (config, state file) whose cgroups are a fake."""

    fake_cgroups: FakeCgroups

    @property
    def cgroups(self) -> FakeCgroups:  # type: ignore[override]
        return self.fake_cgroups


@dataclass
class FakeNetlock:
    events: list[str]
    locked: set[int] = field(default_factory=set)

    def lock(self, pid: int) -> None:
        self.events.append("lock")
        self.locked.add(pid)

    def unlock(self, pid: int) -> None:
        self.events.append("unlock")
        self.locked.discard(pid)

    def criu_locks(self, pid: int) -> set[str]:
        return set()

    def remove_criu_locks(self, pid: int, keep: set[str]) -> list[str]:
        return []


class FakeCriu:
    """Calls the notify callback at CRIU's points, as the real swrk does; `fail` raises instead of finishing."""

    def __init__(self, events: list[str], *, fail: Exception | None = None, remove: list[Path] | None = None) -> None:
        self.events = events
        self.fail = fail
        self.remove = remove or []
        self.options: list[CriuOptions] = []

    def dump(
        self,
        options: CriuOptions,
        *,
        notify: Callable[[str, int], None] | None = None,
        abort_after: float | None = None,
    ) -> None:
        self.options.append(options)
        self.events.append("criu dump")
        for script in ("pre-dump", "network-lock", "post-dump"):
            if notify is not None:
                notify(script, 0)
        for path in self.remove:  # CRIU's delete_link_remaps for a tree left running
            path.unlink()
        if self.fail is not None:
            raise self.fail


@dataclass
class World:
    ct: FakeContainer
    events: list[str]
    net: FakeNetlock
    criu: FakeCriu
    written: list[Path]

    def state(self) -> RunState:
        return self.ct.load_state()


def _gconf(tmp_path: Path) -> GlobalConfig:
    return GlobalConfig.load(write_vz_conf(tmp_path / "vz.conf", tmp_path))


def _running_state() -> RunState:
    me = psutil.Process()
    return RunState(stage=S.RUNNING, init_pid=me.pid, init_started=me.create_time(), veth="veth101.0")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    gconf = _gconf(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "101.conf").write_text('HOSTNAME="ct101"\n')
    (tmp_path / "private" / "101" / "tmp").mkdir(parents=True)
    events: list[str] = []
    ct = FakeContainer("101", gconf)
    ct.fake_cgroups = FakeCgroups(events, tasks=[os.getpid()])
    ct.save_state(_running_state())
    net = FakeNetlock(events)
    criu = FakeCriu(events)
    written: list[Path] = []

    def write_dumpfile(path: Path, images: Path, manifest: Any, **_: Any) -> Any:
        events.append("write")
        path.write_bytes(b"dump")
        written.append(path)
        return manifest

    def write_dumpfile_streamed(path: Path, images: Path, **kw: Any) -> Any:
        kw["take_images"]()
        manifest, _extra = kw["describe"]()
        return write_dumpfile(path, images, manifest)

    monkeypatch.setattr(checkpoint, "netlock", net)
    monkeypatch.setattr(checkpoint, "_criu", lambda ct, timeout=None: criu)
    monkeypatch.setattr(checkpoint, "stopped_tasks", lambda ct: [])
    # the fake CT's "init" is this test process, whose session depends on how pytest was started
    monkeypatch.setattr(checkpoint.dumpable, "require_dumpable", lambda ct: events.append("dumpable?"))
    monkeypatch.setattr(checkpoint.criu_images, "linked_remaps", lambda images: [])
    monkeypatch.setattr(checkpoint, "_manifest", lambda ct, processes, with_fs: _Manifest())
    monkeypatch.setattr(checkpoint, "memory_usage", lambda ct: 1 << 20)
    monkeypatch.setattr(checkpoint.dumpfile, "write_dumpfile", write_dumpfile)
    monkeypatch.setattr(checkpoint.dumpfile.writer, "write_dumpfile_streamed", write_dumpfile_streamed)
    monkeypatch.setattr(checkpoint.lifecycle, "cleanup_leftovers", lambda ct, state: events.append("kill"))
    monkeypatch.setattr(scratch, "RAM_DIR", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    yield World(ct, events, net, criu, written)


@dataclass
class _Manifest:
    memory_bytes: int = 1 << 20


def _target(world: World, name: str = "Dump.101") -> checkpoint.DumpTarget:
    return checkpoint.DumpTarget(world.ct.gconf.dumpdir / name)


def _quiet(_: str) -> None:
    pass


# --- stage entry


def test_enter_persists_the_target_as_pending_and_commit_settles_it(world: World) -> None:
    entry = stage.enter(world.ct, A.SUSPEND)
    on_disk = json.loads(world.ct.state_path.read_text())
    assert (on_disk["stage"], on_disk["pending"], on_disk["pending_from"]) == ("suspended", A.SUSPEND.value, "running")
    assert (entry.source, entry.target) == (S.RUNNING, S.SUSPENDED)
    entry.commit(frozen_since=12.5)
    on_disk = json.loads(world.ct.state_path.read_text())
    assert (on_disk["stage"], on_disk["pending"], on_disk["frozen_since"]) == ("suspended", "", 12.5)


def test_state_file_is_0600_and_its_directory_0700(world: World) -> None:
    stage.enter(world.ct, A.SUSPEND).commit()
    assert stat.S_IMODE(world.ct.state_path.stat().st_mode) == 0o600
    assert not list(world.ct.state_path.parent.glob("*.tmp"))


def test_a_refused_action_changes_nothing(world: World) -> None:
    before = world.ct.state_path.read_bytes()
    with pytest.raises(WrongStage):
        stage.enter(world.ct, A.DUMP)
    assert world.ct.state_path.read_bytes() == before


def test_plan_checks_the_whole_sequence_before_anything(world: World) -> None:
    before = world.ct.state_path.read_bytes()
    with pytest.raises(WrongStage):
        stage.plan(world.ct, [A.SUSPEND, A.DUMP, A.UNDUMP])
    assert world.ct.state_path.read_bytes() == before
    assert world.events == []


def _facts(alive: bool = True, tasks: bool = True, frozen: bool = False) -> Facts:
    return Facts(init_alive=alive, has_tasks=tasks, frozen=frozen)


@pytest.mark.parametrize(
    ("state", "facts", "expected"),
    [
        (RunState(stage=S.RUNNING), _facts(), S.RUNNING),
        (RunState(stage=S.RUNNING), _facts(frozen=True), S.SUSPENDED),
        (RunState(stage=S.SUSPENDED), _facts(alive=False, tasks=False), S.STOPPED),
        (RunState(stage=S.DUMPED), _facts(frozen=True), S.DUMPED),
        # killed half-way: the stage recovery starts from
        (RunState(stage=S.SUSPENDED, pending=A.SUSPEND.value, pending_from="running"), _facts(), S.SUSPENDED),
        (RunState(stage=S.DUMPED, pending=A.DUMP.value, pending_from="suspended"), _facts(frozen=True), S.SUSPENDED),
        (RunState(stage=S.RUNNING, pending=A.RESUME.value, pending_from="dumped"), _facts(frozen=True), S.DUMPED),
        (RunState(stage=S.RUNNING, pending=A.START.value, pending_from="stopped"), _facts(alive=False), S.STOPPED),
        (RunState(stage=S.UNDUMPED, pending=A.UNDUMP.value, pending_from="stopped"), _facts(alive=False), S.UNDUMPED),
        (RunState(stage=S.UNDUMPED, pending=A.UNDUMP.value), _facts(alive=False, tasks=False), S.STOPPED),
        (RunState(stage=S.STOPPED, pending="undump"), _facts(alive=False), S.UNDUMPED),  # an older vzpy's mark
        (RunState(stage=S.STOPPED, pending=A.STOP.value, pending_from="dumped"), _facts(frozen=True), S.DUMPED),
    ],
)
def test_settled_stage(state: RunState, facts: Facts, expected: Stage) -> None:
    assert stage.settled(state, facts) is expected


def _mark_migration(world: World, host: str = "dst.example") -> Path:
    marker = world.ct.gconf.lockdir / "101.migration.json"
    marker.write_text(json.dumps({"host": host}))
    return marker


@pytest.mark.parametrize("action", [A.RESUME, A.START, A.UNDUMP, A.RESTORE_RESUME])
def test_an_unfinished_migration_refuses_running_this_copy(world: World, action: Action) -> None:
    _mark_migration(world)
    with pytest.raises(MigrationInDoubt) as info:
        stage.enter(world.ct, action)
    assert info.value.exit_code == 9
    assert "`vzpy migrate --recover dst.example 101`" in info.value.message
    assert "\n" not in info.value.message


def test_an_unfinished_migration_refuses_a_plan_that_would_resume(world: World) -> None:
    _mark_migration(world)
    with pytest.raises(MigrationInDoubt):
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.RESUME], _target(world), _quiet)
    assert world.events == []


@pytest.mark.parametrize("action", [A.SUSPEND, A.STOP])
def test_an_unfinished_migration_allows_what_does_not_run_this_copy(world: World, action: Action) -> None:
    _mark_migration(world)
    assert stage.enter(world.ct, action).target in (S.SUSPENDED, S.STOPPED)


def test_without_a_migration_marker_resume_is_allowed(world: World) -> None:
    checkpoint.suspend(world.ct, _quiet)
    checkpoint.resume(world.ct, _quiet)
    assert world.ct.stage() is S.RUNNING


# --- chkpnt executors


def test_full_chkpnt_suspends_dumps_and_kills_in_order(world: World) -> None:
    checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], _target(world), _quiet)
    assert world.events == ["dumpable?", "lock", "freeze", "criu dump", "write", "kill"]
    waiting = world.ct.load_state()  # stopped, its dump waiting for `start` (vzctl's `suspended`)
    assert (waiting.stage, waiting.dumpfile, waiting.init_pid) == (S.STOPPED, str(_target(world).path), 0)
    options = world.criu.options[0]
    assert options.leave_running and options.link_remap and options.freeze_cgroup is not None


def test_full_chkpnt_reads_every_cts_areas_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_chkpnt checks the dump file against every CT's areas before the suspend; its dump does not again
    (each CT's config read twice, the second time with the CT frozen)."""
    walks: list[str] = []
    ct_areas = checkpoint._ct_areas
    monkeypatch.setattr(checkpoint, "_ct_areas", lambda ct: walks.append(ct.ctid) or ct_areas(ct))
    checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], _target(world), _quiet)
    assert walks == ["101"]


def test_restore_reads_every_cts_areas_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_restore checks the dump file against every CT's areas; its undump does not again."""
    world.ct.clear_state()
    world.ct.fake_cgroups.tasks = []
    walks: list[str] = []
    ct_areas = checkpoint._ct_areas
    monkeypatch.setattr(checkpoint, "_ct_areas", lambda ct: walks.append(ct.ctid) or ct_areas(ct))

    def read_manifest(path: Path) -> Any:  # the undump's next step: where this test has seen enough
        raise RestoreError(f"stop after the checks of {path.name}")

    monkeypatch.setattr(checkpoint.dumpfile, "read_manifest", read_manifest)
    dump = world.ct.gconf.dumpdir / "Dump.101"
    dump.parent.mkdir(parents=True, exist_ok=True)
    dump.write_bytes(b"dump")
    with pytest.raises(RestoreError, match=r"stop after the checks of Dump\.101"):
        checkpoint.run_restore(world.ct, [A.UNDUMP], dump, skip_fs_check=False, progress=_quiet)
    assert walks == ["101"]


def test_a_staged_dump_still_refuses_a_dump_file_in_a_cts_area(world: World) -> None:
    checkpoint.suspend(world.ct, _quiet)
    inside = checkpoint.DumpTarget(world.ct.private / "tmp" / "Dump.101")
    with pytest.raises(ChkpntError, match="inside CT 101's area"):
        checkpoint.dump(world.ct, inside, progress=_quiet)
    assert not inside.path.exists() and "criu dump" not in world.events


def test_staged_dump_records_the_dump_file_and_stays_suspended(world: World) -> None:
    checkpoint.suspend(world.ct, _quiet)
    checkpoint.dump(world.ct, _target(world, "staged"), progress=_quiet)
    state = world.state()
    assert (state.stage, state.pending, state.dumpfile) == (S.DUMPED, "", str(_target(world, "staged").path))
    assert world.ct.fake_cgroups.state == "FROZEN"


def test_what_criu_would_refuse_is_looked_for_before_anything_is_frozen(world: World) -> None:
    checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], _target(world), _quiet)
    assert world.events[0] == "dumpable?"


def test_an_undumpable_ct_is_left_running_and_untouched(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(ct: Any) -> None:
        raise NotDumpable("CT 101 cannot be checkpointed: pid 7 is in a session outside the CT")

    monkeypatch.setattr(checkpoint.dumpable, "require_dumpable", refuse)
    before = world.state()
    with pytest.raises(NotDumpable, match="session outside"):
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], _target(world), _quiet)
    assert world.events == []
    assert world.state() == before


def test_a_failed_dump_resumes_the_ct(world: World) -> None:
    world.criu.fail = ChkpntError("criu dump of pid 1 timed out after 600s (CRIU killed)")
    with pytest.raises(ChkpntError, match="timed out"):
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], _target(world), _quiet)
    assert world.events == ["dumpable?", "lock", "freeze", "criu dump", "unlock", "thaw"]
    assert world.state().stage is S.RUNNING and world.state().pending == ""
    assert world.ct.stage() is S.RUNNING


def test_snapshot_resumes_before_the_dump_file_is_written(world: World) -> None:
    checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.RESUME], _target(world), _quiet)
    assert world.events == ["dumpable?", "lock", "freeze", "criu dump", "unlock", "thaw", "write"]
    assert world.state().stage is S.RUNNING


def test_a_snapshot_whose_file_cannot_be_written_leaves_the_ct_running(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_: Any, **__: Any) -> None:
        raise ChkpntError("not enough disk space")

    monkeypatch.setattr(checkpoint.dumpfile, "write_dumpfile", no_space)
    with pytest.raises(ChkpntError):
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.RESUME], _target(world), _quiet)
    assert world.events.count("thaw") == 1
    assert world.ct.stage() is S.RUNNING


@pytest.mark.parametrize("actions", [[A.SUSPEND, A.DUMP, A.KILL], [A.SUSPEND, A.DUMP, A.RESUME]])
def test_a_dump_file_in_a_missing_directory_is_refused_before_suspending(world: World, actions: list[Action]) -> None:
    target = checkpoint.DumpTarget(world.ct.gconf.dumpdir.parent / "missing" / "Dump")
    with pytest.raises(ChkpntError) as info:
        checkpoint.run_chkpnt(world.ct, actions, target, _quiet)
    assert info.value.exit_code == 16 and "does not exist" in info.value.message
    assert world.events == []
    assert world.ct.stage() is S.RUNNING


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _unix_socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def _symlink(path: Path) -> Path:
    (path.parent / "real").write_bytes(b"")
    path.symlink_to(path.parent / "real")
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make", [_fifo, _unix_socket, _symlink, _directory], ids=lambda f: f.__name__[1:])
def test_a_dump_file_target_that_is_not_a_regular_file_is_refused(
    world: World, tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    path = make(tmp_path / "target")
    before = os.lstat(path)
    with pytest.raises(ChkpntError) as info:
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], checkpoint.DumpTarget(path), _quiet)
    assert "not a regular file" in info.value.message
    assert world.events == []
    assert os.lstat(path).st_ino == before.st_ino


def test_dev_null_as_dump_file_is_refused() -> None:
    with pytest.raises(ChkpntError, match="character device"):
        checkpoint.check_dump_target(Path("/dev/null"))


def test_an_existing_regular_dump_file_may_be_replaced(world: World) -> None:
    path = world.ct.gconf.dumpdir.parent / "old.dump"
    path.write_bytes(b"old")
    checkpoint.run_chkpnt(world.ct, [A.SUSPEND, A.DUMP, A.KILL], checkpoint.DumpTarget(path), _quiet)
    assert path.read_bytes() == b"dump"


def test_a_fifo_as_dump_source_is_refused_at_once(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "fifo")
    started = time.monotonic()
    with pytest.raises(RestoreError, match="a FIFO, not a dump file"):
        checkpoint.check_dump_source(fifo)
    assert time.monotonic() - started < 5  # a read would block forever; this only bounds a hang


def test_dumpdir_and_logs_are_private(world: World) -> None:
    logs = checkpoint.log_dir(world.ct)
    for path in (world.ct.gconf.dumpdir, logs.parent, logs):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


# --- a stopped task, link-remap files, scratch dirs


def test_with_a_stopped_task_criu_seizes_the_thawed_tree_and_it_is_frozen_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "stopped_tasks", lambda ct: [1234])
    checkpoint.suspend(world.ct, _quiet)
    checkpoint.dump(world.ct, _target(world), progress=_quiet)
    assert world.criu.options[0].freeze_cgroup is None
    # thawed at CRIU's pre-dump point (before it seizes), frozen at post-dump (before it lets go)
    assert world.events == ["dumpable?", "lock", "freeze", "criu dump", "thaw", "freeze", "write"]
    assert world.ct.fake_cgroups.state == "FROZEN"
    assert world.net.locked, "the network stays locked throughout"


def test_without_a_stopped_task_the_freezer_cgroup_is_criu_s(world: World) -> None:
    checkpoint.suspend(world.ct, _quiet)
    checkpoint.dump(world.ct, _target(world), progress=_quiet)
    assert world.criu.options[0].freeze_cgroup == world.ct.cgroups.path("freezer")
    assert "thaw" not in world.events


def test_link_remap_files_survive_the_dump_and_go_when_the_ct_resumes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    remap = world.ct.private / "tmp" / "link_remap.16"
    remap.write_bytes(b"x")
    monkeypatch.setattr(checkpoint.criu_images, "linked_remaps", lambda images: ["/tmp/link_remap.16"])
    world.criu.remove = [remap]
    checkpoint.suspend(world.ct, _quiet)
    checkpoint.dump(world.ct, _target(world), progress=_quiet)
    assert remap.read_bytes() == b"x", "the restore needs CRIU's link-remap file"
    assert world.state().link_remaps == ["/tmp/link_remap.16"]
    assert not list(remap.parent.glob("*.vzpy-keep"))
    checkpoint.resume(world.ct, _quiet)
    assert not remap.exists()
    assert world.state().link_remaps == []


def test_a_failed_dump_leaves_no_kept_link_remap_files(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    remap = world.ct.private / "tmp" / "link_remap.3"
    remap.write_bytes(b"x")
    monkeypatch.setattr(checkpoint.criu_images, "linked_remaps", lambda images: ["/tmp/link_remap.3"])
    world.criu.remove = [remap]
    world.criu.fail = ChkpntError("boom")
    checkpoint.suspend(world.ct, _quiet)
    with pytest.raises(ChkpntError):
        checkpoint.dump(world.ct, _target(world), progress=_quiet)
    assert list((world.ct.private / "tmp").iterdir()) == []


@pytest.mark.parametrize("consumed", [True, False], ids=["consumed", "left"])
def test_a_held_link_remap_file_is_put_back_whether_or_not_criu_consumed_it(world: World, consumed: bool) -> None:
    remap = world.ct.private / "tmp" / "link_remap.7"
    remap.write_bytes(b"x")
    assert linkremap.hold(world.ct, ["/tmp/link_remap.7"]) == ["/tmp/link_remap.7"]
    if consumed:
        remap.unlink()
    linkremap.reinstate(world.ct, ["/tmp/link_remap.7"])
    assert sorted(p.name for p in remap.parent.iterdir()) == ["link_remap.7"]
    assert remap.read_bytes() == b"x"


def test_link_remap_names_never_lead_out_of_the_ct(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"host file")
    (world.ct.private / "evil").symlink_to(outside)
    linkremap.remove(world.ct, ["/evil/victim"])
    linkremap.hold(world.ct, ["/evil/victim"])
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_leftover_scratch_of_this_ct_is_removed_by_the_next_command(world: World, tmp_path: Path) -> None:
    ct = world.ct
    mine = [
        Path(tmp_path / "shm" / (scratch._prefix(ct, "dump") + "abcd1234")),
        Path(ct.gconf.dumpdir / (scratch._prefix(ct, "restore") + "x_y0z123")),
    ]
    other_root = _gconf(tmp_path / "elsewhere")
    foreign = [
        tmp_path / "shm" / (scratch._prefix(Container("101", other_root), "dump") + "abcd1234"),
        tmp_path / "shm" / (scratch._prefix(Container("1011", ct.gconf), "dump") + "abcd1234"),
        tmp_path / "shm" / (scratch._prefix(Container("101-x", ct.gconf), "dump") + "abcd1234"),
    ]
    for path in (*mine, *foreign):
        path.mkdir(parents=True)
        (path / "pages-1.img").write_bytes(b"p")
    tmp_dump = ct.gconf.dumpdir / ".Dump.101.0badf00d.tmp"
    tmp_dump.write_bytes(b"half")
    checkpoint.run_chkpnt(ct, [A.SUSPEND], _target(world), _quiet)
    assert not any(p.exists() for p in (*mine, tmp_dump))
    assert all(p.exists() for p in foreign)


def test_scratch_dirs_are_private_and_removed_after_use(world: World) -> None:
    with scratch.work_dir(world.ct, "dump", size=1024) as work:
        assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert not work.exists()


# --- restore executors


def test_restore_resume_and_kill_go_through_the_table(world: World) -> None:
    with pytest.raises(WrongStage):
        checkpoint.restore_resume(world.ct, _quiet)
    with pytest.raises(WrongStage):
        checkpoint.restore_kill(world.ct, _quiet)
    assert world.events == []


def test_stop_of_a_stopped_ct_is_not_running(world: World) -> None:
    world.ct.clear_state()
    with pytest.raises(NotRunning):
        checkpoint.run_chkpnt(world.ct, [A.SUSPEND], _target(world), _quiet)


@pytest.mark.parametrize(
    ("flags", "actions"),
    [
        ((False, False, False, False, False), [A.SUSPEND, A.DUMP, A.KILL]),
        ((False, False, False, False, True), [A.SUSPEND, A.DUMP, A.RESUME]),
        ((True, True, False, False, False), [A.SUSPEND, A.DUMP]),
        ((False, False, False, True, False), [A.RESUME]),
    ],
)
def test_chkpnt_flags_name_their_plan(flags: tuple[bool, ...], actions: list[Action]) -> None:
    assert checkpoint.chkpnt_actions(*flags) == actions


@pytest.mark.parametrize(
    ("flags", "actions"),
    [((False, False, False), [A.UNDUMP, A.RESTORE_RESUME]), ((False, False, True), [A.RESTORE_KILL])],
)
def test_restore_flags_name_their_plan(flags: tuple[bool, bool, bool], actions: list[Action]) -> None:
    assert checkpoint.restore_actions(*flags) == actions


def test_criu_timeout_comes_from_the_global_config(world: World) -> None:
    assert checkpoint.criu_timeout(world.ct) == checkpoint.DEFAULT_CRIU_TIMEOUT
    world.ct.gconf.values["CRIU_TIMEOUT"] = "2.5"
    assert checkpoint.criu_timeout(world.ct) == 2.5
    world.ct.gconf.values["CRIU_TIMEOUT"] = "-1"
    with pytest.raises(Exception, match="CRIU_TIMEOUT"):
        checkpoint.criu_timeout(world.ct)
