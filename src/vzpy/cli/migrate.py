"""`vzpy migrate`: move a CT to another host, live (--online) or stopped, as vzmigrate does."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from vzpy.cli import display
from vzpy.cli.app import App

EPILOG = """\b
Online: sync the files while the CT runs, freeze it, dump it with its memory streamed
through SSH to a CRIU page server on HOST, sync again, restore and resume it there, then stop
and remove it here. Until HOST is asked to run it, any failure (or --max-frozen running
out) leaves it running here.
Offline (no --online): stop, sync, start on HOST.
Once HOST is asked to run the CT, the copy here is never resumed unless HOST says it did not
take it: if the link drops then, vzpy exits non-zero and leaves it suspended.
If vzpy is killed or the outcome is in doubt: `vzpy migrate --recover HOST CTID` finishes it
or undoes it, whichever HOST's state says.
\b
Examples:
  vzpy migrate --online 10.0.0.2 101
  vzpy migrate --online -t --json root@node2:2222 101
  vzpy migrate --check-only node2 101
"""


@click.command(epilog=EPILOG)
@click.argument("host")
@click.argument("ctid")
@click.option("--online", is_flag=True, help="Live migration: the CT keeps its processes and connections.")
@click.option(
    "-r",
    "--remove-area",
    type=click.Choice(["yes", "no"]),
    default="yes",
    show_default=True,
    help="Delete the private area here after success (no: keep it as PRIVATE.migrated).",
)
@click.option("--keep-dst", is_flag=True, help="On failure keep the files synced to HOST, for a faster retry.")
@click.option("--check-only", is_flag=True, help="Only connect and run the preflight checks.")
@click.option("--ssh-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="SSH private key.")
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="SSH port (or HOST:PORT).")
@click.option(
    "--known-hosts",
    type=click.Path(path_type=Path),
    envvar="VZPY_KNOWN_HOSTS",
    help="known_hosts file to verify HOST's key (default ~/.ssh/known_hosts; env VZPY_KNOWN_HOSTS).",
)
@click.option("--rsync-opts", metavar="OPTS", help="Extra rsync options, e.g. '--bwlimit=50000'.")
@click.option("--remote-vzpy", default="vzpy", show_default=True, help="vzpy command on HOST.")
@click.option(
    "-f",
    "--nodeps",
    is_flag=False,
    flag_value="all",
    default=None,
    metavar="CHECKS",
    help="Skip preflight checks: all, or a comma-separated list of: version, criu, cgroups, ctid, disk_space, "
    "cpu, ip, dumpable.",
)
@click.option(
    "--max-frozen",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest time the CT may stay frozen (online); past it the migration is undone and the CT resumed here.",
)
@click.option("-t", "--times", is_flag=True, help="Print each phase's duration and the frozen time at the end.")
@click.option("-v", "--verbose", is_flag=True, help="More detail while it runs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (progress goes to stderr).")
@click.option("--recover", is_flag=True, help="Finish or undo an interrupted migration of CTID to HOST.")
@click.pass_obj
def migrate(
    app: App,
    host: str,
    ctid: str,
    online: bool,
    remove_area: str,
    keep_dst: bool,
    check_only: bool,
    ssh_key: Path | None,
    ssh_port: int | None,
    known_hosts: Path | None,
    rsync_opts: str | None,
    remote_vzpy: str,
    nodeps: str | None,
    times: bool,
    verbose: bool,
    as_json: bool,
    max_frozen: float,
    recover: bool,
) -> None:
    """Move CT CTID to HOST ([user@]host[:port]) over SSH."""
    # imported here: paramiko costs every other vzpy command 0.1 s at start-up
    from vzpy.migrate import flow
    from vzpy.migrate.preflight import parse_nodeps
    from vzpy.migrate.ssh import parse_target

    target = parse_target(host)
    if ssh_port is not None:
        target = dataclasses.replace(target, port=ssh_port)
    options = flow.MigrateOptions(
        target=target,
        online=online,
        remove_area=remove_area == "yes",
        keep_dst=keep_dst,
        check_only=check_only,
        ssh_key=ssh_key,
        known_hosts=known_hosts,
        rsync_opts=rsync_opts,
        remote_vzpy=remote_vzpy,
        nodeps=parse_nodeps(nodeps),
        verbose=verbose,
        max_frozen=max_frozen,
    )

    def progress(message: str) -> None:
        app.progress(message, to_stderr=as_json)

    ct = app.existing(ctid)
    with app.locked(ct, f"migrate to {target.host}"):
        if recover:
            progress(flow.recover(ct, options, progress))
            return
        summary = flow.Migration(ct, options, progress).run()
    if as_json:
        app.print_json(summary.as_dict())
    elif times:
        for line in display.phase_times(summary.phases, summary.frozen_seconds, target.host):
            display.out(line)
    if not check_only:
        progress(f"CT {ctid} migrated to {target.host} ({summary.path})")
    else:
        progress(f"preflight to {target.host} passed")


@click.command(name="migrate-agent", hidden=True)
def migrate_agent() -> None:
    """Serve an incoming migration on stdin/stdout (run by `vzpy migrate` over SSH, not by hand)."""
    from vzpy.migrate.agent import serve_stdio

    sys.exit(serve_stdio())
