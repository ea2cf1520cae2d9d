"""Checkpoint and restore of a CT, in vzctl's stages.

chkpnt: suspend (freeze + network lock) -> dump (CRIU images + fingerprint -> one dump file; the CT stays
suspended) -> kill (stop it; the dump file stays) or resume. restore: undump (recreate the processes,
frozen, network locked) -> resume (wake them) or kill. Each stage is persisted before its side effects
(container.RunState), so separate invocations compose and a killed vzpy leaves a recoverable stage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

from vzpy import dumpfile, fsstate, lifecycle, netlock
from vzpy.config import ConfFile
from vzpy.container import Container, RunState
from vzpy.criu import CgroupMode, Criu, CriuOptions, NetworkLock, require_criu
from vzpy.errors import ChkpntError, RestoreError
from vzpy.runtime import network
from vzpy.runtime.cgroups import CONTROLLERS
from vzpy.stage import Action, Stage, transition

Progress = Callable[[str], None]
FS_MEMBER = "fs.tar.zst"
# Paths the CT's own init rewrites at every start: never a reason to refuse a restore.
FS_EXCLUDE = ("run/vzpy-init.ready",)
RAM_DIR = Path("/dev/shm")


def plan(ct: Container, actions: Sequence[Action]) -> None:
    """Check a whole sequence of stage actions against the transition table before doing any of them."""
    stage = ct.stage()
    for action in actions:
        stage = transition(ct.ctid, stage, action)


def _criu(ct: Container) -> Criu:
    return Criu(require_criu(ct.gconf.values.get("CRIU")))


def log_dir(ct: Container) -> Path:
    """Where CRIU's logs of this CT's last dump/restore stay (shown in errors, kept after failures)."""
    path = ct.gconf.dumpdir / ".logs" / ct.ctid
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@contextmanager
def work_dir(near: Path, ctid: str, purpose: str, *, size: int) -> Iterator[Path]:
    """A 0700 scratch dir for CRIU's images: in RAM (/dev/shm) when `size` bytes fit comfortably, else beside
    `near`. CRIU then writes memory to memory, and the dump file is the only copy that goes to disk."""
    base = RAM_DIR if _fits_in_ram(size) else near
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix=f".vzpy-{purpose}-{ctid}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fits_in_ram(size: int) -> bool:
    if not RAM_DIR.is_dir():
        return False
    available = psutil.virtual_memory().available
    return size * 2 < min(shutil.disk_usage(RAM_DIR).free, available)


# --- chkpnt stages


def suspend(ct: Container, progress: Progress) -> None:
    state = ct.load_state()
    transition(ct.ctid, ct.stage(), Action.SUSPEND)
    state.stage = Stage.SUSPENDED
    state.frozen_since = time.time()
    ct.save_state(state)
    try:
        netlock.lock(state.init_pid)
        ct.cgroups.freeze()
    except BaseException:
        _wake(ct, state)
        raise
    progress(f"CT {ct.ctid} suspended (frozen, network locked)")


def dump(
    ct: Container, path: Path, *, compress: bool, with_fs: bool, progress: Progress, then_resume: bool = False
) -> dumpfile.Manifest:
    """Write the suspended CT's state to `path`; it stays suspended. On failure it is resumed.

    With then_resume (a snapshot), the CT is resumed as soon as CRIU's images and the filesystem state
    are taken, and the dump file is packed while it runs: the frozen time is CRIU's alone.
    """
    state = ct.load_state()
    transition(ct.ctid, ct.stage(), Action.DUMP)
    if path.parent == ct.gconf.dumpdir:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.parent.is_dir():
        raise ChkpntError(f"directory {path.parent} for the dump file does not exist; create it or pick another")
    started = time.monotonic()
    try:
        with work_dir(path.parent, ct.ctid, "dump", size=memory_usage(ct)) as work:
            images = work / "images"
            images.mkdir(mode=0o700)
            processes = _processes(ct)
            dump_images(ct, images)
            progress(f"CRIU dump done in {time.monotonic() - started:.2f}s; writing {path}")
            extra = {}
            if with_fs:
                fsstate.archive_tree(ct.private, work / FS_MEMBER)
                extra[FS_MEMBER] = work / FS_MEMBER
            manifest = _manifest(ct, processes, with_fs)
            if then_resume:
                progress(f"CT {ct.ctid} resumed; it was frozen for {_wake(ct, state):.3f}s")
            manifest = dumpfile.write_dumpfile(path, images, manifest, extra_members=extra, compress=compress)
    except BaseException:
        _wake(ct, state)
        raise
    if not then_resume:
        state.stage = Stage.DUMPED
        state.dumpfile = str(path)
        ct.save_state(state)
    progress(
        f"CT {ct.ctid} dumped to {path} ({dumpfile.human_size(manifest.memory_bytes)} of memory) in "
        f"{time.monotonic() - started:.2f}s" + ("" if then_resume else "; it stays suspended")
    )
    return manifest


def kill(ct: Container, progress: Progress) -> None:
    transition(ct.ctid, ct.stage(), Action.KILL)
    lifecycle.kill(ct)
    progress(f"CT {ct.ctid} killed; its dump file is kept")


def resume(ct: Container, progress: Progress) -> None:
    state = ct.load_state()
    transition(ct.ctid, ct.stage(), Action.RESUME)
    frozen = _wake(ct, state)
    progress(f"CT {ct.ctid} resumed; it was frozen for {frozen:.3f}s")


def wake(ct: Container) -> float:
    """Let a frozen (suspended or undumped) CT run: network unlocked, thawed. Returns the frozen time."""
    return _wake(ct, ct.load_state())


def _wake(ct: Container, state: RunState) -> float:
    """Unlock the network and thaw; the CT runs again (idempotent: a half-done suspend is fine too).

    Returns how long it was frozen (0 when unknown)."""
    if state.init_alive():
        netlock.unlock(state.init_pid)
    if ct.cgroups.freezer_state() != "THAWED":
        ct.cgroups.thaw()
    frozen = time.time() - state.frozen_since if state.frozen_since else 0.0
    state.stage = Stage.RUNNING
    state.pending = ""
    state.frozen_since = 0.0
    ct.save_state(state)
    return frozen


def dump_images(ct: Container, images: Path, page_server: tuple[str, int] | None = None) -> None:
    """CRIU's images of the suspended CT into `images` (it stays frozen); with page_server, the memory
    pages go there instead (a page server on the destination of a migration)."""
    options = _dump_options(ct, ct.load_state(), images)
    options.page_server = page_server
    _criu(ct).dump(options)


def _dump_options(ct: Container, state: RunState, images: Path) -> CriuOptions:
    return CriuOptions(
        images_dir=images,
        work_dir=log_dir(ct),
        log_file="dump.log",
        pid=state.init_pid,
        # the stage machine, not CRIU, decides when the CT stops: dump leaves it frozen
        leave_running=True,
        tcp_established=True,
        file_locks=True,
        # vzpy's own lock (netlock) is already in place and is dumped with the netns
        network_lock=NetworkLock.SKIP,
        freeze_cgroup=ct.cgroups.path("freezer"),
        manage_cgroups=CgroupMode.SOFT,
    )


def memory_usage(ct: Container) -> int:
    try:
        return int(ct.cgroups.read("memory", "memory.usage_in_bytes"))
    except (OSError, ValueError):
        return 1 << 40  # unknown: do not bet RAM on it


def _processes(ct: Container) -> list[dict[str, object]]:
    result = []
    for pid in ct.cgroups.pids():
        try:
            result.append({"pid": pid, "comm": psutil.Process(pid).name()})
        except psutil.Error:
            continue
    return result


def _manifest(ct: Container, processes: list[dict[str, object]], with_fs: bool) -> dumpfile.Manifest:
    binary = require_criu(ct.gconf.values.get("CRIU"))
    return dumpfile.Manifest(
        ctid=ct.ctid,
        criu_version=str(binary.version),
        ct_config=ct.conf.text(),
        fs_fingerprint=fs_fingerprint(ct),
        processes=processes,
        with_fs=with_fs,
    )


# --- restore stages


def undump(ct: Container, path: Path, *, skip_fs_check: bool, progress: Progress) -> int:
    """Recreate the CT's processes from `path`, frozen with the network locked. Returns the init pid."""
    transition(ct.ctid, ct.stage(), Action.UNDUMP)
    manifest = dumpfile.read_manifest(path)
    _check_compatible(ct, manifest)
    started = time.monotonic()
    size = sum(m.size for m in manifest.members.values())
    with work_dir(ct.gconf.dumpdir, ct.ctid, "restore", size=size) as work:
        # extracting verifies every member: a truncated or corrupt file is refused here, before any change
        dumpfile.extract(path, work)
        if manifest.with_fs:
            fsstate.restore_tree(work / FS_MEMBER, ct.private)
            (work / FS_MEMBER).unlink()
            progress(f"CT {ct.ctid}'s files put back from the dump file")
        elif not skip_fs_check:
            _check_fs(ct, manifest)
        init_pid = restore_images(ct, work)
    progress(f"CT {ct.ctid} restored from {path} in {time.monotonic() - started:.2f}s (frozen, network locked)")
    return init_pid


