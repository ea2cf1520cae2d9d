"""vzpy's command line: thin click commands over the App in ctx.obj."""

from __future__ import annotations

import sys
import traceback

import click

from vzpy import __version__
from vzpy.cli.app import App
from vzpy.errors import VzError

USAGE_EXIT = 20  # vzctl's VZ_INVALID_PARAMETER_SYNTAX

EPILOG = """\b
Examples:
  vzpy create 101 --ostemplate minimal --ipadd 10.0.0.101
  vzpy start 101 && vzpy exec 101 hostname
  vzpy list --json
  vzpy stop 101 && vzpy destroy 101

Exit codes follow vzctl's (docs/exit-codes.md). VZPY_CONF=/path/vz.conf selects another global config.
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and CRIU's full logs on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and requested data.")
@click.version_option(__version__, prog_name="vzpy")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """vzpy: OpenVZ-style containers with checkpoint/restore and live migration on CRIU."""
    ctx.obj = App(debug=debug, quiet=quiet)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.UsageError as e:
        where = f"`{e.ctx.command_path} --help`" if e.ctx else "`vzpy --help`"
        click.echo(f"vzpy: error: {e.format_message()} (see {where})", err=True)
        code = USAGE_EXIT
    except click.ClickException as e:
        click.echo(f"vzpy: error: {e.format_message()}", err=True)
        code = e.exit_code
    except click.Abort:
        click.echo("vzpy: aborted", err=True)
        code = 1
    except VzError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"vzpy: error: {e.message}", err=True)
        if e.detail:
            click.echo(e.detail, err=True)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # an unexpected failure: one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        click.echo(f"vzpy: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", err=True)
        code = 3
    sys.exit(code or 0)


from vzpy.cli import check, checkpoint, lifecycle, migrate, template  # noqa: E402, F401 - register commands
