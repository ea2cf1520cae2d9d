"""`vzpy check`: which CRIU, which features this host has, and what vzpy will therefore do."""

from __future__ import annotations

from pathlib import Path

import click

from vzpy.cli import cli
from vzpy.cli.app import App
from vzpy.criu import detect_capabilities, report, require_criu

pass_app = click.make_pass_decorator(App)
CACHE_DIR = Path("/var/cache/vzpy")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cached results.")
@pass_app
def check(app: App, as_json: bool, refresh: bool) -> None:
    """Report CRIU's version, the features checkpoint and migration need, and the path vzpy takes."""
    binary = require_criu(app.gconf.values.get("CRIU"))
    result = report(detect_capabilities(binary, CACHE_DIR, refresh=refresh))
    if as_json:
        app.print_json(result.as_dict())
        return
    click.echo(f"CRIU {binary.version} at {binary.path} (kernel {result.capabilities.kernel})")
    for row in result.rows:
        click.echo(f"  {'yes' if row.ok else 'no ':<4} {row.feature:<22} {row.note}")
    for sentence in result.sentences:
        click.echo(sentence)
