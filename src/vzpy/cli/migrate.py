"""`vzpy migrate`: move a CT to another host, live (--online) or stopped, as vzmigrate does."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from vzpy.cli import display
from vzpy.cli.app import App
from vzpy.cli.compat import ssh_options as compat_ssh_options
from vzpy.cli.compat import vzmigrate_codes

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
Online paths (`--check-only --online` says which one and why, from both hosts' kernels and CRIUs):
  pre-copy       memory copied while the CT runs, in rounds each sending only what changed
                 (taken when this kernel tracks dirty memory); then the rest, frozen
  stop-and-copy  all memory copied while the CT is frozen (taken when pre-copy cannot be)
  post-copy      the CT runs on HOST at once, its memory follows from here. Taken only with
                 --postcopy (or vz.conf VZPY_MIGRATE_POSTCOPY=yes). Its risk: from the restore on
                 HOST, the copy here is never resumed, and once the CT runs there, this host
                 must keep serving its pages until all arrived: if either host or the link
                 fails before that, the CT is LOST (no copy of it is complete).
Examples:
  vzpy migrate --online 10.0.0.2 101
  vzpy migrate --online -t --json root@node2:2222 101
  vzpy migrate --check-only node2 101
"""


@click.command(epilog=EPILOG)
@click.argument("host")
@click.argument("ctid")
@click.option(
    "--live", "--online", "online", is_flag=True, help="Live migration: the CT keeps its processes and connections."
)
@click.option(
    "-r",
    "--remove-area",
    type=click.Choice(["yes", "no"]),
    default="yes",
    show_default=True,
    help="Delete the private area here after success (no: keep it as PRIVATE.migrated).",
)
@click.option("--keep-dst", is_flag=True, help="On failure keep the files synced to HOST, for a faster retry.")
@click.option(
    "--check-only", "--dry-run", "check_only", is_flag=True, help="Only connect and run the preflight checks."
)
@click.option("--ssh-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="SSH private key.")
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="SSH port (or HOST:PORT).")
@click.option(
    "--known-hosts",
    type=click.Path(path_type=Path),
    envvar="VZPY_KNOWN_HOSTS",
    help="known_hosts file to verify HOST's key (default ~/.ssh/known_hosts; env VZPY_KNOWN_HOSTS).",
)
@click.option(
    "--rsync-opts", "--rsync", "rsync_opts", metavar="OPTS", help="Extra rsync options, e.g. '--bwlimit=50000'."
)
@click.option(
    "--ssh",
    "ssh_opts",
    metavar="OPTS",
    help="vzmigrate's ssh options: -p PORT, -l USER, -i KEY, -o Port/User/IdentityFile/UserKnownHostsFile=VALUE.",
)
@click.option("--ssh-mux", is_flag=True, hidden=True, help="vzmigrate's; vzpy always shares one SSH connection.")
@click.option("--remote-vzpy", default="vzpy", show_default=True, help="vzpy command on HOST.")
@click.option(
    "-f",
    "--nodeps",
    is_flag=False,
    flag_value="all",
    default=None,
    metavar="CHECKS",
    help="Skip preflight checks: all, or a comma-separated list of: version, criu, cgroups, ctid, disk_space, "
    "cpu, ip, dumpable, old_area (with -r no: PRIVATE.migrated is free here).",
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
@click.option("--precopy", "path", flag_value="pre-copy", help="Online: copy memory while the CT runs, or fail.")
@click.option(
    "--postcopy",
    "path",
    flag_value="post-copy",
    help="Online: run the CT on HOST first, memory after; a host or link failure then LOSES the CT.",
)
@click.option("--stop-and-copy", "path", flag_value="stop-and-copy", help="Online: copy all memory while frozen.")
@click.option(
    "--precopy-iterations",
    type=click.IntRange(1, 100),
    default=8,
    show_default=True,
    metavar="N",
    help="Pre-copy: at most N rounds before the freeze.",
)
@click.option(
    "--precopy-small",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    metavar="PAGES",
    help="Pre-copy: freeze once a round sent at most PAGES pages.",
)
@click.option(
    "--precopy-shrink",
    type=click.FloatRange(min=0, max=100, max_open=True),
    default=10.0,
    show_default=True,
    metavar="PERCENT",
    help="Pre-copy: freeze once a round sent less than PERCENT % fewer pages than the one before.",
)
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
    ssh_opts: str | None,
    ssh_mux: bool,
    remote_vzpy: str,
    nodeps: str | None,
    times: bool,
    verbose: bool,
    as_json: bool,
    max_frozen: float,
    recover: bool,
    path: str | None,
    precopy_iterations: int,
    precopy_small: int,
    precopy_shrink: float,
) -> None:
    """Move CT CTID to HOST ([user@]host[:port]) over SSH."""
    # imported here: paramiko costs every other vzpy command 0.1 s at start-up
    from vzpy.criu.binary import load_rpc_soon
    from vzpy.migrate import flow
    from vzpy.migrate.precopy import StopRule
    from vzpy.migrate.preflight import parse_nodeps
    from vzpy.migrate.ssh import parse_target

    ssh = compat_ssh_options(ssh_opts)  # vzmigrate's --ssh: a user, port, key or known_hosts of ssh(1)
    target = parse_target(f"{ssh.user}@{host}" if ssh.user is not None and "@" not in host else host)
    port = ssh_port if ssh_port is not None else ssh.port
    if port is not None:
        target = dataclasses.replace(target, port=port)
    ssh_key, known_hosts = ssh_key or ssh.identity, known_hosts or ssh.known_hosts
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
        path=path,
        stop_rule=StopRule(precopy_iterations, precopy_small, precopy_shrink),
    )

    def progress(message: str) -> None:
        app.progress(message, to_stderr=as_json)

    with vzmigrate_codes():
        ct = app.existing(ctid)
    with vzmigrate_codes(), app.locked(ct, f"migrate to {target.host}"):
        if recover:
            progress(flow.recover(ct, options, progress))
            return
        if online:
            load_rpc_soon()  # the path's choice asks CRIU here once HOST answered: loaded while it connects
        summary = flow.Migration(ct, options, progress).run()
    if as_json:
        app.print_json(summary.as_dict())
    elif times:
        for line in display.phase_times(summary.phases, summary.frozen_seconds, target.host):
            display.out(line)
    if not check_only:
        progress(f"CT {ctid} migrated to {target.host} ({summary.path})")
    elif online:
        progress(f"preflight to {target.host} passed; the migration would take {summary.path}")
    else:
        progress(f"preflight to {target.host} passed")


@click.command(name="migrate-agent", hidden=True)
def migrate_agent() -> None:
    """Serve an incoming migration on stdin/stdout (run by `vzpy migrate` over SSH, not by hand)."""
    from vzpy.migrate.agent import serve_stdio

    sys.exit(serve_stdio())