def restore_resume(ct: Container, progress: Progress) -> None:
    state = ct.load_state()
    transition(ct.ctid, ct.stage(), Action.RESTORE_RESUME)
    _wake(ct, state)
    progress(f"CT {ct.ctid} resumed")


def restore_kill(ct: Container, progress: Progress) -> None:
    transition(ct.ctid, ct.stage(), Action.RESTORE_KILL)
    lifecycle.kill(ct)
    progress(f"CT {ct.ctid} killed; it is stopped and its dump file is kept")


def restore_images(ct: Container, images: Path) -> int:
    # persisted first: a vzpy killed during the restore leaves a stage `restore --kill` can clean up
    ct.save_state(RunState(stage=Stage.STOPPED, pending="undump", veth=ct.veth, ips=ct.ips))
    cgroups = ct.cgroups
    try:
        lifecycle.cleanup_leftovers(ct, ct.load_state())
        lifecycle.mount_root(ct)
        cgroups.create()
        cgroups.apply(ct.limits)

        def on_notify(script: str, pid: int) -> None:
            # restored tasks are complete but not yet running: freeze them where they stand
            if script == "pre-resume":
                cgroups.freeze()

        init_pid = _criu(ct).restore(_restore_options(ct, images), notify=on_notify)
        network.configure_host_side(ct.veth, ct.ips)
    except BaseException:
        lifecycle.kill(ct)
        raise
    ct.save_state(
        RunState(
            stage=Stage.UNDUMPED,
            init_pid=init_pid,
            init_started=psutil.Process(init_pid).create_time(),
            veth=ct.veth,
            ips=ct.ips,
        )
    )
    return init_pid


