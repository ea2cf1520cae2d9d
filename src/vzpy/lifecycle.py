"""CT lifecycle: create, start, stop, destroy, set. Callers hold the CT's lock."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping, Sequence

from vzpy import config, scratch, stage
from vzpy.config import ConfFile, default_hostname, parse_size, physpages_problem, shown
from vzpy.container import LIMIT_KEYS, Container, RunState, create_time, limits_of, start_ticks
from vzpy.errors import (
    AlreadyRunning,
    BadConfig,
    CtFileError,
    DestroyFailed,
    InvalidSyntax,
    InvalidValue,
    IpInUse,
    MountFailed,
    NoDiskSpace,
    PrivateExists,
    PrivateNotFound,
    StartDisabled,
    StopFailed,
    VzError,
)
from vzpy.host import addresses, mounts
from vzpy.runtime import linux, network, quota, resolver
from vzpy.runtime.ctfs import CtRoot
from vzpy.stage import Action, Progress, Stage, quiet
from vzpy.units import human_size

MIN_FREE_BYTES = 64 << 20
STOP_TIMEOUT = 120.0  # vzctl's default wait for init to shut the CT down; STOP_TIMEOUT overrides it


# --- create / destroy


def create(
    ct: Container,
    ostemplate: str,
    *,
    hostname: str | None,
    ips: Sequence[str],
    others: Sequence[Container],
) -> None:
    from vzpy.templates import TemplateStore  # only here: ~5 ms of imports that no other command needs

    if ct.exists():
        raise PrivateExists(f"CT {ct.ctid} already exists ({ct.conf_path}); pick another CTID or destroy it")
    ct.check_areas()
    private = ct.gconf.ve_private(ct.ctid)
    if private.is_symlink() or (private.exists() and any(private.iterdir())):
        raise PrivateExists(f"private area {private} already exists; remove it or pick another CTID")
    for ip in ips:
        network.parse_ip(ip)
    _check_ips_free(ct.ctid, ips, others)
    store = TemplateStore(ct.gconf.template_dir)
    private.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(private.parent).free < MIN_FREE_BYTES:
        raise NoDiskSpace(f"less than {human_size(MIN_FREE_BYTES)} free under {private.parent}; free some space")
    conf = ConfFile(path=ct.conf_path, lines=[f"# CT {ct.ctid}, created by vzpy"])
    conf.set("OSTEMPLATE", ostemplate)
    conf.set("VE_ROOT", str(ct.gconf.ve_root(ct.ctid)))
    conf.set("VE_PRIVATE", str(private))
    conf.set("HOSTNAME", hostname or default_hostname(ct.ctid))
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
        raise AlreadyRunning(f"CT {ct.ctid} is {stage.value}; stop it first with `vzpy stop {ct.ctid}`")
    ct.check_areas()  # destroy deletes these: they must be this CT's own
    cleanup_leftovers(ct, ct.load_state())
    refuse_mounts_in_areas(ct)
    try:
        shutil.rmtree(ct.private, ignore_errors=False) if ct.private.exists() else None
        if ct.root.is_dir():
            ct.root.rmdir()
    except OSError as e:
        raise DestroyFailed(f"cannot remove CT {ct.ctid} files: {e}") from e
    ct.conf_path.rename(ct.conf_path.with_suffix(".conf.destroyed"))
    ct.clear_state()


def refuse_mounts_in_areas(ct: Container) -> None:
    """rmtree would delete through a mount (a bind of a host directory) left inside the areas: refuse."""
    for area in (ct.private, ct.root):
        below = mounts.mounts_below(area, including=True)
        if below:
            raise DestroyFailed(f"{below[0]} is mounted inside CT {ct.ctid}'s areas; unmount it, then destroy again")


def _check_ips_free(ctid: str, ips: Sequence[str], others: Sequence[Container]) -> None:
    used = addresses.ips_in_use(ips, _ip_owners(others), ctid=ctid)
    if used:
        owner = next(iter(used.values()))  # the first CT in the order given
        taken = sorted(ip for ip, by in used.items() if by == owner)
        raise IpInUse(f"IP {', '.join(taken)} is already used by CT {owner}")


def _ip_owners(others: Sequence[Container]) -> Iterator[addresses.Owner]:
    for other in others:
        try:
            yield other.ctid, other.ips
        except (VzError, OSError):
            continue


# --- start / stop


def start(ct: Container, progress: Progress = quiet) -> RunState:
    # imported here, as set_hostname below: chkpnt and restore, which import this module, never launch a CT
    from vzpy.runtime.launcher import InitSpec, launch

    refuse_disabled(ct)
    entry = stage.enter(ct, Action.START)
    scratch.remove_leftovers(ct)
    cleanup_leftovers(ct, entry.state)
    if not ct.private.is_dir():
        stage.persist(ct, entry.state, Stage.STOPPED)
        raise PrivateNotFound(f"private area {ct.private} of CT {ct.ctid} not found; recreate the CT")
    progress(f"Starting CT {ct.ctid} ...")
    mount_root(ct)
    _write_hostname(ct)
    _write_resolver(ct, ct.nameservers, ct.searchdomains)
    quota.enforce(ct.ctid, ct.private, ct.disk_limits)
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
        stage.persist(ct, entry.state, Stage.STOPPED)
        raise
    announce(ct, ct.ips)
    state = entry.commit(
        init_pid=init_pid,
        init_started=create_time(init_pid),
        init_start_ticks=start_ticks(init_pid),
        veth=ct.veth,
        ips=ct.ips,
        dumpfile="",
        frozen_since=0.0,
    )
    progress(f"CT {ct.ctid} started: init pid {init_pid}" + (f", IP {' '.join(ct.ips)}" if ct.ips else ""))
    return state


def announce(ct: Container, ips: Sequence[str]) -> None:
    """Gratuitous ARP for the CT's new addresses on vz.conf's NEIGHBOUR_DEVS, as vzctl does at start (best
    effort: the CT runs already)."""
    devs = ct.gconf.neighbour_devs
    for ip in ips:
        try:
            network.announce(ip, (ct.veth,), devs.mode, devs.devices)
        except (VzError, OSError) as e:
            config.warn(f"CT {ct.ctid}: cannot announce {ip} ({e}); peers learn it when their ARP entry expires")


def refuse_disabled(ct: Container) -> None:
    """vzctl refuses to start a CT whose config says DISABLED=yes."""
    if ct.disabled:
        where = ct.conf.where("DISABLED") if ct.conf.get("DISABLED") else ct.gconf.where("DISABLED")
        raise StartDisabled(
            f"CT {ct.ctid} is disabled (DISABLED=yes at {where}); enable it with "
            f"`vzpy set {ct.ctid} --disabled no --save`"
        )


def stop(ct: Container, *, fast: bool = False, progress: Progress = quiet) -> None:
    timeout = stop_timeout(ct)  # a bad STOP_TIMEOUT is refused before anything stops
    entry = stage.enter(ct, Action.STOP)
    scratch.remove_leftovers(ct)
    progress(f"Stopping CT {ct.ctid} ...")
    if not fast and not _terminate(ct, entry.state, timeout):
        progress(f"CT {ct.ctid} did not stop within {timeout:g}s (STOP_TIMEOUT); killing it")
    cleanup_leftovers(ct, entry.state)
    entry.commit(dumpfile="")  # a dump taken while it ran no longer waits to be restored by `start`
    progress(f"CT {ct.ctid} stopped")


def kill(ct: Container) -> None:
    """Kill whatever runs of the CT, at any stage (frozen too), and undo what its start set up: stopped.

    The way back from any failed or abandoned stage (a rollback), so it checks no transition."""
    state = ct.load_state()
    cleanup_leftovers(ct, state)
    stage.persist(ct, state, Stage.STOPPED)


def stop_timeout(ct: Container) -> float:
    """How long stop waits for init to shut the CT down: STOP_TIMEOUT (CTID.conf, else vz.conf); unset or 0
    means vzctl's default, 120 s."""
    return float(ct.stop_timeout or STOP_TIMEOUT)


