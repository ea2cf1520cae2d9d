"""`vzpy check`: which CRIU, which features this host has, and what vzpy will therefore do."""

from __future__ import annotations

from pathlib import Path

import click

from vzpy.cli import display
from vzpy.cli.app import App

CACHE_DIR = Path("/var/cache/vzpy")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cached results.")
@click.pass_obj
def check(app: App, as_json: bool, refresh: bool) -> None:
    """Report CRIU's version, the features checkpoint and migration need, and the path vzpy takes."""
    from vzpy.criu import detect_capabilities, report, require_criu

    binary = require_criu(app.gconf.values.get("CRIU"))
    result = report(detect_capabilities(binary, CACHE_DIR, refresh=refresh))
    if as_json:
        app.print_json(result.as_dict())
        return
    display.out(f"CRIU {binary.version} at {binary.path} (kernel {result.capabilities.kernel})")
    for row in result.rows:
        display.out(display.feature_line(row.ok, row.feature, row.note))
    for sentence in result.sentences:
        display.out(sentence)
