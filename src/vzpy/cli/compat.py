"""vzpy under the names vzctl, vzlist and vzmigrate (argv[0]): their syntax, rewritten into vzpy's command line.

Each adapter turns the argv a script passes to vzctl/vzmigrate into vzpy's argv (pure functions, tested without
root), then runs vzpy's command line on it; only exit codes that differ by definition (vzctl's `exec`) are mapped
afterwards. Options vzctl takes but that mean nothing here are accepted and dropped (IGNORED_*).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vzpy.errors import ConfigNotFound, InvalidSyntax, InvalidValue, Locked, VzError

VZCTL, VZLIST, VZMIGRATE = "vzctl", "vzlist", "vzmigrate"
PROGRAMS = (VZCTL, VZLIST, VZMIGRATE)
EXEC_FAILED = 8  # vzctl's VZ_COMMAND_EXECUTION_ERROR: `vzctl exec` of a command that did not exit 0
# What vzctl finds before it runs any action keeps its own code, also for exec: no vz.conf, no such CT, usage.
BEFORE_ACTION_CODES = frozenset({10, 14, 20, 21})

# vzctl's commands under vzpy's names (the 4.x aliases included).
VZCTL_COMMANDS = {
    "create": "create",
    "start": "start",
    "stop": "stop",
    "restart": "restart",
    "status": "status",
    "set": "set",
    "destroy": "destroy",
    "delete": "destroy",
    "enter": "enter",
    "exec": "exec",
    "exec2": "exec",
    "suspend": "chkpnt",
    "chkpnt": "chkpnt",
    "resume": "restore",
    "restore": "restore",
}
# vzctl options with no meaning here (no ARP detection script, no OpenVZ CPT context or CPU-flag mask, no
# ploop fsck, the root is always remounted and unmounted): accepted and dropped.
IGNORED_FLAGS = frozenset({"--skip_arpdetect", "--skip-fsck", "--skip-remount", "--skip-umount"})
IGNORED_WITH_VALUE = frozenset({"--flags", "--context"})
VZCTL_USAGE = """\
Usage: vzctl [--quiet] [--verbose] COMMAND CTID [OPTIONS]
vzpy answering to vzctl's syntax. Commands:
  create CTID --ostemplate NAME [--ipadd IP] [--hostname H]
  start | stop [--fast] | restart | status | destroy | delete CTID
  set CTID [--hostname H] [--ipadd IP] [--ipdel IP] [--stop-timeout S] ... [--save]
  exec | exec2 CTID COMMAND [ARG ...]     (COMMAND - reads commands from stdin)
  enter CTID
  suspend | chkpnt CTID [--dumpfile F]
  resume | restore CTID [--dumpfile F]
`vzpy COMMAND --help` describes each command's options."""

# vzmigrate: -f/--nodeps take their value only when attached (getopt's optional argument).
_MIGRATE_VALUE_OPTIONS = frozenset(
    {"-r", "--remove-area", "--ssh-key", "--ssh-port", "--known-hosts", "--rsync-opts", "--rsync", "--ssh"}
    | {"--remote-vzpy", "--max-frozen"}
)


@dataclass(frozen=True)
class VzctlCall:
    """What a vzctl command line means to vzpy: its argv, and how `exec` maps the exit code."""

    args: list[str]
    exec_name: str | None = None  # "exec" (any failure: 8) or "exec2" (the command's own code)


def dispatch(argv0: str, args: Sequence[str]) -> int:
    """The program's exit code for argv, by the name it was invoked as."""
    from vzpy.cli import run

    name = Path(argv0).name
    if name == VZCTL:
        return _guarded(lambda: _run_vzctl(args))
    if name == VZLIST:
        return _guarded(lambda: _run_vzlist(args))
    if name == VZMIGRATE:
        return _guarded(lambda: run(vzmigrate_args(args)))
    return run(vzpy_args(args))


def _guarded(body: Callable[[], int]) -> int:
    from vzpy.cli import display

    try:
        return body()
    except VzError as e:
        display.error(e.message)
        return e.exit_code


