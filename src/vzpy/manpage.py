"""vzpy(8), written from the click command tree at install time so that it never drifts from the CLI.

`python -m vzpy.manpage DIR` writes DIR/vzpy.8: a synopsis, then every command (groups' subcommands too)
with its help text, epilog and every option and argument.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import click

from vzpy import __version__

SECTION = "8"
SEE_ALSO = "vzctl(8), vzlist(8), vzmigrate(8), vz(5), criu(8)"
FILES = (
    ("/etc/vz/vz.conf", "global configuration (VZPY_CONF selects another)"),
    ("/etc/vz/conf/CTID.conf", "a CT's configuration"),
    ("/vz/dump/Dump.CTID", "a CT's default dump file"),
    ("/var/log/vzpy.log", "the operation log (LOGFILE, LOGGING in vz.conf)"),
)


def escape(text: str) -> str:
    """Text as roff shows it literally: backslashes doubled, '-' unambiguous, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """(command path, command) for every command below the root, depth first, in name order; hidden ones too
    are left out as --help leaves them out."""
    if not isinstance(command, click.Group):
        return
    for name in sorted(command.commands):
        sub = command.commands[name]
        if sub.hidden:
            continue
        yield (*path, name), sub
        yield from walk(sub, (*path, name))


def _paragraphs(text: str) -> str:
    """click help text (\\b marks a block kept as written) as roff paragraphs."""
    out = []
    for block in text.strip().split("\n\n"):
        if block.startswith("\b"):
            out.append(".PP\n.nf\n" + escape(block.removeprefix("\b").strip("\n")) + "\n.fi")
        else:
            out.append(".PP\n" + escape(" ".join(block.split())))
    return "\n".join(out)


def _params(ctx: click.Context, command: click.Command) -> list[str]:
    lines = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            if param.hidden:
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, help_text = record
            lines += [".TP", f"\\fB{escape(names)}\\fR", escape(help_text or "")]
        elif isinstance(param, click.Argument):
            lines += [".TP", f"\\fI{escape(param.human_readable_name)}\\fR", "argument"]
    return lines


def render(root: click.Group, prog: str = "vzpy", today: date | None = None) -> str:
    ctx = click.Context(root, info_name=prog)
    stamp = (today or date.today()).isoformat()
    lines = [
        f'.TH {prog.upper()} {SECTION} "{stamp}" "{prog} {__version__}" "System Administration"',
        ".SH NAME",
        f"{prog} \\- {escape(root.get_short_help_str(limit=200).removeprefix(f'{prog}: '))}",
        ".SH SYNOPSIS",
        f"\\fB{prog}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        _paragraphs(root.help or ""),
        ".SH OPTIONS",
        *_params(ctx, root),
        ".SH COMMANDS",
    ]
    for path, command in walk(root):
        sub_ctx = click.Context(command, info_name=" ".join(path), parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub_ctx))
        lines += [
            f".SS {escape(' '.join(path))}",
            f"\\fB{prog} {escape(' '.join(path))}\\fR {escape(usage)}",
            _paragraphs(command.help or ""),
        ]
        params = _params(sub_ctx, command)
        if params:
            lines += [".PP", "Options and arguments:", ".RS", *params, ".RE"]
        if command.epilog:
            lines.append(_paragraphs(command.epilog))
    if root.epilog:
        lines += [".SH NOTES", _paragraphs(root.epilog)]
    lines.append(".SH FILES")
    for path_name, what in FILES:
        lines += [".TP", f"\\fI{escape(path_name)}\\fR", escape(what)]
    lines += [".SH SEE ALSO", escape(SEE_ALSO)]
    return "\n".join(line for line in lines if line) + "\n"


def main(argv: list[str]) -> int:
    from vzpy.cli import cli

    if len(argv) != 1:
        print("usage: python -m vzpy.manpage DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"vzpy.{SECTION}").write_text(render(cli))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
