"""Lifecycle commands: create, start, stop, restart, status, exec, enter, set, destroy (list: listing.py)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vzpy.cli import display
from vzpy.cli.app import App
from vzpy.container import Container
from vzpy.errors import InvalidSyntax, Locked, MigrationInDoubt, VzError
from vzpy.host import mounts
from vzpy.stage import Action, Stage

CTID = click.argument("ctid")


@click.command()
@CTID
@click.option("--ostemplate", required=True, help="Template: 'minimal' (built in) or NAME of a NAME.tar.* in TEMPLATE.")
@click.option("--hostname", help="The CT's hostname (default: ctCTID).")
@click.option("--ipadd", "ips", multiple=True, metavar="IP", help="An IP address for the CT; repeatable.")
@click.pass_obj
def create(app: App, ctid: str, ostemplate: str, hostname: str | None, ips: tuple[str, ...]) -> None:
    """Create CT CTID: its private area from a template and its CTID.conf."""
    from vzpy import lifecycle

    ct = app.container(ctid)
    with app.locked(ct, "create"):
        lifecycle.create(ct, ostemplate, hostname=hostname, ips=ips, others=app.all_containers())
    app.progress(f"CT {ctid} created from template {ostemplate} in {ct.private}")


@click.command()
@CTID
@click.pass_obj
def start(app: App, ctid: str) -> None:
    """Start CT CTID: namespaces, cgroups, network, then its /sbin/init.

    A CT stopped by `chkpnt` is restored from its dump file instead, as vzctl does; if that restore fails,
    the CT starts afresh and the dump file is kept.
    """
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "start"):
        dump = waiting_dump(ct)
        if dump is not None and _restored(app, ct, dump):
            return
        lifecycle.check_config(ct)
        lifecycle.start(ct, app.progress)


def waiting_dump(ct: Container) -> Path | None:
    """The dump file a stopped CT was checkpointed to and not restored from since (vzctl's "suspended")."""
    if ct.stage() is not Stage.STOPPED:
        return None
    recorded = ct.load_state().dumpfile
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def _restored(app: App, ct: Container, dump: Path) -> bool:
    from vzpy import checkpoint

    app.progress(f"Dump file {dump} exists, trying to restore CT {ct.ctid} from it")
    try:
        checkpoint.run_restore(
            ct, [Action.UNDUMP, Action.RESTORE_RESUME], dump, skip_fs_check=False, progress=app.progress
        )
    except (Locked, MigrationInDoubt):
        raise
    except VzError as e:
        app.warn(f"restore from {dump} failed ({e.message}); starting CT {ct.ctid} afresh, the dump file is kept")
        return False
    return True


@click.command()
@CTID
@click.option(
    "--fast", is_flag=True, help="Kill at once instead of asking init to shut down (SIGTERM, STOP_TIMEOUT: 120 s)."
)
@click.pass_obj
def stop(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID: init is asked to shut it down (SIGTERM), what is left after STOP_TIMEOUT is killed.

    A CT that is not running is left as it is (exit 0), as vzctl does.
    """
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "stop"):
        if ct.stage() is Stage.STOPPED:
            app.progress(f"Unable to stop: CT {ctid} is not running", to_stderr=True)
            return
        lifecycle.stop(ct, fast=fast, progress=app.progress)


@click.command()
@CTID
@click.option("--fast", is_flag=True, help="Kill at once when stopping.")
@click.pass_obj
def restart(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID if it runs, then start it; the config is checked before anything stops."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "restart"):
        lifecycle.check_config(ct)  # a config that cannot start must not stop a running CT first
        if ct.stage() is not Stage.STOPPED:
            lifecycle.stop(ct, fast=fast, progress=app.progress)
        else:  # as start: a CT stopped by chkpnt is restored
            dump = waiting_dump(ct)
            if dump is not None and _restored(app, ct, dump):
                return
        lifecycle.start(ct, app.progress)


@click.command()
@CTID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_obj
def status(app: App, ctid: str, as_json: bool) -> None:
    """Show vzctl's status line: `CTID 101 exist mounted running`, `... down suspended` when a dump waits.

    --json also gives the stage (running, suspended, dumped, undumped, stopped) and the waiting dump file.
    """
    ct = app.container(ctid)
    exists = ct.exists()
    stage = ct.stage() if exists else Stage.STOPPED
    mounted = exists and mounts.is_mounted(ct.root)
    dump = waiting_dump(ct) if exists else None
    if as_json:
        app.print_json(
            {
                "ctid": ctid,
                "exist": exists,
                "mounted": mounted,
                "status": stage.value,
                "init_pid": ct.load_state().init_pid if stage is not Stage.STOPPED else None,
                "suspended": dump is not None,
                "dumpfile": str(dump) if dump is not None else None,
            }
        )
        return
    line = display.status_line(
        ctid, exists=exists, mounted=mounted, running=stage is not Stage.STOPPED, suspended=dump is not None
    )
    display.out(line)


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@CTID
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(app: App, ctid: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in CT CTID; its exit code is vzpy's.

    Several words run as argv, no shell (`vzpy exec 101 sh -c 'exit 7'` exits 7); a single one is a
    command line for the CT's shell, as vzctl runs it (`vzpy exec 101 'ps ax | grep init'`); `-` makes
    the CT's shell read its commands from stdin. Its stdin, stdout and stderr are pipes relayed by vzpy,
    and it starts a session of its own inside the CT: no fd or terminal of the caller reaches the CT, so
    what it leaves running stays checkpointable. While `vzpy exec` itself runs, its command's parent is on
    the host: chkpnt waits 2 s for it to end, then refuses. Start a daemon detached:
    `vzpy exec 101 'setsid CMD </dev/null >/dev/null 2>&1 &'`.
    """
    from vzpy import execution

    ct = app.existing(ctid)
    if len(command) == 1:
        sys.exit(execution.exec_shell(ct, None if command[0] == "-" else command[0]))
    sys.exit(execution.exec_in(ct, command))


@click.command()
@CTID
@click.pass_obj
def enter(app: App, ctid: str) -> None:
    """Open an interactive login shell in CT CTID, on a pty allocated inside the CT (relayed by vzpy)."""
    from vzpy import execution

    sys.exit(execution.enter(app.existing(ctid)))


# vzctl's `set` options that are one CTID.conf key each (ctid.conf(5)): option -> (KEY, help)
CONFIG_KEY_OPTIONS = {
    "--nameserver": ("NAMESERVER", "DNS server address for the CT's resolv.conf, or inherit (the host's); repeatable."),
    "--searchdomain": ("SEARCHDOMAIN", "DNS search domain for the CT's resolv.conf, or inherit; repeatable."),
    "--cpuunits": ("CPUUNITS", "CPU weight, 8-500000 (cpu.shares; 1000 is the usual default)."),
    "--cpulimit": ("CPULIMIT", "CPU limit in % of one CPU (150), or N% of the whole host (50%); 0: none."),
    "--physpages": ("PHYSPAGES", "Memory limit as barrier:limit in pages or sizes (0:262144, 0:1G, unlimited)."),
    "--swappages": ("SWAPPAGES", "Swap allowance as barrier:limit in pages or sizes (memsw = memory + swap)."),
    "--diskspace": ("DISKSPACE", "Disk space soft:hard in 1K blocks or sizes (10G:11G); project quota."),
    "--diskinodes": ("DISKINODES", "Inodes soft:hard (200000:220000); project quota."),
    "--onboot": ("ONBOOT", "yes|no: start the CT at host boot."),
    "--disabled": ("DISABLED", "yes|no: refuse to start the CT."),
}
_YES_NO = click.Choice(["yes", "no"])


def _config_key_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add CONFIG_KEY_OPTIONS to `command`, which gets them as `config_keys`: {KEY: value} of those given
    (a repeated option's values joined with spaces, as vzctl stores them)."""
    names = [key.lower() for key, _help in CONFIG_KEY_OPTIONS.values()]

    @functools.wraps(command)
    def with_keys(*args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in names}
        keys = {name.upper(): v if isinstance(v, str) else " ".join(v) for name, v in given.items() if v}
        command(*args, config_keys=keys, **kwargs)

    wrapped: Callable[..., None] = with_keys
    for option, (key, text) in reversed(CONFIG_KEY_OPTIONS.items()):
        repeatable = key in ("NAMESERVER", "SEARCHDOMAIN")
        kind = _YES_NO if key in ("ONBOOT", "DISABLED") else None
        wrapped = click.option(option, key.lower(), type=kind, multiple=repeatable, help=text)(wrapped)
    return wrapped


@click.command(name="set")
@CTID
@click.option("--hostname", help="New hostname.")
@click.option("--ipadd", "add_ips", multiple=True, metavar="IP", help="Add an IP address; repeatable.")
@click.option("--ipdel", "del_ips", multiple=True, metavar="IP", help="Remove an IP address; repeatable.")
@click.option("--memory", "--ram", "memory", metavar="SIZE", help="Memory limit, e.g. 512M (PHYSPAGES).")
@click.option("--cpus", type=click.FloatRange(min=0), help="CPU limit in CPUs, e.g. 1.5 (0: no limit).")
@click.option("--numproc", type=click.IntRange(min=0), help="Process limit (0: no limit).")
@click.option(
    "--stop-timeout",
    type=click.IntRange(min=0, max=999999999),
    metavar="SECONDS",
    help="How long `stop` waits for init before killing (STOP_TIMEOUT; 0: the default, 120 s). Needs --save.",
)
@_config_key_options
@click.option("--save", is_flag=True, help="Store the settings in CTID.conf (needed for a stopped CT).")
@click.pass_obj
def set_(
    app: App,
    ctid: str,
    hostname: str | None,
    add_ips: tuple[str, ...],
    del_ips: tuple[str, ...],
    memory: str | None,
    cpus: float | None,
    numproc: int | None,
    stop_timeout: int | None,
    save: bool,
    config_keys: dict[str, str],
) -> None:
    """Change CT CTID's settings: applied at once if it runs, kept with --save.

    Only what is given changes, live and in CTID.conf (a live change made without --save stays). Values of
    the vzctl options are vzctl's (ctid.conf(5)): pages or sizes for --physpages/--swappages, 1K blocks or
    sizes for --diskspace, barrier:limit pairs, `unlimited`."""
    from vzpy import lifecycle

    if stop_timeout is not None and not save:
        raise InvalidSyntax("--stop-timeout is a setting of CTID.conf only: add --save")
    ct = app.existing(ctid)
    with app.locked(ct, "set"):
        if stop_timeout is not None:
            ct.conf.set("STOP_TIMEOUT", str(stop_timeout))  # written with the others by --save
        notes = lifecycle.apply_settings(
            ct,
            hostname=hostname,
            add_ips=add_ips,
            del_ips=del_ips,
            memory=memory,
            cpus=cpus,
            numproc=numproc,
            keys=config_keys,
            save=save,
            others=app.all_containers(),
        )
    for note in notes:
        app.warn(note)
    app.progress(f"CT {ctid} settings {'saved' if save else 'applied'}")


@click.command()
@CTID
@click.pass_obj
def destroy(app: App, ctid: str) -> None:
    """Delete stopped CT CTID: private area, root mount point; CTID.conf is kept as CTID.conf.destroyed."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "destroy"):
        lifecycle.destroy(ct)
    app.progress(f"CT {ctid} destroyed")
