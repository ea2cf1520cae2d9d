"""`vzpy boot start|stop`: the host's boot and shutdown of its CTs, run by the vzpy systemd unit (vzpy.boot)."""

from __future__ import annotations

import click

from vzpy.cli.app import App

BOOT_EPILOG = """\b
The vzpy systemd unit (installed by `make setup`) runs `vzpy boot start` at boot and
`vzpy boot stop` at shutdown. vz.conf VE_STOP_MODE=suspend (the default) checkpoints the
running CTs at shutdown and restores them at boot; VE_STOP_MODE=stop stops them.
CTs with ONBOOT=yes are started at boot, higher BOOTORDER first.
"""


@click.group(epilog=BOOT_EPILOG)
def boot() -> None:
    """Start the host's CTs at boot and checkpoint or stop them at shutdown (the vzpy service)."""


@boot.command(name="start")
@click.option("--dry-run", is_flag=True, help="Only show what would be done.")
@click.pass_obj
def boot_start(app: App, dry_run: bool) -> None:
    """Restore the CTs checkpointed at shutdown and start those with ONBOOT=yes."""
    from vzpy import boot as host_boot

    outcomes = host_boot.boot(
        app.gconf, app.all_containers(), host_boot.vzpy_runner(app.progress), app.progress, dry_run=dry_run
    )
    if not dry_run:
        app.progress(host_boot.check_outcomes("boot start", outcomes))


@boot.command(name="stop")
@click.option(
    "--mode",
    type=click.Choice(["suspend", "stop"]),
    help="Checkpoint (suspend) or stop the running CTs (default: VE_STOP_MODE in vz.conf, else suspend).",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be done.")
@click.pass_obj
def boot_stop(app: App, mode: str | None, dry_run: bool) -> None:
    """Checkpoint every running CT to its dump file (VE_STOP_MODE=suspend) or stop it (VE_STOP_MODE=stop)."""
    from vzpy import boot as host_boot

    chosen = host_boot.StopMode(mode) if mode else host_boot.stop_mode(app.gconf, app.warn)
    outcomes = host_boot.shutdown(
        app.gconf, app.all_containers(), chosen, host_boot.vzpy_runner(app.progress), app.progress, dry_run=dry_run
    )
    if not dry_run:
        app.progress(host_boot.check_outcomes(f"boot stop ({chosen})", outcomes))
