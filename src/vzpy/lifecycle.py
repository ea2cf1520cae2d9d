"""CT lifecycle: create, start, stop, destroy, set. Callers hold the CT's lock."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from vzpy.config import ConfFile
from vzpy.container import Container, RunState, parse_size
from vzpy.errors import (
    BadConfig,
    DestroyFailed,
    InvalidSyntax,
    IpInUse,
    MountFailed,
    NoDiskSpace,
    PrivateExists,
    PrivateNotFound,
    StopFailed,
    VzError,
)
from vzpy.execution import set_hostname
from vzpy.runtime import linux, network
from vzpy.runtime.launcher import InitSpec, launch
from vzpy.stage import Action, Stage, transition
from vzpy.templates import TemplateStore

MIN_FREE_BYTES = 64 << 20
STOP_TIMEOUT = 10.0
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- create / destroy


def create(
    ct: Container,
    ostemplate: str,
    *,
    hostname: str | None,
    ips: Sequence[str],
    others: Sequence[Container],
) -> None:
    if ct.exists():
        raise PrivateExists(f"CT {ct.ctid} already exists ({ct.conf_path}); pick another CTID or destroy it")
    private = ct.gconf.ve_private(ct.ctid)
    if private.exists() and any(private.iterdir()):
        raise PrivateExists(f"private area {private} already exists; remove it or pick another CTID")
    for ip in ips:
        network.parse_ip(ip)
    _check_ips_free(ct.ctid, ips, others)
    store = TemplateStore(ct.gconf.template_dir)
    private.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(private.parent).free < MIN_FREE_BYTES:
        raise NoDiskSpace(f"less than {MIN_FREE_BYTES >> 20} MiB free under {private.parent}; free some space")
    conf = ConfFile(path=ct.conf_path, lines=[f"# CT {ct.ctid}, created by vzpy"])
    conf.set("OSTEMPLATE", ostemplate)
    conf.set("VE_ROOT", str(ct.gconf.ve_root(ct.ctid)))
    conf.set("VE_PRIVATE", str(private))
    conf.set("HOSTNAME", hostname or f"ct{ct.ctid}")
    conf.set("IP_ADDRESS", " ".join(ips))
    store.install(ostemplate, private)  # unknown template: TemplateNotFound, nothing written
    try:
        conf.save()
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise


def destroy(ct: Container) -> None:
    stage = ct.stage()
    if stage is not Stage.STOPPED:
        raise VzError(f"CT {ct.ctid} is {stage.value}; stop it first with `vzpy stop {ct.ctid}`")
    cleanup_leftovers(ct, ct.load_state())
    try:
        shutil.rmtree(ct.private, ignore_errors=False) if ct.private.exists() else None
        if ct.root.is_dir():
            ct.root.rmdir()
    except OSError as e:
        raise DestroyFailed(f"cannot remove CT {ct.ctid} files: {e}") from e
    ct.conf_path.rename(ct.conf_path.with_suffix(".conf.destroyed"))
    ct.clear_state()


def _check_ips_free(ctid: str, ips: Sequence[str], others: Sequence[Container]) -> None:
    wanted = {str(network.parse_ip(ip)) for ip in ips}
    for other in others:
        if other.ctid == ctid:
            continue
        try:
            taken = wanted & {str(network.parse_ip(ip)) for ip in other.ips}
        except (VzError, OSError):
            continue
        if taken:
            raise IpInUse(f"IP {', '.join(sorted(taken))} is already used by CT {other.ctid}")


# --- start / stop


def start(ct: Container, progress: Progress = _quiet) -> RunState:
    transition(ct.ctid, ct.stage(), Action.START)
    state = ct.load_state()
    cleanup_leftovers(ct, state)
    if not ct.private.is_dir():
        raise PrivateNotFound(f"private area {ct.private} of CT {ct.ctid} not found; recreate the CT")
    progress(f"Starting CT {ct.ctid} ...")
    mount_root(ct)
    _write_hostname(ct)
    cgroups = ct.cgroups
    try:
        cgroups.create()
        cgroups.apply(ct.limits)

        def prepare(holder_pid: int) -> None:
            cgroups.add(holder_pid)
            network.create_veth(ct.veth, holder_pid)
            network.configure_ct_side(holder_pid, ct.ips)

        init_pid = launch(InitSpec(root=ct.root, hostname=ct.hostname), prepare)
        network.configure_host_side(ct.veth, ct.ips)
    except BaseException:
        cleanup_leftovers(ct, RunState(veth=ct.veth, ips=ct.ips))
        raise
    state = RunState(
        stage=Stage.RUNNING,
        init_pid=init_pid,
        init_started=psutil.Process(init_pid).create_time(),
        veth=ct.veth,
        ips=ct.ips,
    )
    ct.save_state(state)
    progress(f"CT {ct.ctid} started: init pid {init_pid}" + (f", IP {' '.join(ct.ips)}" if ct.ips else ""))
    return state


def stop(ct: Container, *, fast: bool = False, progress: Progress = _quiet) -> None:
    state = ct.load_state()
    transition(ct.ctid, ct.stage(), Action.STOP)
    progress(f"Stopping CT {ct.ctid} ...")
    if not fast:
        _terminate(ct, state)
    kill(ct)
    progress(f"CT {ct.ctid} stopped")


def kill(ct: Container) -> None:
    """Kill whatever runs of the CT, at any stage (frozen too), and undo what its start set up: stopped."""
    cleanup_leftovers(ct, ct.load_state())
    ct.clear_state()


def _terminate(ct: Container, state: RunState) -> None:
    """Ask init to shut the CT down (SIGTERM); wait for the CT to empty."""
    if ct.cgroups.freezer_state() != "THAWED":
        ct.cgroups.thaw()
    if state.init_pid <= 0 or not state.init_alive():
        return
    try:
        os.kill(state.init_pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _wait_empty(ct, STOP_TIMEOUT)


def kill_all(ct: Container) -> None:
    """SIGKILL everything left in the CT's cgroup; frozen tasks only die once thawed."""
    cgroups = ct.cgroups
    for _ in range(3):
        pids = cgroups.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if cgroups.freezer_state() != "THAWED":
            cgroups.thaw()
        if _wait_empty(ct, 5.0):
            return
    raise StopFailed(f"CT {ct.ctid} still has processes {cgroups.pids()} after SIGKILL")


