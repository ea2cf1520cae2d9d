"""Reading a dump file: every byte is checked (docs/dumpfile.md, "Checks on read") before anything is used.

read_manifest checks the structure: header (magic, version, reserved flags, bounds), manifest (checksum,
fields), layout (members in order, aligned, inside the file), the padding between the parts (zeros), and
the trailer. verify and extract also check each member's bytes against its size and digest (sha256 in format
version 1, the algorithm the manifest names in version 2).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from vzpy.dumpfile import kio
from vzpy.dumpfile.format import (
    ALIGN,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MANIFEST_OFFSET,
    MAX_MANIFEST,
    TRAILER,
    TRAILER_MAGIC,
    Manifest,
    Member,
    round_up,
)
from vzpy.errors import RestoreError, VzError

ZERO_CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COPY_TIMEOUT = 3600.0  # wait() of a LateCheck whose copies nobody waited for: far beyond any disk that works


class Header(NamedTuple):
    magic: bytes
    version: int
    flags: int
    manifest_offset: int
    manifest_length: int
    trailer_offset: int
    manifest_sha256: bytes


def read_manifest(path: Path) -> Manifest:
    """The manifest, after the checks that need no member data (magic, version, manifest checksum, truncation)."""
    with _open_dump(Path(path)) as (_, manifest):
        return manifest


def verify(path: Path) -> Manifest:
    """Check every member's size and digest too; writes nothing anywhere."""
    path = Path(path)
    with _open_dump(path) as (fd, manifest), ThreadPoolExecutor(2, thread_name_prefix="vzpy-verify") as pool:
        items = [(name, manifest.members[name]) for name in _in_file_order(manifest, manifest.members)]
        digests = pool.map(lambda item: _member_digest(path, fd, item, None, manifest.digest), items)
        for (name, member), (size, digest) in zip(items, digests, strict=True):
            _check_member(path, name, member, size, digest, manifest.digest)
    return manifest


def extract(path: Path, dest_dir: Path, *, only: Iterable[str] | None = None) -> Manifest:
    """Verify and extract members into dest_dir (made 0700; files 0600). On failure, nothing is left behind."""
    manifest, late = extract_checking_later(path, dest_dir, lambda _name: False, only=only)
    late.wait()
    return manifest


def extract_checking_later(
    path: Path,
    dest_dir: Path,
    later: Callable[[str], bool],
    *,
    only: Iterable[str] | None = None,
    copy_later: Callable[[Path], Collection[str]] | None = None,
) -> tuple[Manifest, LateCheck]:
    """extract(), except that the digests of the members `later` names are still being computed when it returns:
    the caller may use those files at once, and must call wait() on the LateCheck (which raises RestoreError
    on a bad member) before it trusts what it made of them. Every other member is checked before it returns.

    copy_later(dest_dir), called once every other member is in dest_dir, may name some of those members: they
    are copied in a thread too, and each appears under its name only when complete (the caller waits with
    LateCheck.copied() before they are read). On failure, nothing is left behind (the caller removes dest_dir's
    files if wait() fails)."""
    path, dest_dir = Path(path), Path(dest_dir)
    with _open_dump(path) as (fd, manifest):
        names = _select(path, manifest, only)
        deferred = [n for n in names if later(n) and manifest.members[n].codec == "none"]
        now = [n for n in names if n not in deferred]
        made_dir = _make_dest(dest_dir)
        created: list[Path] = []
        late = LateCheck(path, os.dup(fd), manifest.digest)
        try:
            _extract_members(path, fd, manifest, now, dest_dir, created)
            in_thread = set(copy_later(dest_dir)) if copy_later is not None else set()
            for name in deferred:
                late.add(name, manifest.members[name])
                if name in in_thread:
                    late.copy(name, manifest.members[name], dest_dir / name)
                else:
                    _copy_plain_member(path, fd, name, manifest.members[name], dest_dir / name, created)
        except BaseException as e:
            late.close()
            for file in created:
                file.unlink(missing_ok=True)
            if made_dir:
                dest_dir.rmdir()
            if isinstance(e, OSError):
                raise RestoreError(f"cannot extract {path} into {dest_dir}: {kio.os_text(e)}") from e
            raise
    return manifest, late


