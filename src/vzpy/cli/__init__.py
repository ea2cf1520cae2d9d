"""vzpy's command line: thin click commands over the App in ctx.obj, added to the `cli` group here."""

from __future__ import annotations

import atexit
import os
import sys
import traceback

import click

from vzpy import __version__
from vzpy.cli import check, checkpoint, display, host, lifecycle, listing, migrate, template
from vzpy.cli.app import App
from vzpy.errors import VzError

USAGE_EXIT = 20  # vzctl's VZ_INVALID_PARAMETER_SYNTAX
MISSING_CTID_EXIT = 21  # vzctl's VZ_INVALID_PARAMETER_VALUE: "CT ID missing"
MIGRATE_USAGE_EXIT = 1  # vzmigrate's MIG_ERR_USAGE

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
    listing.list_,
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
    host.boot,
):
    cli.add_command(_command)


def main() -> None:
    """The console entry: `vzpy`, or vzctl/vzlist/vzmigrate when invoked under those names (argv[0])."""
    from vzpy.cli import compat

    exit_code: list[int] = []
    if atexit._ncallbacks() == 0:  # one registered before (coverage's, which saves its data) would be skipped
        atexit.register(_exit_at_once, exit_code)
    code = compat.dispatch(sys.argv[0], sys.argv[1:])
    exit_code.append(code)
    sys.exit(code)


def _exit_at_once(exit_code: list[int]) -> None:
    """The last step of main's exit (the first atexit handler registered runs last): end the process without
    the interpreter's teardown of every module and object, ~25 ms after a chkpnt or restore. What an exit does
    before that has been done: the threads waited for, the atexit handlers registered since run; stdout and
    stderr are flushed here (if that fails, the normal exit goes on and reports it)."""
    if not exit_code:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(exit_code[0])


def run(args: list[str]) -> int:
    """Run vzpy's command line on args; returns the exit code (vzctl's codes)."""
    debug = "--debug" in args
    try:
        code = cli.main(args, prog_name=display.PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except SystemExit as e:  # exec and enter end with their command's exit code
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except click.UsageError as e:
        display.usage_error(e.format_message(), e.ctx.command_path if e.ctx else None)
        code = usage_exit_code(e)
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
    return code or 0


def usage_exit_code(e: click.UsageError) -> int:
    """vzctl's code for a usage error: 21 for a missing CTID ("CT ID missing"), 20 otherwise; vzmigrate's
    MIG_ERR_USAGE for any usage error of `migrate` (also under `vzpy migrate`)."""
    if e.ctx is not None and e.ctx.command.name == "migrate":
        return MIGRATE_USAGE_EXIT
    if isinstance(e, click.MissingParameter) and e.param is not None and e.param.name == "ctid":
        return MISSING_CTID_EXIT
    return USAGE_EXIT
