"""`vzpy check`: which CRIU, which features this host has, and what vzpy will therefore do."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vzpy.cli import display
from vzpy.cli.app import App

if TYPE_CHECKING:
    from vzpy.migrate.paths import PathChoice


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cached results.")
@click.option(
    "--to",
    "to_host",
    metavar="HOST",
    help="Also ask HOST ([user@]host[:port], over SSH) and say which path a live migration there would take.",
)
@click.option("--ssh-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="SSH key for --to.")
@click.option("--known-hosts", type=click.Path(path_type=Path), envvar="VZPY_KNOWN_HOSTS", help="For --to.")
@click.option("--remote-vzpy", default="vzpy", show_default=True, help="vzpy command on HOST.")
@click.pass_obj
def check(
    app: App,
    as_json: bool,
    refresh: bool,
    to_host: str | None,
    ssh_key: Path | None,
    known_hosts: Path | None,
    remote_vzpy: str,
) -> None:
    """Report CRIU's version, the features checkpoint and migration need, and the path vzpy takes."""
    from vzpy.criu import detect_capabilities, report, require_criu
    from vzpy.criu.features import DEFAULT_CACHE_DIR
    from vzpy.migrate import paths

    binary = require_criu(app.gconf.values.get("CRIU"))
    result = report(detect_capabilities(binary, DEFAULT_CACHE_DIR, refresh=refresh))
    ours = result.capabilities.migration_facts()
    allowed = paths.postcopy_policy(app.gconf.values.get(paths.POLICY_KEY))
    if to_host is None:
        where, choice = "a host like this one", paths.choose(ours, ours, postcopy_allowed=allowed)
    else:
        where, choice = to_host, _path_to(to_host, ours, allowed, ssh_key, known_hosts, remote_vzpy)
    if as_json:
        app.print_json({**result.as_dict(), "migration": {"to": where, **choice.as_dict()}})
        return
    display.out(f"CRIU {binary.version} at {binary.path} (kernel {result.capabilities.kernel})")
    for row in result.rows:
        display.out(display.feature_line(row.ok, row.feature, row.note))
    for sentence in result.sentences:
        display.out(sentence)
    display.out(f"a live migration from here to {where} would take {choice.path}:")
    for reason in choice.reasons:
        display.out(f"  {reason}")


def _path_to(
    host: str, ours: dict[str, Any], allowed: bool, ssh_key: Path | None, known_hosts: Path | None, remote_vzpy: str
) -> PathChoice:
    from vzpy.migrate import flow
    from vzpy.migrate.ssh import parse_target

    options = flow.MigrateOptions(
        target=parse_target(host), online=True, ssh_key=ssh_key, known_hosts=known_hosts, remote_vzpy=remote_vzpy
    )
    return flow.path_to(options, ours, allowed)
