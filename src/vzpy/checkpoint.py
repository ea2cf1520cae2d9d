"""Checkpoint and restore of a CT, in vzctl's stages.

chkpnt: suspend (freeze + network lock) -> dump (CRIU images + fingerprint -> one dump file; the CT stays
suspended) -> kill (stop it; the dump file stays) or resume. restore: undump (recreate the processes,
frozen, network locked) -> resume (wake them) or kill. Every stage action begins with vzpy.stage.enter,
which validates it and persists its target; the executors here do the work and commit (or roll back).
`run_chkpnt` and `run_restore` are vzctl's multi-flag plans: the whole sequence is checked, and every
input (dump file paths) too, before the first action changes anything.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzpy import dumpable, dumpfile, fsstate, lifecycle, linkremap, netlock, scratch, stage
from vzpy.background import InThread
from vzpy.config import ConfFile, shown, validate_ctid
from vzpy.container import Container, RunState, create_time, process_name, start_ticks
from vzpy.criu import CgroupMode, Criu, CriuOptions, NetworkLock, require_criu
from vzpy.criu import images as criu_images
from vzpy.criu.binary import load_rpc_soon
from vzpy.errors import BadConfig, ChkpntError, InvalidSyntax, NetworkError, RestoreError, VzError
from vzpy.host import cpu
from vzpy.netlock import NFT_TIMEOUT
from vzpy.runtime import network, tcpkick
from vzpy.runtime.cgroups import CONTROLLERS, ct_hierarchies
from vzpy.scratch import private_dir, work_dir
from vzpy.stage import Action, Progress, Stage
from vzpy.units import human_size

FS_MEMBER = "fs.tar.zst"
# Paths the CT's own init rewrites at every start: never a reason to refuse a restore.
FS_EXCLUDE = ("run/vzpy-init.ready",)
# Seconds one CRIU run may take (vz.conf CRIU_TIMEOUT); on expiry CRIU is killed and the CT resumed.
DEFAULT_CRIU_TIMEOUT = 600.0
# How long a dump told to stop (its time ran out) may take to reach CRIU's next notification, where it stops
# cleanly, before it is killed (which kills any task CRIU's parasite code runs in at that moment).
ABORT_GRACE = 30.0
MAX_CRIU_TIMEOUT = 7 * 24 * 3600.0
# What /proc/PID/wchan shows for a task stopped by SIGSTOP/SIGTSTP, frozen or not (a frozen task's state
# reads "D", so the state letter cannot tell).
STOPPED_WCHAN = "do_signal_stop"


# --- the plans vzctl's flags name


def chkpnt_actions(suspend: bool, dump: bool, kill: bool, resume: bool, snapshot: bool) -> list[Action]:
    """`vzpy chkpnt`'s flags as the stage actions they run, in order."""
    if snapshot:
        if kill:
            raise InvalidSyntax("--snapshot resumes the CT; it cannot be combined with --kill")
        suspend = dump = resume = True
    if kill and resume:
        raise InvalidSyntax("--kill and --resume exclude each other: the dumped CT is either stopped or resumed")
    if not (suspend or dump or kill or resume):
        return [Action.SUSPEND, Action.DUMP, Action.KILL]
    chosen = ((suspend, Action.SUSPEND), (dump, Action.DUMP), (kill, Action.KILL), (resume, Action.RESUME))
    return [action for wanted, action in chosen if wanted]


def restore_actions(undump: bool, resume: bool, kill: bool) -> list[Action]:
    """`vzpy restore`'s flags as the stage actions they run, in order."""
    if resume and kill:
        raise InvalidSyntax("--resume and --kill exclude each other")
    if not (undump or resume or kill):
        undump = resume = True
    chosen = ((undump, Action.UNDUMP), (resume, Action.RESTORE_RESUME), (kill, Action.RESTORE_KILL))
    return [action for wanted, action in chosen if wanted]