def _terminate(ct: Container, state: RunState, timeout: float) -> bool:
    """Ask init to shut the CT down (SIGTERM); wait for the CT to empty. False if it did not within timeout."""
    if ct.cgroups.freezer_state() != "THAWED":
        ct.cgroups.thaw()
    if state.init_pid <= 0 or not state.init_alive():
        return True
    try:
        os.kill(state.init_pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    return _wait_empty(ct, timeout)


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
    """Whether the CT's cgroup emptied within timeout. Polled at 1 ms first, then less often: killed tasks are
    usually gone within a few ms, and a fixed 20 ms poll added its full period to every kill."""
    deadline = time.monotonic() + timeout
    interval = 0.001
    while ct.cgroups.pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 2, 0.02)
    return True


def cleanup_leftovers(ct: Container, state: RunState) -> None:
    """Undo what a start left behind: processes, host routes, veth, root mount, cgroups."""
    if ct.cgroups.exists():
        kill_all(ct)
    for ip in state.ips:
        network.del_host_route(ip, state.veth or ct.veth)
    network.delete_veth(state.veth or ct.veth)
    umount_root(ct)
    ct.cgroups.remove()


# --- the root mount


def mount_root(ct: Container) -> None:
    """Bind the private area onto VE_ROOT (as vzctl mount does), private propagation."""
    ct.check_areas()
    if mounts.is_mounted(ct.root):
        return
    ct.root.mkdir(parents=True, exist_ok=True)
    if any(ct.root.iterdir()):
        raise MountFailed(
            f"VE_ROOT {ct.root} of CT {ct.ctid} is not empty: the private area is mounted over it; "
            "empty it or set VE_ROOT to an empty directory of the CT's own"
        )
    try:
        linux.mount(os.fspath(ct.private), ct.root, None, linux.MS_BIND)
        linux.mount(None, ct.root, None, linux.MS_PRIVATE)
    except OSError as e:
        raise MountFailed(f"cannot mount {ct.private} on {ct.root}: {e.strerror}") from e