def _wait_empty(ct: Container, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ct.cgroups.pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def cleanup_leftovers(ct: Container, state: RunState) -> None:
    """Undo what a start left behind: processes, host routes, veth, root mount, cgroups."""
    if ct.cgroups.exists():
        kill_all(ct)
    for ip in state.ips:
        network.del_host_route(ip)
    network.delete_veth(state.veth or ct.veth)
    umount_root(ct)
    ct.cgroups.remove()


# --- the root mount


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mount_root(ct: Container) -> None:
    """Bind the private area onto VE_ROOT (as vzctl mount does), private propagation."""
    if is_mounted(ct.root):
        return
    ct.root.mkdir(parents=True, exist_ok=True)
    try:
        linux.mount(os.fspath(ct.private), ct.root, None, linux.MS_BIND)
        linux.mount(None, ct.root, None, linux.MS_PRIVATE)
    except OSError as e:
        raise MountFailed(f"cannot mount {ct.private} on {ct.root}: {e.strerror}") from e


def umount_root(ct: Container) -> None:
    while is_mounted(ct.root):
        try:
            linux.umount(ct.root)
        except OSError:
            linux.umount(ct.root, linux.MNT_DETACH)


def _write_hostname(ct: Container) -> None:
    etc = ct.root / "etc"
    if etc.is_dir() and not etc.is_symlink():
        (etc / "hostname").write_text(ct.hostname + "\n")


# --- set


def apply_settings(
    ct: Container,
    *,
    hostname: str | None = None,
    add_ips: Sequence[str] = (),
    del_ips: Sequence[str] = (),
    memory: str | None = None,
    cpus: float | None = None,
    numproc: int | None = None,
    save: bool,
    others: Sequence[Container],
) -> list[str]:
    """Apply to the running CT and/or save to CTID.conf; returns notes for the operator."""
    conf = ct.conf
    running = ct.stage() is Stage.RUNNING
    if not running and not save:
        raise InvalidSyntax(f"CT {ct.ctid} is not running, so nothing can be applied: add --save to store it")
    for ip in (*add_ips, *del_ips):
        network.parse_ip(ip)
    _check_ips_free(ct.ctid, add_ips, others)
    ips = [ip for ip in ct.ips if ip not in del_ips] + [ip for ip in add_ips if ip not in ct.ips]
    if memory is not None:
        parse_size(memory, what="memory")
        conf.set("PHYSPAGES", f"0:{memory}")
    if cpus is not None:
        conf.set("CPUS", f"{cpus:g}")
    if numproc is not None:
        conf.set("NUMPROC", f"{numproc}:{numproc}")
    if hostname is not None:
        conf.set("HOSTNAME", hostname)
    conf.set("IP_ADDRESS", " ".join(ips))
    if running:
        _apply_live(ct, hostname, add_ips, del_ips)
    if save:
        conf.save()
        return []
    return [f"settings applied to the running CT {ct.ctid} only; add --save to keep them after a restart"]


def _apply_live(ct: Container, hostname: str | None, add_ips: Sequence[str], del_ips: Sequence[str]) -> None:
    state = ct.load_state()
    ct.cgroups.apply(ct.limits)
    if hostname is not None:
        set_hostname(state.init_pid, hostname)
        _write_hostname(ct)
    for ip in del_ips:
        network.del_ct_address(state.init_pid, ip)
        network.del_host_route(ip)
    for ip in add_ips:
        network.add_ct_address(state.init_pid, ip)
        network.add_host_route(state.veth, ip)
    state.ips = ct.ips
    ct.save_state(state)


def check_config(ct: Container) -> None:
    """Fail early on values that would only break at start."""
    try:
        ct.limits  # noqa: B018 - parsing is the check
        for ip in ct.ips:
            network.parse_ip(ip)
    except VzError as e:
        raise BadConfig(f"{ct.conf_path}: {e.message}") from e
