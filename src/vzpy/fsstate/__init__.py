"""Filesystem consistency for checkpoint/restore: fingerprint a CT's private area, compare it, archive it.

OpenVZ's rule: the filesystem at restore must equal the filesystem at checkpoint. `fingerprint` records the
tree's metadata while the CT is frozen; `compare`/`verify` refuse a restore onto a different tree;
`archive_tree`/`restore_tree` carry the tree itself for `chkpnt --with-fs`.
See docs/filesystem-consistency.md for the choices and their measured cost.

Modules: record (the walk and the fingerprint's compact form), diff (differences), archive (tar, and the checks
that keep a hostile CT's archive inside its tree).
"""

from vzpy.fsstate.archive import META, TREE, ArchiveInfo, archive_tree, restore_tree
from vzpy.fsstate.diff import Difference, Differences, compare, describe_differences, verify
from vzpy.fsstate.record import KIND_NAMES, MOUNT, Entry, Fingerprint, fingerprint

__all__ = [
    "KIND_NAMES",
    "META",
    "MOUNT",
    "TREE",
    "ArchiveInfo",
    "Difference",
    "Differences",
    "Entry",
    "Fingerprint",
    "archive_tree",
    "compare",
    "describe_differences",
    "fingerprint",
    "restore_tree",
    "verify",
]