def umount_root(ct: Container) -> None:
    ct.check_areas()  # a VE_ROOT of "/" or /usr must never be unmounted
    while mounts.is_mounted(ct.root):
        try:
            linux.umount(ct.root)
        except OSError:
            linux.umount(ct.root, linux.MNT_DETACH)


def _write_hostname(ct: Container) -> None:
    """The CT's /etc/hostname, resolved as the CT sees it: a symlink there is replaced, not followed out."""
    try:
        with CtRoot(ct.root) as root:
            root.write_atomic("/etc/hostname", f"{ct.hostname}\n".encode())
    except CtFileError as e:
        if e.errno != errno.ENOENT:  # a CT without /etc has no file to keep in step
            raise CtFileError(f"CT {ct.ctid}: {e.message}; fix or remove the CT's /etc/hostname") from e


def _write_resolver(ct: Container, nameservers: list[str] | None, searchdomains: list[str] | None) -> None:
    """NAMESERVER/SEARCHDOMAIN into the CT's /etc/resolv.conf, resolved inside the CT's root."""
    try:
        resolver.write_ct_resolv_conf(ct.root, nameservers, searchdomains)
    except CtFileError as e:
        raise CtFileError(f"CT {ct.ctid}: {e.message}; fix or remove the CT's /etc/resolv.conf") from e


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
    keys: Mapping[str, str] | None = None,
    save: bool,
    others: Sequence[Container],
) -> list[str]:
    """Apply to the running CT and/or save to CTID.conf; returns notes for the operator.

    `keys` are config keys in vzctl's syntax (CPUUNITS="1000", NAMESERVER="10.0.0.1 10.0.0.2", ...). Only
    what is asked is changed, live and in the file: a live change made earlier without --save stays."""
    conf = ct.conf
    ct.check_areas()
    running = ct.stage() is Stage.RUNNING
    if not running and not save:
        raise InvalidSyntax(f"CT {ct.ctid} is not running, so nothing can be applied: add --save to store it")
    for ip in (*add_ips, *del_ips):
        network.parse_ip(ip)
    _check_ips_free(ct.ctid, add_ips, others)
    changes = dict(keys or {})
    if memory is not None:
        changes["PHYSPAGES"] = _physpages_of_memory(memory)
    if cpus is not None:
        changes["CPUS"] = f"{cpus:g}"
    if numproc is not None:
        changes["NUMPROC"] = f"{numproc}:{numproc}"
    if hostname is not None:
        changes["HOSTNAME"] = hostname
    if add_ips or del_ips:
        ips = [ip for ip in ct.ips if ip not in del_ips] + [ip for ip in add_ips if ip not in ct.ips]
        changes["IP_ADDRESS"] = " ".join(ips)
    for key, value in changes.items():
        conf.set(key, value)  # InvalidValue (21) for a bad value, before anything is applied
    if running:
        _apply_live(ct, set(changes), add_ips, del_ips)
    if save:
        conf.save()
        return []
    return [f"settings applied to the running CT {ct.ctid} only; add --save to keep them after a restart"]


