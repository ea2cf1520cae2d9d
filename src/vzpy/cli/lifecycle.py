"""Lifecycle commands: create, start, stop, restart, status, list, exec, enter, set, destroy."""

from __future__ import annotations

import sys

import click

from vzpy.cli import display
from vzpy.cli.app import App
from vzpy.host import mounts
from vzpy.stage import Stage

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
    """Start CT CTID: namespaces, cgroups, network, then its /sbin/init."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "start"):
        lifecycle.check_config(ct)
        lifecycle.start(ct, app.progress)


@click.command()
@CTID
@click.option("--fast", is_flag=True, help="Kill at once instead of asking init to shut down (SIGTERM, 10 s).")
@click.pass_obj
def stop(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "stop"):
        lifecycle.stop(ct, fast=fast, progress=app.progress)


@click.command()
@CTID
@click.option("--fast", is_flag=True, help="Kill at once when stopping.")
@click.pass_obj
def restart(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID if it runs, then start it."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "restart"):
        if ct.stage() is not Stage.STOPPED:
            lifecycle.stop(ct, fast=fast, progress=app.progress)
        lifecycle.check_config(ct)
        lifecycle.start(ct, app.progress)


@click.command()
@CTID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_obj
def status(app: App, ctid: str, as_json: bool) -> None:
    """Show whether CT CTID exists, is mounted, and its stage (running, suspended, ...)."""
    ct = app.container(ctid)
    exists = ct.exists()
    stage = ct.stage() if exists else Stage.STOPPED
    mounted = exists and mounts.is_mounted(ct.root)
    if as_json:
        app.print_json(
            {
                "ctid": ctid,
                "exist": exists,
                "mounted": mounted,
                "status": stage.value,
                "init_pid": ct.load_state().init_pid if stage is not Stage.STOPPED else None,
            }
        )
        return
    running = None if stage is Stage.STOPPED else stage.value
    display.out(display.status_line(ctid, exists=exists, mounted=mounted, stage=running))


@click.command(name="list")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also list stopped CTs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (vzlist -j keys).")
@click.pass_obj
def list_(app: App, show_all: bool, as_json: bool) -> None:
    """List CTs like vzlist: CTID, NPROC, STATUS, IP_ADDR, HOSTNAME."""
    rows = []
    for ct in app.all_containers():
        stage = ct.stage()
        if stage is Stage.STOPPED and not show_all:
            continue
        rows.append(
            {
                "ctid": ct.ctid,
                "numproc": ct.nproc(),
                "status": stage.value,
                "ip": ct.ips,
                "hostname": ct.conf.get("HOSTNAME") or ct.hostname,  # as written: one bad value must not hide all
            }
        )
    if as_json:
        app.print_json(rows)
        return
    for line in display.ct_table(rows):
        display.out(line)


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@CTID
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(app: App, ctid: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (argv, no shell: use `sh -c '...'` for one) in CT CTID; its exit code is vzpy's.

    Its stdin, stdout and stderr are pipes relayed by vzpy, and it starts a session of its own inside the
    CT: no fd or terminal of the caller reaches the CT, so what it leaves running stays checkpointable.
    """
    from vzpy import execution

    sys.exit(execution.exec_in(app.existing(ctid), command))


@click.command()
@CTID
@click.pass_obj
def enter(app: App, ctid: str) -> None:
    """Open an interactive login shell in CT CTID, on a pty allocated inside the CT (relayed by vzpy)."""
    from vzpy import execution

    sys.exit(execution.enter(app.existing(ctid)))


@click.command(name="set")
@CTID
@click.option("--hostname", help="New hostname.")
@click.option("--ipadd", "add_ips", multiple=True, metavar="IP", help="Add an IP address; repeatable.")
@click.option("--ipdel", "del_ips", multiple=True, metavar="IP", help="Remove an IP address; repeatable.")
@click.option("--memory", "--ram", "memory", metavar="SIZE", help="Memory limit, e.g. 512M (PHYSPAGES).")
@click.option("--cpus", type=click.FloatRange(min=0), help="CPU limit in CPUs, e.g. 1.5 (0: no limit).")
@click.option("--numproc", type=click.IntRange(min=0), help="Process limit (0: no limit).")
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
    save: bool,
) -> None:
    """Change CT CTID's settings: applied at once if it runs, kept with --save."""
    from vzpy import lifecycle

    ct = app.existing(ctid)
    with app.locked(ct, "set"):
        notes = lifecycle.apply_settings(
            ct,
            hostname=hostname,
            add_ips=add_ips,
            del_ips=del_ips,
            memory=memory,
            cpus=cpus,
            numproc=numproc,
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
