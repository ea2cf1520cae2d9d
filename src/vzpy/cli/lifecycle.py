"""Lifecycle commands: create, start, stop, restart, status, list, exec, enter, set, destroy."""

from __future__ import annotations

import sys

import click

from vzpy import execution, lifecycle
from vzpy.cli import cli
from vzpy.cli.app import App
from vzpy.stage import Stage

pass_app = click.make_pass_decorator(App)
CTID = click.argument("ctid")


@cli.command()
@CTID
@click.option("--ostemplate", required=True, help="Template: 'minimal' (built in) or NAME of a NAME.tar.* in TEMPLATE.")
@click.option("--hostname", help="The CT's hostname (default: ctCTID).")
@click.option("--ipadd", "ips", multiple=True, metavar="IP", help="An IP address for the CT; repeatable.")
@pass_app
def create(app: App, ctid: str, ostemplate: str, hostname: str | None, ips: tuple[str, ...]) -> None:
    """Create CT CTID: its private area from a template and its CTID.conf."""
    ct = app.container(ctid)
    with app.locked(ct, "create"):
        lifecycle.create(ct, ostemplate, hostname=hostname, ips=ips, others=app.all_containers())
    app.progress(f"CT {ctid} created from template {ostemplate} in {ct.private}")


@cli.command()
@CTID
@pass_app
def start(app: App, ctid: str) -> None:
    """Start CT CTID: namespaces, cgroups, network, then its /sbin/init."""
    ct = app.existing(ctid)
    with app.locked(ct, "start"):
        lifecycle.check_config(ct)
        lifecycle.start(ct, app.progress)


@cli.command()
@CTID
@click.option("--fast", is_flag=True, help="Kill at once instead of asking init to shut down (SIGTERM, 10 s).")
@pass_app
def stop(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID."""
    ct = app.existing(ctid)
    with app.locked(ct, "stop"):
        lifecycle.stop(ct, fast=fast, progress=app.progress)


@cli.command()
@CTID
@click.option("--fast", is_flag=True, help="Kill at once when stopping.")
@pass_app
def restart(app: App, ctid: str, fast: bool) -> None:
    """Stop CT CTID if it runs, then start it."""
    ct = app.existing(ctid)
    with app.locked(ct, "restart"):
        if ct.stage() is not Stage.STOPPED:
            lifecycle.stop(ct, fast=fast, progress=app.progress)
        lifecycle.check_config(ct)
        lifecycle.start(ct, app.progress)


@cli.command()
@CTID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_app
def status(app: App, ctid: str, as_json: bool) -> None:
    """Show whether CT CTID exists, is mounted, and its stage (running, suspended, ...)."""
    ct = app.container(ctid)
    exists = ct.exists()
    stage = ct.stage() if exists else Stage.STOPPED
    mounted = exists and lifecycle.is_mounted(ct.root)
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
    words = [
        "exist" if exists else "deleted",
        "mounted" if mounted else "unmounted",
        "down" if stage is Stage.STOPPED else stage.value,
    ]
    click.echo(f"CTID {ctid} {' '.join(words)}")


@cli.command(name="list")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also list stopped CTs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (vzlist -j keys).")
@pass_app
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
                "hostname": ct.hostname,
            }
        )
    if as_json:
        app.print_json(rows)
        return
    click.echo(f"{'CTID':>10} {'NPROC':>5} {'STATUS':<9} {'IP_ADDR':<15} HOSTNAME")
    for row in rows:
        ip = " ".join(row["ip"]) or "-"
        click.echo(f"{row['ctid']:>10} {row['numproc']:>5} {row['status']:<9} {ip:<15} {row['hostname']}")


@cli.command(name="exec", context_settings={"ignore_unknown_options": True})
@CTID
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_app
def exec_(app: App, ctid: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (argv, no shell: use `sh -c '...'` for one) in CT CTID; its exit code is vzpy's."""
    sys.exit(execution.exec_in(app.existing(ctid), command))


@cli.command()
@CTID
@pass_app
def enter(app: App, ctid: str) -> None:
    """Open an interactive login shell in CT CTID, on a pty inside the CT."""
    sys.exit(execution.enter(app.existing(ctid)))


@cli.command(name="set")
@CTID
@click.option("--hostname", help="New hostname.")
@click.option("--ipadd", "add_ips", multiple=True, metavar="IP", help="Add an IP address; repeatable.")
@click.option("--ipdel", "del_ips", multiple=True, metavar="IP", help="Remove an IP address; repeatable.")
@click.option("--memory", "--ram", "memory", metavar="SIZE", help="Memory limit, e.g. 512M (PHYSPAGES).")
@click.option("--cpus", type=click.FloatRange(min=0), help="CPU limit in CPUs, e.g. 1.5 (0: no limit).")
@click.option("--numproc", type=click.IntRange(min=0), help="Process limit (0: no limit).")
@click.option("--save", is_flag=True, help="Store the settings in CTID.conf (needed for a stopped CT).")
@pass_app
def set_(app: App, ctid: str, save: bool, **settings: object) -> None:
    """Change CT CTID's settings: applied at once if it runs, kept with --save."""
    ct = app.existing(ctid)
    with app.locked(ct, "set"):
        notes = lifecycle.apply_settings(ct, save=save, others=app.all_containers(), **settings)  # type: ignore[arg-type]
    for note in notes:
        click.echo(f"vzpy: warning: {note}", err=True)
    app.progress(f"CT {ctid} settings {'saved' if save else 'applied'}")


@cli.command()
@CTID
@pass_app
def destroy(app: App, ctid: str) -> None:
    """Delete stopped CT CTID: private area, root mount point; CTID.conf is kept as CTID.conf.destroyed."""
    ct = app.existing(ctid)
    with app.locked(ct, "destroy"):
        lifecycle.destroy(ct)
    app.progress(f"CT {ctid} destroyed")
