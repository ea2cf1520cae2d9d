"""Scratch directories for CRIU's images during a dump or restore, and the removal of those a killed vzpy left.

A scratch dir lives in RAM (/dev/shm) when the images fit comfortably, else in DUMPDIR. Its name carries
the CT and a key of the vzpy root (its LOCKDIR), so the next command on that CT, holding the CT's lock,
can remove what a killed run of the same CT left without touching another root's CT of the same CTID.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vzpy.errors import SystemFailure

if TYPE_CHECKING:
    from vzpy.container import Container

RAM_DIR = Path("/dev/shm")
PURPOSES = ("dump", "restore")
# tempfile.mkdtemp's random part: 8 characters of [a-z0-9_]
_RANDOM = r"[a-z0-9_]{8}"


def private_dir(path: Path) -> Path:
    """A directory vzpy keeps dumps or logs in: created 0700 (with missing parents) if it is not there."""
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.chmod(0o700)
        except OSError as e:
            raise SystemFailure(
                f"cannot make directory {path}: {e.strerror}; remove what is in the way or change DUMPDIR in vz.conf"
            ) from e
    return path


def _prefix(ct: Container, purpose: str) -> str:
    root_key = hashlib.sha256(str(ct.gconf.lockdir.absolute()).encode()).hexdigest()[:8]
    return f".vzpy-{purpose}-{root_key}-{ct.ctid}-"


@contextmanager
def work_dir(ct: Container, purpose: str, *, size: int) -> Iterator[Path]:
    """A 0700 scratch dir for `size` bytes of CRIU images; removed when the block ends."""
    base = RAM_DIR if fits_in_ram(size) else private_dir(ct.gconf.dumpdir)
    path = Path(tempfile.mkdtemp(prefix=_prefix(ct, purpose), dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fits_in_ram(size: int) -> bool:
    if not RAM_DIR.is_dir():
        return False
    return size * 2 < min(shutil.disk_usage(RAM_DIR).free, _available_memory())


def _available_memory() -> int:
    """psutil.virtual_memory().available (the kernel's MemAvailable), without psutil's ~10 ms import."""
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    import psutil  # a kernel without MemAvailable (< 3.14): psutil's estimate

    return int(psutil.virtual_memory().available)


def leftovers(ct: Container) -> list[Path]:
    """Scratch dirs of this CT's earlier runs, and temp files of dump files they did not finish."""
    found: list[Path] = []
    for base in (RAM_DIR, ct.gconf.dumpdir):
        for purpose in PURPOSES:
            pattern = re.compile(re.escape(_prefix(ct, purpose)) + _RANDOM)
            found += [p for p in _entries(base) if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    dump_tmp = re.compile(re.escape(f".{ct.default_dumpfile.name}.") + r"[0-9a-f]{8}\.tmp")
    found += [p for p in _entries(ct.gconf.dumpdir) if dump_tmp.fullmatch(p.name) and p.is_file()]
    return found


def remove_leftovers(ct: Container) -> None:
    """Only under the CT's lock: no other run of this CT can be using them then."""
    for path in leftovers(ct):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _entries(base: Path) -> list[Path]:
    try:
        return list(base.iterdir())
    except OSError:
        return []
