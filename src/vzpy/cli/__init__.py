"""vzpy's command line: thin click commands over the App in ctx.obj, added to the `cli` group here."""

from __future__ import annotations

import sys
import traceback

import click

from vzpy import __version__
from vzpy.cli import check, checkpoint, display, lifecycle, migrate, template
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
@click.version_option(__version__, prog_name=display.PROG)
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """vzpy: OpenVZ-style containers with checkpoint/restore and live migration on CRIU."""
    ctx.obj = App(debug=debug, quiet=quiet)


for _command in (
    lifecycle.create,
    lifecycle.start,
    lifecycle.stop,
    lifecycle.restart,
    lifecycle.status,
    lifecycle.list_,
    lifecycle.exec_,
    lifecycle.enter,
    lifecycle.set_,
    lifecycle.destroy,
    template.template,
    check.check,
    checkpoint.chkpnt,
    checkpoint.restore,
    checkpoint.dumpinfo,
    migrate.migrate,
    migrate.migrate_agent,
):
    cli.add_command(_command)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        code = cli.main(prog_name=display.PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.UsageError as e:
        display.usage_error(e.format_message(), e.ctx.command_path if e.ctx else None)
        code = USAGE_EXIT
    except click.ClickException as e:
        display.error(e.format_message())
        code = e.exit_code
    except click.Abort:
        display.aborted()
        code = 1
    except VzError as e:
        if debug:
            traceback.print_exc()
        display.error(e.message, e.detail)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # an unexpected failure: one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        display.internal_error(e)
        code = 3
    sys.exit(code or 0)
