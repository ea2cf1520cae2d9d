"""The vzpy dump file: a CRIU image directory, optional extra members and a JSON manifest in one file.

Layout (docs/dumpfile.md): header at 0, manifest at 4096, members at 4096-aligned offsets, trailer at the end.
The manifest sits at the front, so `dumpinfo` reads two small pieces, and a cut-off copy still says which
member it lost. It is written last into room reserved up front, so packing streams every member exactly once.

Modules: format (the layout and the manifest), writer, reader (every check on read), kio (kernel copies,
hashing, worker threads), display (what `dumpinfo` prints).
"""

from vzpy.dumpfile.display import describe
from vzpy.dumpfile.format import FORMAT_VERSION, HEADER, MANIFEST_OFFSET, TRAILER, TRAILER_MAGIC, Manifest, Member
from vzpy.dumpfile.reader import LateCheck, extract, extract_checking_later, read_manifest, verify
from vzpy.dumpfile.writer import write_dumpfile
from vzpy.units import human_size

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MANIFEST_OFFSET",
    "TRAILER",
    "TRAILER_MAGIC",
    "LateCheck",
    "Manifest",
    "Member",
    "describe",
    "extract",
    "extract_checking_later",
    "human_size",
    "read_manifest",
    "verify",
    "write_dumpfile",
]