def _physpages_of_memory(memory: str) -> str:
    """--memory (bytes, with K/M/G/T/P) as PHYSPAGES: kept as written when vzctl reads it the same."""
    size = parse_size(memory, what="memory")
    if problem := physpages_problem(f"{size}B"):
        raise InvalidValue(f"invalid memory {shown(memory)}: {problem}")
    return f"0:{memory.upper()}" if re.fullmatch(r"[0-9]+[KMGTP]", memory, re.IGNORECASE) else f"0:{size}B"


def _apply_live(ct: Container, changed: set[str], add_ips: Sequence[str], del_ips: Sequence[str]) -> None:
    from vzpy.execution import set_hostname

    state = ct.load_state()
    limit_keys = changed & set(LIMIT_KEYS)
    if limit_keys & {"CPUS", "CPULIMIT"}:
        limit_keys |= {"CPUS", "CPULIMIT"}  # the CFS quota is the lower of the two
    if limit_keys:
        ct.cgroups.apply(limits_of(ct.setting, limit_keys))
    if "HOSTNAME" in changed:
        set_hostname(state.init_pid, ct.hostname)
        _write_hostname(ct)
    if changed & {"NAMESERVER", "SEARCHDOMAIN"}:
        nameservers = ct.nameservers if "NAMESERVER" in changed else None
        _write_resolver(ct, nameservers, ct.searchdomains if "SEARCHDOMAIN" in changed else None)
    if changed & {"DISKSPACE", "DISKINODES"}:
        quota.enforce(ct.ctid, ct.private, ct.disk_limits)
    for ip in del_ips:
        network.del_ct_address(state.init_pid, ip)
        network.del_host_route(ip, state.veth)
    for ip in add_ips:
        network.add_ct_address(state.init_pid, ip)
        network.add_host_route(state.veth, ip)
    announce(ct, add_ips)
    stage.remember(ct, state, ips=ct.ips)


def check_config(ct: Container) -> None:
    """Fail early on values that would only break at start."""
    ct.limits  # noqa: B018 - parsing is the check; a bad value is BadConfig naming its file:line
    ct.hostname  # noqa: B018
    ct.nameservers  # noqa: B018
    ct.searchdomains  # noqa: B018
    ct.disk_limits  # noqa: B018
    try:
        for ip in ct.ips:
            network.parse_ip(ip)
    except VzError as e:
        raise BadConfig(f"{ct.conf.where('IP_ADDRESS')}: {e.message}; fix the line") from e