class LateCheck:
    """The digests of extracted members, computed in a thread from the dump file's own bytes; the copies of
    members extracted in a thread of their own."""

    def __init__(self, path: Path, fd: int, algorithm: str) -> None:
        self._path, self._fd, self._algorithm = path, fd, algorithm
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vzpy-hash-late")
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="vzpy-copy-late")
        self._pending: list[tuple[str, Member, Future[str]]] = []
        self._copies: list[Future[None]] = []
        self._closed = False

    def copy(self, name: str, member: Member, target: Path) -> None:
        self._copies.append(self._copier.submit(_copy_whole, self._path, self._fd, name, member, target))

    def copied(self, timeout: float) -> None:
        """Block until every member copy() was given is in place; RestoreError if one failed or took too long."""
        deadline = time.monotonic() + timeout
        try:
            for copy in self._copies:
                copy.result(max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            raise RestoreError(
                f"copying the memory images out of {self._path} took over {timeout:.0f}s; check the disk"
            ) from None
        except OSError as e:
            raise RestoreError(f"cannot extract the memory images of {self._path}: {kio.os_text(e)}") from e

    def add(self, name: str, member: Member) -> None:
        if member.codec != "none":  # a compressed member is checked while it is decompressed, never later
            raise ValueError(f"{name} is compressed: it cannot be checked later")
        digest = self._pool.submit(kio.hash_region, self._fd, member.offset, member.size, self._algorithm)
        self._pending.append((name, member, digest))

    def wait(self, timeout: float = COPY_TIMEOUT) -> None:
        """Block until every digest and copy is in; RestoreError naming the first member whose bytes are not
        the dump's."""
        try:
            self.copied(timeout)
            for name, member, digest in self._pending:
                _check_member(self._path, name, member, member.size, digest.result(), self._algorithm)
        finally:
            self.close()

    def close(self) -> None:
        """Stop: digests not started are dropped, a running one is waited for (it reads through our fd)."""
        if self._closed:
            return
        self._closed = True
        for copy in self._copies:
            copy.cancel()
        for _, _, digest in self._pending:
            digest.cancel()
        self._copier.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        os.close(self._fd)


def _select(path: Path, manifest: Manifest, only: Iterable[str] | None) -> list[str]:
    names = manifest.members if only is None else dict.fromkeys(only)
    for name in names:
        if name not in manifest.members:
            raise RestoreError(f"{path}: the dump file has no member {name}")
    return _in_file_order(manifest, names)


def _in_file_order(manifest: Manifest, names: Iterable[str]) -> list[str]:
    """The manifest lists members by name; reading them by offset keeps a cold file's reads sequential."""
    return sorted(names, key=lambda name: manifest.members[name].offset)


def _make_dest(dest_dir: Path) -> bool:
    try:
        dest_dir.mkdir(mode=0o700)
    except FileExistsError:
        if not dest_dir.is_dir():
            raise RestoreError(f"cannot extract into {dest_dir}: not a directory") from None
        return False
    except OSError as e:
        raise RestoreError(f"cannot extract into {dest_dir}: {kio.os_text(e)}") from e
    return True


def _extract_members(
    path: Path, fd: int, manifest: Manifest, names: list[str], dest_dir: Path, created: list[Path]
) -> None:
    # Plain members: the hasher reads the dump's range through mmap while the kernel copies the same range.
    algorithm = manifest.digest
    with ThreadPoolExecutor(1, thread_name_prefix="vzpy-hash") as pool:
        pending: list[tuple[str, Member, Future[str]]] = []
        try:
            for name in names:
                member = manifest.members[name]
                target = dest_dir / name
                out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created.append(target)
                try:
                    if member.codec == "none":
                        digest = pool.submit(kio.hash_region, fd, member.offset, member.size, algorithm)
                        pending.append((name, member, digest))
                        copied = kio.copy_range(fd, out, member.offset, 0, member.size)
                        _check_size(path, name, member, copied)
                    else:
                        size, hexdigest = _member_digest(path, fd, (name, member), out, algorithm)
                        _check_member(path, name, member, size, hexdigest, algorithm)
                finally:
                    os.close(out)
            for name, member, digest in pending:
                _check_member(path, name, member, member.size, digest.result(), algorithm)
        finally:
            for _, _, digest in pending:
                digest.cancel()


def _copy_plain_member(path: Path, fd: int, name: str, member: Member, target: Path, created: list[Path]) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    created.append(target)
    try:
        copied = kio.copy_range(fd, out, member.offset, 0, member.size)
        _check_size(path, name, member, copied)  # its digest is the LateCheck's
    finally:
        os.close(out)


def _copy_whole(path: Path, fd: int, name: str, member: Member, target: Path) -> None:
    """Copy a member to a hidden name and rename it into place: a reader finds all of it or no file."""
    partial = target.with_name(f".{name}.partial")
    out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            copied = kio.copy_range(fd, out, member.offset, 0, member.size)
        finally:
            os.close(out)
        _check_size(path, name, member, copied)
        os.rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _member_digest(path: Path, fd: int, item: tuple[str, Member], out: int | None, algorithm: str) -> tuple[int, str]:
    """(size, hex digest) of a member's original bytes; decompressed into `out` on the way when given."""
    name, member = item
    if member.codec == "none":
        return member.stored_size, kio.hash_region(fd, member.offset, member.stored_size, algorithm)
    _check_zstd_frame(path, fd, name, member)
    sink = kio.Sink(out, member.size, algorithm)
    try:
        _decompress(path, fd, name, member, sink)
    except BaseException:
        sink.stop()
        raise
    return sink.finish()


def _decompress(path: Path, fd: int, name: str, member: Member, sink: kio.Sink) -> None:
    reader = kio.RegionReader(fd, member.offset, member.stored_size)
    try:
        kio.zstd_module(RestoreError).ZstdDecompressor().copy_stream(
            reader, sink, read_size=kio.STREAM_CHUNK, write_size=kio.STREAM_CHUNK
        )
    except kio.Oversize:
        raise _corrupt(path, f"{name} decompresses to more than {member.size} bytes") from None
    except (OSError, VzError):
        raise
    except Exception as e:  # zstandard.ZstdError
        raise _corrupt(path, f"{name} does not decompress ({e})") from e


def _check_zstd_frame(path: Path, fd: int, name: str, member: Member) -> None:
    """The member is exactly one zstd frame whose last block ends it (RFC 8878, section 3.1.1).

    The decompressor stops quietly at the end of its input: without this walk over the block headers,
    a cleared last-block flag or bytes after the frame would go unnoticed.
    """
    start, end = member.offset, member.offset + member.stored_size
    head = os.pread(fd, 5, start)
    if len(head) < 5 or head[:4] != ZSTD_MAGIC or head[4] & 0x08:  # bit 3 of the descriptor is reserved
        raise _corrupt(path, f"{name} is not a zstd frame")
    descriptor = head[4]
    single_segment = descriptor >> 5 & 1
    content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
    pos = start + 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes
    last = False
    while not last and pos < end:
        block = int.from_bytes(os.pread(fd, 3, pos).ljust(3, b"\0"), "little")
        last, kind, size = bool(block & 1), block >> 1 & 3, block >> 3
        pos += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte, repeated `size` times
    pos += 4 if descriptor & 0x04 else 0  # the content checksum
    if not last or pos != end:
        raise _corrupt(path, f"{name} is not one complete zstd frame")


def _check_member(path: Path, name: str, member: Member, size: int, digest: str, algorithm: str) -> None:
    """The member's size and its digest (hex, of `algorithm`)."""
    _check_size(path, name, member, size)
    if digest != member.digest:
        raise _corrupt(path, f"{algorithm} mismatch in {name}")


def _check_size(path: Path, name: str, member: Member, size: int) -> None:
    if size != member.size:
        raise _corrupt(path, f"{name} has {size} bytes, the manifest says {member.size}")


# --- structure


@contextmanager
def _open_dump(path: Path) -> Iterator[tuple[int, Manifest]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot read dump file {path}: {kio.os_text(e)}") from e
    try:
        try:
            manifest = _check_structure(path, fd)
        except OSError as e:  # a directory opens fine but does not read
            raise RestoreError(f"cannot read dump file {path}: {kio.os_text(e)}") from e
        yield fd, manifest
    finally:
        os.close(fd)


def _check_structure(path: Path, fd: int) -> Manifest:
    """Everything that can be checked without reading member data, in file order."""
    size = os.fstat(fd).st_size
    header = _parse_header(path, os.pread(fd, ALIGN, 0))
    manifest_end = header.manifest_offset + header.manifest_length
    if size < manifest_end:
        raise _truncated(path, "manifest", size - header.manifest_offset, header.manifest_length)
    raw = kio.read_exactly(fd, header.manifest_length, header.manifest_offset)
    manifest = _load_manifest(path, raw, header)
    _check_layout(path, fd, manifest, manifest_end, header.trailer_offset, size)
    tail = os.pread(fd, TRAILER.size, header.trailer_offset)
    _check_trailer(path, tail, header.trailer_offset, header.manifest_sha256, size)
    return manifest


def _parse_header(path: Path, page: bytes) -> Header:
    """The header and the rest of the first page, which must be zeros."""
    if not page or not page.startswith(MAGIC[: len(page)]):
        why = "the file is empty" if not page else "bad magic"
        raise RestoreError(f"{path}: not a vzpy dump file ({why})")
    if len(page) < HEADER.size:
        raise _truncated(path, "header", len(page), HEADER.size)
    header = Header(*HEADER.unpack_from(page))
    if header.version > FORMAT_VERSION:
        raise RestoreError(
            f"{path}: dump file format version {header.version} is newer than this vzpy supports "
            f"({FORMAT_VERSION}); restore it with a newer vzpy"
        )
    if header.version < 1:
        raise _corrupt(path, f"bad header: format version {header.version}")
    if header.flags:
        raise _corrupt(path, f"bad header: reserved flags {header.flags:#x} are set")
    if header.manifest_offset != MANIFEST_OFFSET:
        raise _corrupt(path, f"bad header: manifest offset {header.manifest_offset}, not {MANIFEST_OFFSET}")
    if not 0 < header.manifest_length <= MAX_MANIFEST:
        raise _corrupt(path, f"bad header: manifest length {header.manifest_length}")
    if header.trailer_offset < header.manifest_offset + header.manifest_length:
        raise _corrupt(path, "bad header: the trailer offset is inside the manifest")
    _check_zeros(path, page[HEADER.size :], HEADER.size, "the header's padding")
    if len(page) < ALIGN:
        raise _truncated(path, "header page", len(page), ALIGN)
    return header


def _load_manifest(path: Path, raw: bytes, header: Header) -> Manifest:
    if hashlib.sha256(raw).digest() != header.manifest_sha256:
        raise RestoreError(f"{path}: manifest unreadable: checksum mismatch (the dump file is corrupt)")
    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError; TypeError: a member with odd keys
        raise RestoreError(f"{path}: manifest unreadable: {e}") from e
    if manifest.format_version != header.version:
        raise RestoreError(f"{path}: manifest unreadable: its format_version differs from the header's")
    return manifest


def _check_layout(path: Path, fd: int, manifest: Manifest, manifest_end: int, trailer_off: int, size: int) -> None:
    """Members in offset order, each at the first aligned offset after the one before, all before the trailer.

    The bytes between the parts (the manifest's spare room, alignment padding) must be zeros.
    """
    pos, gap_start = manifest_end, manifest_end
    ordered = sorted(manifest.members.items(), key=lambda item: (item[1].offset, item[1].stored_size))
    for index, (name, member) in enumerate(ordered):
        end = member.offset + member.stored_size
        if member.offset < pos or end > trailer_off:
            raise _corrupt(path, f"member {name} overlaps another part of the file")
        if index and member.offset != round_up(pos, ALIGN):
            raise _corrupt(path, f"member {name} does not start at the first aligned offset after the one before")
        if size < end:
            raise _truncated(path, f"member {name}", size - member.offset, member.stored_size)
        _check_zero_range(path, fd, gap_start, member.offset - gap_start)
        pos = gap_start = end
    if ordered and trailer_off != pos:
        raise _corrupt(path, "the trailer does not follow the last member")
    if size < trailer_off:
        raise _truncated(path, "trailer", 0, TRAILER.size)
    _check_zero_range(path, fd, gap_start, trailer_off - gap_start)


def _check_zero_range(path: Path, fd: int, offset: int, length: int) -> None:
    while length > 0:
        chunk = os.pread(fd, min(length, ZERO_CHUNK), offset)
        if not chunk:
            raise _truncated(path, "padding", 0, length)
        _check_zeros(path, chunk, offset, "padding")
        offset, length = offset + len(chunk), length - len(chunk)


def _check_zeros(path: Path, data: bytes, offset: int, what: str) -> None:
    if data.count(0) != len(data):
        first = next(i for i, byte in enumerate(data) if byte)
        raise _corrupt(path, f"{what} at offset {offset + first} is not zero")


def _check_trailer(path: Path, tail: bytes, trailer_off: int, manifest_sha: bytes, size: int) -> None:
    if len(tail) < TRAILER.size:
        raise _truncated(path, "trailer", len(tail), TRAILER.size)
    if TRAILER.unpack(tail) != (TRAILER_MAGIC, trailer_off, manifest_sha):
        raise _corrupt(path, "bad trailer")
    if size > trailer_off + TRAILER.size:
        raise _corrupt(path, f"{size - trailer_off - TRAILER.size} unexpected bytes after the trailer")


def _truncated(path: Path, part: str, have: int, want: int) -> RestoreError:
    return RestoreError(f"{path}: dump file is truncated: {part} has {max(have, 0)} of {want} bytes")


def _corrupt(path: Path, what: str) -> RestoreError:
    return RestoreError(f"{path}: dump file is corrupt: {what}")
