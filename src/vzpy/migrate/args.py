"""Checks of a request's arguments on the agent: every value comes from the network and is checked for
type and shape before use (a ProtocolError names the argument otherwise)."""

from __future__ import annotations

import re
from typing import Any

from vzpy.config import validate_ctid
from vzpy.errors import VzError
from vzpy.migrate import MigrateUsage, ProtocolError

SUBDIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Args = dict[str, Any]


def ctid_arg(args: Args) -> str:
    value = args.get("ctid")
    if not isinstance(value, str):
        raise ProtocolError("migration protocol error: ctid missing or not a string")
    try:
        return validate_ctid(value)
    except VzError as e:
        raise MigrateUsage(e.message) from e


def str_arg(args: Args, name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise ProtocolError(f"migration protocol error: {name} missing or not a string")
    return value


def bool_arg(args: Args, name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"migration protocol error: {name} must be true or false")
    return value


def number_arg(args: Args, name: str, default: float) -> float:
    value = args.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"migration protocol error: {name} must be a positive number")
    return float(value)


def optional_number_arg(args: Args, name: str) -> float | None:
    return None if args.get(name) is None else number_arg(args, name, 1.0)


def subdir_arg(args: Args, name: str = "subdir") -> str:
    subdir = str_arg(args, name, "")
    if subdir and (not SUBDIR_RE.match(subdir) or subdir in (".", "..")):
        raise ProtocolError(f"migration protocol error: bad images subdir {subdir!r}")
    return subdir


def token_arg(args: Args) -> str:
    token = str_arg(args, "token")
    if not TOKEN_RE.match(token):
        raise ProtocolError("migration protocol error: token must be 1-64 of [A-Za-z0-9_.-]")
    return token


def strings_arg(args: Args, name: str) -> list[str]:
    value = args.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"migration protocol error: {name} must be a list of strings")
    return value