@dataclass(frozen=True)
class DumpTarget:
    path: Path
    compress: bool = False
    with_fs: bool = False


def run_chkpnt(ct: Container, actions: Sequence[Action], target: DumpTarget, progress: Progress) -> None:
    """Run a chkpnt plan; everything is checked before the first action."""
    stage.plan(ct, actions)
    criu_timeout(ct)  # a bad CRIU_TIMEOUT, or no place for CRIU's logs, is refused before the CT is suspended
    log_dir(ct)
    if Action.DUMP in actions:
        check_dump_target(target.path, ct)
        load_rpc_soon()  # during the suspend's waits (nft, fsync) rather than with the CT frozen
    scratch.remove_leftovers(ct)
    snapshot = list(actions[-2:]) == [Action.DUMP, Action.RESUME]
    for action in actions:
        if action is Action.SUSPEND:
            suspend(ct, progress)
        elif action is Action.DUMP:
            dump(ct, target, progress=progress, then_resume=snapshot, areas_checked=True)
        elif action is Action.KILL:
            kill(ct, progress)
        elif not snapshot:  # a snapshot's dump resumed the CT already
            resume(ct, progress)


def run_restore(
    ct: Container, actions: Sequence[Action], path: Path | None, *, skip_fs_check: bool, progress: Progress
) -> None:
    """Run a restore plan; everything is checked before the first action."""
    stage.plan(ct, actions)
    criu_timeout(ct)
    log_dir(ct)
    if Action.UNDUMP in actions:
        assert path is not None, "an undump needs the dump file"
        check_dump_source(path, ct)
        load_rpc_soon()  # while the dump file is extracted
    scratch.remove_leftovers(ct)
    for action in actions:
        if action is Action.UNDUMP:
            assert path is not None
            undump(ct, path, skip_fs_check=skip_fs_check, progress=progress, areas_checked=True)
        elif action is Action.RESTORE_RESUME:
            restore_resume(ct, progress)
        else:
            restore_kill(ct, progress)


# --- inputs, checked before anything changes