def _run_vzctl(args: Sequence[str]) -> int:
    from vzpy.cli import display, run

    call = vzctl_call(args)
    if call.args == ["--help"]:
        display.out(VZCTL_USAGE)
        return 0
    code = run(call.args)
    return exec_exit_code(call.exec_name, code)


def _run_vzlist(args: Sequence[str]) -> int:
    from vzpy.cli.listing import vzlist_main  # vzlist's syntax and output are the listing module's

    return vzlist_main(list(args))


# --- vzctl


def vzctl_call(args: Sequence[str]) -> VzctlCall:
    """vzctl's argv (without the program name) as vzpy's; InvalidSyntax (20) or InvalidValue (21) as vzctl."""
    flags, rest = _global_flags(args)
    if not rest:
        raise InvalidSyntax("no command given; see `vzctl --help`")
    if rest[0] in ("--help", "-h", "help"):
        return VzctlCall(["--help"])
    if rest[0] == "--version":
        return VzctlCall(["--version"])
    command = VZCTL_COMMANDS.get(rest[0])
    if command is None:
        raise InvalidSyntax(f"bad command: {rest[0]}; see `vzctl --help`")
    if len(rest) < 2:
        raise InvalidValue(f"CT ID missing: `vzctl {rest[0]} CTID`")
    ctid, options = rest[1], rest[2:]
    if command == "exec":
        return VzctlCall([*flags, "exec", ctid, "--", exec_line(rest[0], options)], exec_name=rest[0])
    return VzctlCall([*flags, command, ctid, *drop_ignored(options)])


def _global_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """vzctl's flags before the command: --quiet (vzpy -q), --verbose (repeatable; vzpy is as verbose by
    default), --skiplock (vzmigrate's; vzpy always locks the CT)."""
    flags: list[str] = []
    rest = list(args)
    while rest and rest[0] in ("--quiet", "--verbose", "--skiplock"):
        if rest.pop(0) == "--quiet" and "-q" not in flags:
            flags.append("-q")
    return flags, rest


def exec_line(name: str, options: Sequence[str]) -> str:
    """vzctl exec's command: its arguments joined by spaces (an empty one as ''), run by the CT's shell;
    `-` first: the commands come from stdin."""
    if not options:
        raise InvalidSyntax(f"no command line given for {name}: `vzctl {name} CTID COMMAND [ARG ...]`")
    if options[0] == "-":
        return "-"
    return " ".join(arg or "''" for arg in options)


def exec_exit_code(exec_name: str | None, code: int) -> int:
    """`vzctl exec` exits 8 when the command failed or could not run (a CT not running included); exec2 with
    the command's own code; an error found before (no such CT: 14) and everything else as vzpy."""
    if exec_name == "exec" and code != 0 and code not in BEFORE_ACTION_CODES:
        return EXEC_FAILED
    return code


