"""Finding a usable criu binary and pycriu, and the version policy for this kernel."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from vzpy import background, fileio, proc
from vzpy.errors import CommandFailed, CriuUnavailable

DEFAULT_CRIU = Path("/opt/vzpy/criu/bin/criu")
ENV_CRIU = "VZPY_CRIU"
FIX = "run `make setup`, which installs a private CRIU 4.2"
# Since 6.16 SO_PASSCRED is AF_UNIX-only, so CRIU < 4.2 cannot dump any TCP or UDP socket.
NEW_SOCKET_KERNEL = (6, 16)
MIN_CRIU_ON_NEW_KERNEL = (4, 2)
CHECK_TIMEOUT = 30.0

_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
_KERNEL_RE = re.compile(r"^(\d+)\.(\d+)")


@dataclass(frozen=True, order=True)
class CriuVersion:
    major: int
    minor: int
    sublevel: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"

    def at_least(self, major_minor: tuple[int, int]) -> bool:
        return (self.major, self.minor) >= major_minor


@dataclass(frozen=True)
class CriuBinary:
    """A criu binary that passed the version policy and `criu check`."""

    path: Path
    version: CriuVersion


def parse_version(text: str) -> CriuVersion:
    """Parse `criu --version` output ("Version: 4.2.1", maybe followed by a GitID line)."""
    match = _VERSION_RE.search(text)
    if not match:
        raise ValueError(f"no 'Version: X.Y' line in criu --version output: {text.strip()[:80]!r}")
    major, minor, sublevel = match.groups()
    return CriuVersion(int(major), int(minor), int(sublevel or 0))


def parse_kernel_release(release: str) -> tuple[int, int]:
    """Major and minor of a kernel release such as "6.18.44-fc-v669"."""
    match = _KERNEL_RE.match(release)
    if not match:
        raise ValueError(f"cannot parse kernel release {release!r}")
    return int(match.group(1)), int(match.group(2))


def kernel_release() -> str:
    return os.uname().release


def version_problem(version: CriuVersion, kernel: tuple[int, int]) -> str | None:
    """Why this CRIU cannot work on this kernel, or None when it can."""
    if kernel >= NEW_SOCKET_KERNEL and not version.at_least(MIN_CRIU_ON_NEW_KERNEL):
        need = ".".join(map(str, MIN_CRIU_ON_NEW_KERNEL))
        have = ".".join(map(str, kernel))
        return f"CRIU {version} cannot dump TCP/UDP sockets on kernel {have} (needs CRIU >= {need})"
    return None


def _usable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """$VZPY_CRIU, then `explicit` (global config key CRIU), then /opt/vzpy/criu/bin/criu, then PATH.

    A path the operator named (env or config) that is not executable is an error, not a reason to fall
    back silently to another CRIU.
    """
    for source, named in ((ENV_CRIU, os.environ.get(ENV_CRIU)), ("CRIU in the global config", explicit)):
        if named:
            if not _usable(named):
                raise CriuUnavailable(f"{source}={named} is not an executable file; fix it or {FIX}")
            return Path(named)
    if _usable(DEFAULT_CRIU):
        return DEFAULT_CRIU
    on_path = shutil.which("criu")
    if on_path:
        return Path(on_path)
    raise CriuUnavailable(f"criu not found ({DEFAULT_CRIU} nor on PATH); {FIX}")


def binary_version(path: Path) -> CriuVersion:
    try:
        result = proc.run([path, "--version"], timeout=CHECK_TIMEOUT, error=CriuUnavailable)
        return parse_version(result.stdout)
    except (CriuUnavailable, ValueError) as e:
        raise CriuUnavailable(f"{path} --version failed: {e}; {FIX}") from e


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or ["no output"])[0]


def run_check(path: Path) -> None:
    """`criu check`: the kernel features every dump/restore needs (including TCP repair)."""
    try:
        proc.run([path, "check"], timeout=CHECK_TIMEOUT, error=CommandFailed)
    except CommandFailed as e:
        raise CriuUnavailable(
            f"`{path} check` fails: {_first_error(e.detail or e.message)}; {FIX}", detail=e.detail
        ) from e


@cache
def _require(path: Path, kernel: str) -> CriuBinary:
    cached = _checked_before(path, kernel)
    version = cached or binary_version(path)
    problem = version_problem(version, parse_kernel_release(kernel))
    if problem:
        raise CriuUnavailable(f"{path}: {problem}; {FIX}")
    if cached is None:
        run_check(path)
        _remember_check(path, kernel, version)
    load_rpc()  # vzpy talks to CRIU only through pycriu's RPC messages
    return CriuBinary(path=path, version=version)


# `criu check` costs ~0.12 s at every vzpy command; its verdict holds for the same binary file on the same
# boot of the same kernel, so it is remembered for exactly that.
CHECK_CACHE = Path("/var/cache/vzpy/criu-check.json")


def _check_key(path: Path, kernel: str) -> dict[str, object]:
    st = path.stat()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return {
        "path": str(path.resolve()),
        "mtime_ns": st.st_mtime_ns,
        "size": st.st_size,
        "kernel": kernel,
        "boot_id": boot_id,
    }


def _checked_before(path: Path, kernel: str) -> CriuVersion | None:
    try:
        data = json.loads(CHECK_CACHE.read_text())
        if data["key"] == _check_key(path, kernel):
            return parse_version(data["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember_check(path: Path, kernel: str, version: CriuVersion) -> None:
    try:
        CHECK_CACHE.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": _check_key(path, kernel), "version": f"Version: {version}"}
        fileio.write_atomic(CHECK_CACHE, json.dumps(record), mode=0o644, durable=False)
    except OSError:
        pass  # only a cache


def require_criu(explicit: str | os.PathLike[str] | None = None) -> CriuBinary:
    """The criu binary to use, checked once per process: version policy, then `criu check`."""
    return _require(find_binary(explicit), kernel_release())


RPC_MODULE = "pycriu.rpc_pb2"


def load_rpc_soon() -> None:
    """Start importing pycriu (~0.05 s: protobuf) in a thread, for a command that waits for something else
    before its first CRIU call; load_rpc() then finds it loaded, or waits for the rest."""
    background.import_soon(RPC_MODULE)


@cache
def load_rpc() -> ModuleType:
    """pycriu's protobuf module (criu_req, criu_opts, ...)."""
    try:
        # Imported here so that vzpy works (and says what is missing) on a host without pycriu.
        from pycriu import rpc_pb2
    except (ImportError, TypeError) as e:  # TypeError: generated code too old for this protobuf
        raise CriuUnavailable(f"pycriu is not importable ({e}); {FIX} and its pycriu") from e
    module: ModuleType = rpc_pb2  # pycriu has no type information (pyproject.toml: ignore_missing_imports)
    return module