def check_dump_target(path: Path, ct: Container | None = None, *, areas: bool = True) -> None:
    """Refuse a --dumpfile that cannot be written, or whose existing target is not a regular file (a device,
    FIFO, socket, directory or symlink would be replaced by the dump file). `areas=False` skips the walk over
    every CT's config (_refuse_inside_areas) that this command did already."""
    if ct is not None and path.parent == ct.gconf.dumpdir:
        private_dir(path.parent)
    if ct is not None and areas:
        _refuse_inside_areas(path, ct, ChkpntError)
    if not path.parent.is_dir():
        raise ChkpntError(f"directory {path.parent} for the dump file does not exist; create it or choose another")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ChkpntError(
            f"{path} exists and is {_kind(st.st_mode)}, not a regular file: vzpy replaces only a regular file; "
            "choose another --dumpfile"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ChkpntError(f"cannot write in {path.parent}; choose another --dumpfile")


def _refuse_inside_areas(path: Path, ct: Container, error: type[VzError]) -> None:
    """A dump file in a CT's tree (this CT's or another's) would be written through links that CT controls,
    and could be read or replaced by it before the restore: refuse it."""
    forms = {path.parent, Path(os.path.realpath(path.parent))}
    for owner, area in _ct_areas(ct):
        if any(form.is_relative_to(inside) for form in forms for inside in {area, Path(os.path.realpath(area))}):
            raise error(
                f"dump file {path} is inside CT {owner}'s area {area}, where that CT can reach it; "
                f"choose a --dumpfile outside every CT's area, e.g. in {ct.gconf.dumpdir}"
            )


def _ct_areas(ct: Container) -> list[tuple[str, Path]]:
    """(CTID, VE_PRIVATE or VE_ROOT) of this CT and of every CT in CONFDIR whose areas resolve."""
    others = sorted(ct.gconf.confdir.glob("*.conf")) if ct.gconf.confdir.is_dir() else []
    found = []
    for owner in [ct, *(Container(conf.name.removesuffix(".conf"), ct.gconf) for conf in others if _is_ct(conf))]:
        with contextlib.suppress(VzError, OSError):
            found += [(owner.ctid, owner.private), (owner.ctid, owner.root)]
    return found


def _is_ct(conf: Path) -> bool:
    try:
        validate_ctid(conf.name.removesuffix(".conf"))
    except VzError:
        return False
    return True


def check_dump_source(path: Path, ct: Container | None = None, *, areas: bool = True) -> None:
    """Refuse at once a dump file that is not a regular file (reading a FIFO would block forever), or one
    inside a CT's tree (`areas=False`: this command checked that already)."""
    if ct is not None and areas:
        _refuse_inside_areas(path, ct, RestoreError)
    try:
        st = os.stat(path)
    except OSError as e:
        raise RestoreError(f"cannot read dump file {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise RestoreError(f"{path} is {_kind(st.st_mode)}, not a dump file (a regular file)")


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def log_dir(ct: Container) -> Path:
    """Where CRIU's logs of this CT's last dump/restore stay (shown in errors, kept after failures)."""
    logs = private_dir(ct.gconf.dumpdir) / ".logs"
    ours = (private_dir(logs), private_dir(logs / ct.ctid))
    for path in ours:  # vzpy's own, whoever made them: CRIU's logs name the CT's files and sockets
        path.chmod(0o700)
    return ours[1]


def criu_timeout(ct: Container) -> float:
    """vz.conf's CRIU_TIMEOUT; BadConfig (file:line) unless a finite number of seconds up to MAX_CRIU_TIMEOUT."""
    raw = ct.gconf.values.get("CRIU_TIMEOUT")
    if not raw:
        return DEFAULT_CRIU_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= MAX_CRIU_TIMEOUT:  # also refuses nan and inf ("1e400"): every wait needs a deadline
        raise BadConfig(
            f"{_global_where(ct, 'CRIU_TIMEOUT')}: invalid CRIU_TIMEOUT value {shown(raw)}: give a number of "
            f"seconds above 0 and at most {MAX_CRIU_TIMEOUT:.0f}, e.g. {DEFAULT_CRIU_TIMEOUT:.0f}; fix the line"
        )
    return seconds


def _global_where(ct: Container, key: str) -> str:
    try:
        return ConfFile.load(ct.gconf.path).where(key)
    except (OSError, VzError):
        return str(ct.gconf.path)


def _criu(ct: Container, timeout: float | None = None) -> Criu:
    """CRIU with CRIU_TIMEOUT as its deadline, or `timeout` (a migration's remaining frozen time)."""
    return Criu(require_criu(ct.gconf.values.get("CRIU")), timeout=timeout or criu_timeout(ct))


# --- chkpnt stages


def suspend(ct: Container, progress: Progress) -> None:
    dumpable.require_dumpable(ct)  # before anything is frozen: what CRIU would refuse, named
    entry = stage.enter(ct, Action.SUSPEND)
    entry.state.frozen_since = time.time()
    try:
        # what peers send while the CT is frozen is kept, and delivered when it runs (vzpy.runtime.tcpkick)
        tcpkick.hold(ct, entry.state.veth or ct.veth)
        netlock.lock(entry.state.init_pid)
        ct.cgroups.freeze()
    except BaseException:
        _wake(ct, entry.state)
        raise
    entry.commit()
    progress(f"CT {ct.ctid} suspended (frozen, network locked)")


def dump(
    ct: Container, target: DumpTarget, *, progress: Progress, then_resume: bool = False, areas_checked: bool = False
) -> dumpfile.Manifest:
    """Write the suspended CT's state to target.path; it stays suspended. On failure it is resumed.

    With then_resume (a snapshot), the CT is resumed as soon as CRIU's images and the filesystem state
    are taken, and the dump file is packed while it runs: the frozen time is CRIU's alone.
    `areas_checked`: this command checked already that target.path is in no CT's area (run_chkpnt).
    """
    check_dump_target(target.path, ct, areas=not areas_checked)
    entry = stage.enter(ct, Action.DUMP)
    started = time.monotonic()
    resumed = False
    # nft's listing of CRIU's locks, which dump_images needs before CRIU starts, runs meanwhile
    pid = entry.state.init_pid
    listing = InThread(lambda: netlock.criu_locks(pid), f"nft's list of CRIU's locks in CT {ct.ctid}", late=ChkpntError)
    # Streamed, CRIU's memory images go straight into the dump file as CRIU writes them (dumpfile.stream).
    # A snapshot stages them in RAM instead: its frozen time is CRIU's alone, never the disk's.
    streamed = not (then_resume or target.compress)
    try:
        with work_dir(ct, "dump", size=memory_usage(ct)) as work:
            images = work / "images"
            images.mkdir(mode=0o700)
            processes = _processes(ct)

            def take_images() -> None:
                dump_images(ct, images, state=entry.state, locks_before=lambda: listing.result(NFT_TIMEOUT + 5.0))
                progress(f"CRIU dump done in {time.monotonic() - started:.2f}s; writing {target.path}")

            def describe() -> tuple[dumpfile.Manifest, dict[str, Path]]:
                extra = {}
                if target.with_fs:
                    fsstate.archive_tree(ct.private, work / FS_MEMBER)
                    extra[FS_MEMBER] = work / FS_MEMBER
                return _manifest(ct, processes, target.with_fs), extra

            if streamed:
                manifest = dumpfile.writer.write_dumpfile_streamed(
                    target.path,
                    images,
                    pages_images=dumpfile.stream.pages_images(ct.cgroups.pids()),
                    take_images=take_images,
                    describe=describe,
                    spill_dir=work / "spill",
                )
            else:
                take_images()
                manifest, extra = describe()
                if then_resume:
                    resume(ct, progress)
                    resumed = True
                manifest = dumpfile.write_dumpfile(
                    target.path, images, manifest, extra_members=extra, compress=target.compress
                )
    except BaseException:
        if not resumed:
            _wake(ct, entry.state)
        raise
    if not then_resume:
        entry.commit(dumpfile=str(target.path))
    progress(
        f"CT {ct.ctid} dumped to {target.path} ({human_size(manifest.memory_bytes)} of memory) in "
        f"{time.monotonic() - started:.2f}s" + ("" if then_resume else "; it stays suspended")
    )
    return manifest


def kill(ct: Container, progress: Progress) -> None:
    entry = stage.enter(ct, Action.KILL)
    lifecycle.cleanup_leftovers(ct, entry.state)
    entry.commit()
    progress(f"CT {ct.ctid} killed; its dump file is kept")


def resume(ct: Container, progress: Progress) -> None:
    entry = stage.enter(ct, Action.RESUME)
    frozen = _unfreeze(ct, entry.state, restored=False)
    entry.commit(frozen_since=0.0)
    progress(f"CT {ct.ctid} resumed; it was frozen for {frozen:.3f}s")


def wake(ct: Container) -> float:
    """Let a frozen (suspended or undumped) CT run: network unlocked, thawed. Returns the frozen time.

    The rollback of a suspend or an undump (a failed migration, a recovery): it checks no transition."""
    state, current = stage.current(ct)
    return _wake(ct, state, restored=current is Stage.UNDUMPED)


def _wake(ct: Container, state: RunState, *, restored: bool = False) -> float:
    frozen = _unfreeze(ct, state, restored=restored)
    state.frozen_since = 0.0
    stage.persist(ct, state, Stage.RUNNING)
    return frozen


def _unfreeze(ct: Container, state: RunState, *, restored: bool) -> float:
    """Unlock the network and thaw (idempotent: a half-done suspend is fine too); how long it was frozen.

    The link-remap files of the CT's dump go first: a dumped CT that runs on makes its dump stale; a
    restored one has its files open and needs them no more."""
    (linkremap.release if restored else linkremap.remove)(ct, state.link_remaps)
    state.link_remaps = []
    if state.init_alive():
        netlock.unlock(state.init_pid)
    if ct.cgroups.freezer_state() != "THAWED":
        ct.cgroups.thaw()
    tcpkick.deliver_held(ct, state)
    return time.time() - state.frozen_since if state.frozen_since else 0.0


def dump_images(
    ct: Container,
    images: Path,
    page_server: tuple[str, int] | None = None,
    *,
    state: RunState | None = None,
    timeout: float | None = None,
    parent: str | None = None,
    lazy: bool = False,
    on_images: Callable[[], None] | None = None,
    locks_before: Callable[[], set[str]] | None = None,
) -> list[str]:
    """CRIU's images of the suspended CT into `images` (it stays frozen); with page_server, the memory
    pages go there instead (a page server on the destination of a migration). With `timeout`, a dump still
    running after that many seconds is stopped (ChkpntError) and the CT left intact, still frozen.

    Pre-copy: `parent` names the last pre-dump's images dir (relative to `images`): only pages changed since
    are sent. Post-copy (`lazy`): CRIU serves the pages itself on `page_server` and returns only once they
    were all fetched; `on_images` is called as soon as every other image is written.

    `locks_before`: gives CRIU's network lock tables in the CT's netns now (netlock.criu_locks, started
    earlier, in a thread), which a failed dump must leave.

    Returns the files CRIU linked into the CT's tree for open files whose name was unlinked: the restore
    needs them, so they stay (recorded in the CT's state) until the CT resumes."""
    state = state or ct.load_state()
    options = _dump_options(ct, state, images)
    options.page_server = page_server
    options.track_mem, options.parent_img, options.lazy_pages = parent is not None, parent, lazy
    # A task that is both stopped and frozen cannot be ptrace-attached: the kernel waits for it to move
    # from stopped to traced, which a frozen task never does (CRIU hangs in D state). So CRIU then seizes
    # the tree itself: thawed just before it seizes (network still locked), frozen again before it lets go.
    seize_thawed = bool(stopped_tasks(ct))
    if seize_thawed:
        options.freeze_cgroup = None
    cgroups = ct.cgroups
    kept: list[str] = []

    def on_notify(script: str, _pid: int) -> None:
        if script == "pre-dump" and seize_thawed:
            cgroups.thaw()
        elif script == "post-dump":
            if seize_thawed:
                cgroups.freeze()
            # CRIU removes its link-remap files once a tree it leaves running is dumped: hold them
            kept.extend(linkremap.hold(ct, criu_images.linked_remaps(images)))
            if on_images is not None:
                on_images()

    locks = locks_before() if locks_before is not None else netlock.criu_locks(state.init_pid)
    try:
        # `timeout` (what a migration has left of --max-frozen) stops CRIU cleanly at its next notification;
        # only one that does not get there within ABORT_GRACE more is killed
        hard = None if timeout is None else min(criu_timeout(ct), timeout + ABORT_GRACE)
        _criu(ct, hard).dump(options, notify=on_notify, abort_after=timeout)
    except BaseException:
        linkremap.release(ct, kept)
        # a CRIU killed at its deadline could not remove its network lock: the CT would resume cut off
        with contextlib.suppress(NetworkError):  # the dump's own error is the one to report
            netlock.remove_criu_locks(state.init_pid, keep=locks)
        raise
    finally:
        if cgroups.freezer_state() != "FROZEN":
            cgroups.freeze()
    linkremap.reinstate(ct, kept)
    if kept:
        stage.remember(ct, state, link_remaps=[*state.link_remaps, *kept])
    return kept


def pre_dump_images(ct: Container, images: Path, page_server: tuple[str, int], *, parent: str | None) -> None:
    """Pre-copy: the running CT's memory to `page_server` while it keeps running (CRIU freezes it only while
    it collects the pages); `parent`, the previous pre-dump's images dir relative to `images`: only the pages
    changed since then go. Needs soft-dirty tracking (mem_dirty_track)."""
    options = _dump_options(ct, ct.load_state(), images)
    options.log_file = "pre-dump.log"
    options.page_server = page_server
    options.track_mem, options.parent_img = True, parent
    if stopped_tasks(ct):  # see dump_images: CRIU seizes such a tree itself, task by task
        options.freeze_cgroup = None
    _criu(ct).pre_dump(options)


def stopped_tasks(ct: Container) -> list[int]:
    """The CT's processes stopped by a signal (SIGSTOP, ^Z), whether or not the CT is frozen."""
    stopped = []
    for pid in ct.cgroups.pids():
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        except OSError:
            continue
        if wchan == STOPPED_WCHAN:
            stopped.append(pid)
    return stopped


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
        # an open file whose name was unlinked while another link remains: CRIU links it back for the dump
        link_remap=True,
        # CRIU's own lock too, over lo as well (vzpy's netlock, in place and dumped with the netns, lets lo
        # through): TCP between two of the CT's sockets must not move while they are dumped one by one, or a
        # send queue with unsent data comes back broken ("Can't restore not-sent send queue data")
        network_lock=NetworkLock.NFTABLES,
        freeze_cgroup=ct.cgroups.path("freezer"),
        manage_cgroups=CgroupMode.SOFT,
        dump_cgroup_hierarchies=ct_hierarchies(),
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
            result.append({"pid": pid, "comm": process_name(pid)})
        except (OSError, ValueError):
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


def undump(ct: Container, path: Path, *, skip_fs_check: bool, progress: Progress, areas_checked: bool = False) -> int:
    """Recreate the CT's processes from `path`, frozen with the network locked. Returns the init pid.
    `areas_checked`: this command checked already that `path` is in no CT's area (run_restore)."""
    stage.plan(ct, [Action.UNDUMP])
    ct.check_areas()  # before --with-fs writes the private area or anything is mounted
    check_dump_source(path, ct, areas=not areas_checked)
    manifest = dumpfile.read_manifest(path)
    _check_compatible(ct, manifest)
    started = time.monotonic()
    size = sum(m.size for m in manifest.members.values())
    with work_dir(ct, "restore", size=size) as work:
        # Extracting verifies every member before anything changes, except the memory images: CRIU only copies
        # those into the tasks it makes, so their hash runs alongside the restore, and the restored tasks stay
        # frozen (never run an instruction of the CT's) until it says every byte is the dump's.
        # The processes' memory images are copied in a thread meanwhile: CRIU reads them once it has made the
        # namespaces, so their copy goes on while it does, and while the filesystem is checked.
        late = dumpfile.extract_checking_later(
            path, work, later=criu_images.is_memory_image, copy_later=criu_images.task_pages_images
        )[1]
        try:
            if manifest.with_fs:
                fsstate.restore_tree(work / FS_MEMBER, ct.private)
                (work / FS_MEMBER).unlink()
                progress(f"CT {ct.ctid}'s files put back from the dump file")
            elif not skip_fs_check:
                _check_fs(ct, manifest)
            init_pid = restore_images(ct, work, verify=late.wait, images_ready=late.copied)
        finally:
            late.close()
    progress(f"CT {ct.ctid} restored from {path} in {time.monotonic() - started:.2f}s (frozen, network locked)")
    return init_pid


def restore_resume(ct: Container, progress: Progress) -> None:
    entry = stage.enter(ct, Action.RESTORE_RESUME)
    _unfreeze(ct, entry.state, restored=True)
    entry.commit(frozen_since=0.0, dumpfile="")  # restored: the dump no longer waits (`vzpy status`, `start`)
    progress(f"CT {ct.ctid} resumed")


def restore_kill(ct: Container, progress: Progress) -> None:
    entry = stage.enter(ct, Action.RESTORE_KILL)
    lifecycle.cleanup_leftovers(ct, entry.state)
    linkremap.reinstate(ct, entry.state.link_remaps)  # the dump file stays restorable
    entry.commit(link_remaps=[])
    progress(f"CT {ct.ctid} killed; it is stopped and its dump file is kept")


def restore_images(
    ct: Container,
    images: Path,
    *,
    timeout: float | None = None,
    lazy: bool = False,
    verify: Callable[[], None] | None = None,
    images_ready: Callable[[float], None] | None = None,
) -> int:
    """Restore the CT's processes from CRIU's images in `images`, frozen (undumped). Returns the init pid.
    `lazy`: memory pages come later from a `criu lazy-pages` daemon working in log_dir(ct) (post-copy).
    `verify`: called once the tasks are made and frozen, before anything else; if it raises, they are killed.
    `images_ready(timeout)`: returns once the processes' memory images are in `images` (CRIU waits for it
    after making the namespaces, before the tasks read their memory); if it raises, the restore fails."""
    entry = stage.enter(ct, Action.UNDUMP)
    linkremap.reinstate(ct, entry.state.link_remaps)  # held by a restore that was killed
    # CRIU consumes its link-remap files even when the restore fails: hold them for a retry
    held = linkremap.hold(ct, criu_images.linked_remaps(images))
    # persisted before anything is made: a vzpy killed during the restore leaves what `restore --kill` needs
    entry.note(veth=ct.veth, ips=ct.ips, link_remaps=held)
    cgroups = ct.cgroups
    try:
        lifecycle.cleanup_leftovers(ct, entry.state)
        lifecycle.mount_root(ct)
        cgroups.create()
        cgroups.apply(ct.limits)

        def on_notify(script: str, pid: int) -> None:
            if script == "post-setup-namespaces" and images_ready is not None:
                images_ready(timeout or criu_timeout(ct))
            # restored tasks are complete but not yet running: freeze them where they stand
            if script == "pre-resume":
                cgroups.freeze()

        options = _restore_options(ct, images)
        options.lazy_pages = lazy
        criu = _criu(ct, timeout)
        network.load_soon()  # while CRIU restores: configure_host_side needs pyroute2 after it
        init_pid = criu.restore(options, notify=on_notify)
        if verify is not None:
            verify()
        network.configure_host_side(ct.veth, ct.ips)
        entry.commit(
            init_pid=init_pid,
            init_started=create_time(init_pid),
            init_start_ticks=start_ticks(init_pid),
            frozen_since=time.time(),
        )
    except BaseException:
        try:
            linkremap.reinstate(ct, held)
        finally:
            lifecycle.kill(ct)
        raise
    return init_pid


def _restore_options(ct: Container, images: Path) -> CriuOptions:
    return CriuOptions(
        images_dir=images,
        work_dir=log_dir(ct),
        log_file="restore.log",
        root=ct.root,
        tcp_established=True,
        file_locks=True,
        # CRIU locks the restored netns until every socket is back (unsent data that goes out before its
        # peer exists gets a reset); vzpy's own lock, restored with the netns, stays until restore --resume
        network_lock=NetworkLock.NFTABLES,
        manage_cgroups=CgroupMode.SOFT,
        # this host's cgroup parent may differ from the dumping host's (CGROUP_PARENT)
        cgroup_roots={c: f"/{ct.cgroups.parent}/{ct.ctid}" for c in CONTROLLERS},
        veths={network.CT_IFNAME: ct.veth},
    )


def _check_compatible(ct: Container, manifest: dumpfile.Manifest) -> None:
    if manifest.ctid != ct.ctid:
        raise RestoreError(f"dump file is of CT {manifest.ctid}, not {ct.ctid}; restore it as CT {manifest.ctid}")
    problems = cpu.restore_problems(manifest.cpu, cpu.host_cpu())
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
