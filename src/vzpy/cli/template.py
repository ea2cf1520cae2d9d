"""Template commands: list the templates, create an OS template with debootstrap."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vzpy.cli import display
from vzpy.cli.app import App

if TYPE_CHECKING:
    from vzpy.templates import TemplateStore

DEBIAN_SUITES = {"debian-12": "bookworm", "debian-13": "trixie"}


@click.group()
def template() -> None:
    """OS templates that CTs are created from (TEMPLATE dir of vz.conf)."""


@template.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def list_(app: App, as_json: bool) -> None:
    """List available templates: 'minimal' (built in) and every NAME.tar.{gz,xz,zst}."""
    names = _store(app).names()
    if as_json:
        app.print_json(names)
    else:
        for name in names:
            display.out(name)


@template.command()
@click.argument("name", type=click.Choice(sorted(DEBIAN_SUITES)))
@click.option("--mirror", default="http://deb.debian.org/debian", show_default=True, help="Debian mirror.")
@click.pass_obj
def create(app: App, name: str, mirror: str) -> None:
    """Build template NAME with debootstrap (minbase + vzpy's init), as NAME.tar.zst."""
    path = _store(app).create_debian(name=name, suite=DEBIAN_SUITES[name], mirror=mirror, progress=app.progress)
    app.progress(f"template {name} created: {path}")


def _store(app: App) -> TemplateStore:
    # imported here: importlib.resources and zipfile add ~5 ms to every other command's start-up
    from vzpy.templates import TemplateStore

    return TemplateStore(app.gconf.template_dir)
