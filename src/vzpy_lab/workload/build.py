"""Build the workloads (the .c files beside this module): static binaries, cached by the hash of source and flags."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("fidelity.c")
DIRTIER_SOURCE = Path(__file__).with_name("dirtier.c")
FORKER_SOURCE = Path(__file__).with_name("forker.c")
CFLAGS: tuple[str, ...] = ("-std=gnu11", "-static", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror")
LIBS: tuple[str, ...] = ("-lm",)


class BuildError(RuntimeError):
    """gcc failed; the message carries its stderr."""


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc")
    if not cc:
        raise BuildError("gcc not found (set CC or install gcc)")
    return cc


def _digest(cc: str, source: Path) -> str:
    h = hashlib.sha256(source.read_bytes())
    h.update("\0".join((cc, *CFLAGS, *LIBS)).encode())
    return h.hexdigest()[:16]


def build_fidelity(out_dir: Path) -> Path:
    """Compile fidelity.c into out_dir (once per source version) and return the binary's path."""
    return _build(SOURCE, out_dir)


def build_dirtier(out_dir: Path) -> Path:
    """Compile dirtier.c (memory that keeps being rewritten, for pre-copy) into out_dir; the binary's path."""
    return _build(DIRTIER_SOURCE, out_dir)


def build_forker(out_dir: Path) -> Path:
    """Compile forker.c (children forked every 20 ms checking inherited memory, for post-copy) into out_dir."""
    return _build(FORKER_SOURCE, out_dir)


def _build(source: Path, out_dir: Path) -> Path:
    cc = _compiler()
    binary = Path(out_dir) / f"{source.stem}-{_digest(cc, source)}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.tmp{os.getpid()}")
    cmd = [cc, *CFLAGS, "-o", str(tmp), str(source), *LIBS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
    os.replace(tmp, binary)  # atomic: concurrent builders never see a half-written binary
    return binary