def drop_ignored(options: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip_value = False
    for option in options:
        if skip_value:
            skip_value = False
        elif option in IGNORED_FLAGS:
            continue
        elif option in IGNORED_WITH_VALUE:
            skip_value = True
        elif option.split("=", 1)[0] not in IGNORED_WITH_VALUE:
            kept.append(option)
    return kept


# --- vzmigrate and vzpy's own command line


def vzmigrate_args(args: Sequence[str]) -> list[str]:
    """`vzmigrate [OPTIONS] HOST CTID` as `vzpy migrate`; no arguments or --usage shows the help (exit 0)."""
    if not args or any(arg in ("-h", "--help", "--usage") for arg in args):
        return ["migrate", "--help"]
    return ["migrate", *attached_nodeps(args)]


def vzpy_args(args: Sequence[str]) -> list[str]:
    """vzpy's argv, with `migrate -f` read as vzmigrate reads it."""
    for index, arg in enumerate(args):
        if not arg.startswith("-"):
            if arg == "migrate":
                return [*args[: index + 1], *attached_nodeps(args[index + 1 :])]
            break
    return list(args)


def attached_nodeps(args: Sequence[str]) -> list[str]:
    """-f/--nodeps take a value only when attached (`-fcpu`, `--nodeps=cpu`); alone they mean all checks, and
    the next word stays a word of its own (`vzmigrate -f HOST CTID`)."""
    result: list[str] = []
    takes_value = False
    for arg in args:
        if takes_value:
            result.append(arg)
            takes_value = False
        elif arg == "--":
            return [*result, *args[len(result) :]]
        elif arg in ("-f", "--nodeps"):
            result.append("--nodeps=all")
        elif arg.startswith("-f") and not arg.startswith("--"):
            result.append(f"--nodeps={arg[2:]}")
        else:
            result.append(arg)
            takes_value = arg in _MIGRATE_VALUE_OPTIONS
    return result


@dataclass(frozen=True)
class SshOptions:
    """What vzmigrate's --ssh=OPTS may set for vzpy's connections."""

    port: int | None = None
    user: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None


# `-o KEY=VALUE` settings of ssh(1) that vzpy applies, or that are already how vzpy connects.
_SSH_O_KEYS = {"port": "port", "user": "user", "identityfile": "identity", "userknownhostsfile": "known_hosts"}
_SSH_O_ALREADY = {("batchmode", "yes"), ("stricthostkeychecking", "yes")}
_SSH_FLAGS = {"-p": "port", "-l": "user", "-i": "identity"}


def parse_ssh_options(text: str) -> SshOptions:
    """vzmigrate --ssh=OPTS: the ssh(1) options vzpy can honour (-p, -l, -i and -o Port/User/IdentityFile/
    UserKnownHostsFile; BatchMode=yes and StrictHostKeyChecking=yes are how vzpy always connects). Any other
    is refused (ValueError naming it) rather than silently not applied."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot parse --ssh options {text!r}: {e}") from None
    values: dict[str, str] = {}
    while words:
        word = words.pop(0)
        flag, attached = word[:2], word[2:]
        if flag not in (*_SSH_FLAGS, "-o") or word.startswith("--"):
            raise ValueError(f"ssh option {word!r} is not supported by vzpy's --ssh (use -p, -l, -i or -o)")
        if not attached and not words:
            raise ValueError(f"ssh option {flag} needs a value")
        value = attached or words.pop(0)
        if flag == "-o":
            _ssh_o_setting(value, values)
        else:
            values[_SSH_FLAGS[flag]] = value
    return _ssh_options(values)


def _ssh_o_setting(setting: str, values: dict[str, str]) -> None:
    key, sep, value = setting.partition("=")
    if not sep:
        key, _, value = setting.partition(" ")
    key, value = key.strip().lower(), value.strip()
    if (key, value.lower()) in _SSH_O_ALREADY:
        return
    if key not in _SSH_O_KEYS or not value:
        raise ValueError(
            f"ssh option -o {setting!r} is not supported by vzpy's --ssh "
            "(supported: Port, User, IdentityFile, UserKnownHostsFile, BatchMode=yes, StrictHostKeyChecking=yes)"
        )
    values[_SSH_O_KEYS[key]] = value


def _ssh_options(values: dict[str, str]) -> SshOptions:
    port = values.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"invalid ssh port {port!r}: use a number from 1 to 65535")
    identity, known_hosts = values.get("identity"), values.get("known_hosts")
    return SshOptions(
        port=int(port) if port is not None else None,
        user=values.get("user"),
        identity=Path(identity).expanduser() if identity else None,
        known_hosts=Path(known_hosts).expanduser() if known_hosts else None,
    )


def ssh_options(text: str | None) -> SshOptions:
    """`--ssh OPTS` of `migrate`: MigrateUsage (vzmigrate's exit 1) for what vzpy cannot honour."""
    from vzpy.migrate import MigrateUsage

    if not text:
        return SshOptions()
    try:
        return parse_ssh_options(text)
    except ValueError as e:
        raise MigrateUsage(f"--ssh: {e}") from None


@contextmanager
def vzmigrate_codes() -> Iterator[None]:
    """vzmigrate's exit codes for the source CT: missing is MIG_ERR_NOEXIST (10), locked MIG_ERR_LOCKED (20)."""
    from vzpy.migrate import CtNotFound, MigrationLocked

    try:
        yield
    except ConfigNotFound as e:
        raise CtNotFound(e.message) from e
    except Locked as e:
        raise MigrationLocked(e.message) from e
