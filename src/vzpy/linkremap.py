"""CRIU's link-remap files, kept for as long as the dump or restore that needs them.

For an open file whose name was unlinked while another link remains, CRIU's dump links the file into the
CT's tree under a new name ("/tmp/link_remap.16", `link_remap`), and the restore opens it by that name and
removes it. CRIU removes the name itself after a dump of a tree it leaves running, which vzpy's staged dump
always does; and a restore that fails or is killed has consumed it. So vzpy holds a second link under a
name CRIU does not touch (NAME.vzpy-keep) and puts NAME back from it: after a dump until the CT resumes
(then the name goes), and during a restore until its CT resumes (then the held link goes) or is killed
(then NAME is back, and the dump file can be restored again).

Names are paths inside the CT's root as CRIU recorded them; they are resolved inside the CT's private area
(vzpy.runtime.ctfs), never followed out of it. A name on another mount of the CT is left to CRIU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vzpy.runtime.ctfs import CtRoot

if TYPE_CHECKING:
    from vzpy.container import Container

KEEP_SUFFIX = ".vzpy-keep"
# (name, dir fd) -> None; raises OSError when it cannot be done
_Op = Callable[[str, int], None]


def _each(ct: Container, names: Sequence[str], op: _Op) -> list[str]:
    """Apply op to each name in its directory; the names it worked for."""
    done: list[str] = []
    if not names:
        return done
    with CtRoot(ct.private) as root:
        for name in names:
            parent, base = os.path.split(name)
            try:
                with root.directory(parent or "/") as dir_fd:
                    op(base, dir_fd)
            except OSError:
                continue
            done.append(name)
    return done


def hold(ct: Container, names: Sequence[str]) -> list[str]:
    """A second link to each NAME (the CT frozen); the names held."""
    return _each(
        ct, names, lambda base, d: os.link(base, base + KEEP_SUFFIX, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
    )


def reinstate(ct: Container, names: Sequence[str]) -> None:
    """NAME back from its held link (which goes)."""
    _each(ct, names, _reinstate_one)


def _reinstate_one(base: str, dir_fd: int) -> None:
    try:
        os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(base + KEEP_SUFFIX, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    # NAME was not consumed: renaming a hard link over another of the same file would do nothing
    os.unlink(base + KEEP_SUFFIX, dir_fd=dir_fd)


def release(ct: Container, names: Sequence[str]) -> None:
    """The held links go; NAME stays as it is."""
    _each(ct, names, lambda base, d: os.unlink(base + KEEP_SUFFIX, dir_fd=d))


def remove(ct: Container, names: Sequence[str]) -> None:
    """NAME goes (its dump is no longer restorable once the CT ran on)."""
    _each(ct, names, lambda base, d: os.unlink(base, dir_fd=d))
