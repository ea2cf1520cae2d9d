"""The one way vzpy runs other programs: argv lists, never shell strings; failures carry stderr's tail."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from vzpy.errors import CommandFailed, VzError

STDERR_TAIL_LINES = 8


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    error: type[VzError] = CommandFailed,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture text output; on a non-zero exit raise `error` with the stderr tail."""
    args = [os.fspath(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise error(f"{what or args[0]}: {args[0]} is not installed (run `make setup`)") from e
    except subprocess.TimeoutExpired as e:
        raise error(f"{what or args[0]}: timed out after {timeout:g}s") from e
    if check and result.returncode != 0:
        raise error(
            f"{what or ' '.join(args[:3])} failed with exit code {result.returncode}",
            detail=tail(result.stderr or result.stdout),
        )
    return result