def _restore_options(ct: Container, images: Path) -> CriuOptions:
    return CriuOptions(
        images_dir=images,
        work_dir=log_dir(ct),
        log_file="restore.log",
        root=ct.root,
        tcp_established=True,
        file_locks=True,
        # the dumped netns carries vzpy's lock table; it comes back with the CT
        network_lock=NetworkLock.SKIP,
        manage_cgroups=CgroupMode.SOFT,
        # this host's cgroup parent may differ from the dumping host's (CGROUP_PARENT)
        cgroup_roots={c: f"/{ct.cgroups.parent}/{ct.ctid}" for c in CONTROLLERS},
        veths={network.CT_IFNAME: ct.veth},
    )


def _check_compatible(ct: Container, manifest: dumpfile.Manifest) -> None:
    if manifest.ctid != ct.ctid:
        raise RestoreError(f"dump file is of CT {manifest.ctid}, not {ct.ctid}; restore it as CT {manifest.ctid}")
    problems = dumpfile.cpu_compatible(manifest.cpu, dumpfile.host_cpu_info())
    if problems:
        raise RestoreError(f"this CPU cannot run CT {ct.ctid}'s processes: {'; '.join(problems)}")


def fs_fingerprint(ct: Container) -> dict[str, object]:
    return fsstate.fingerprint(ct.private, exclude=FS_EXCLUDE).to_json()


def _check_fs(ct: Container, manifest: dumpfile.Manifest) -> None:
    if manifest.fs_fingerprint is not None:
        recorded = fsstate.Fingerprint.from_json(manifest.fs_fingerprint)
        fsstate.verify(recorded, ct.private, ct.ctid, exclude=FS_EXCLUDE)


def import_config(ct: Container, manifest: dumpfile.Manifest) -> None:
    """Create CTID.conf from the dump file (a restore on another host); paths follow this host's vz.conf."""
    conf = ConfFile.parse(ct.conf_path, manifest.ct_config)
    for key in ("VE_ROOT", "VE_PRIVATE"):
        conf.set(key, None)
    conf.save()


def dumpfile_for(ct: Container, given: Path | None) -> Path:
    return (given or Path(ct.load_state().dumpfile or ct.default_dumpfile)).absolute()
