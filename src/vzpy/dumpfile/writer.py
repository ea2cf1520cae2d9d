"""Writing a dump file: every member streamed once, the manifest written last into room reserved for it."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from vzpy import fileio
from vzpy.dumpfile import kio, stream
from vzpy.dumpfile.format import (
    ALIGN,
    DIGEST,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MANIFEST_OFFSET,
    TRAILER,
    TRAILER_MAGIC,
    Manifest,
    Member,
    memory_bytes,
    name_problem,
    round_up,
)
from vzpy.errors import ChkpntError
from vzpy.units import human_size

# Level 1 on every core: CRIU pages of code and heap shrink ~2.5x at level 1 and ~2.7x at 3, but 3 is half as fast.
ZSTD_LEVEL = 1
ZSTD_THREADS = -1
STORED_AS_IS = (".zst", ".gz", ".xz", ".bz2", ".lz4", ".zip")  # already compressed: zstd would only cost time
PROGRESS_MIN = 64 << 20
# Streaming: the manifest's room before the pages members (a sparse hole until the manifest is written; one
# that outgrows it moves the members), the FIFOs beyond the pages images expected, and the pump's last drain.
MANIFEST_ROOM = 1 << 20
FIFO_SLACK = 16
MAX_FIFOS = 256  # two fds each (vzpy's, the keeper's): a CT with more shared memory segments gets files past it
DRAIN_TIMEOUT = 120.0
_T = TypeVar("_T")
_PLACEHOLDER = 10**20 - 1  # wider than any u64, so the real manifest never outgrows the room reserved for it


@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    size: int
    codec: str


def write_dumpfile(
    path: Path,
    images_dir: Path,
    manifest: Manifest,
    *,
    extra_members: Mapping[str, Path] | None = None,
    compress: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Pack images_dir's files and extra_members into PATH atomically; returns the manifest as written."""
    path = Path(path)
    zstd = kio.zstd_module(ChkpntError) if compress else None
    sources = _collect_sources(Path(images_dir), extra_members or {}, compress)
    manifest = replace(
        manifest,
        format_version=FORMAT_VERSION,
        digest=DIGEST,
        compression="zstd" if compress else "none",
        memory_bytes=memory_bytes({s.name: s.size for s in sources}),
    )
    data_start = MANIFEST_OFFSET + round_up(len(_placeholder(manifest, sources).to_json().encode()), ALIGN)
    needed = round_up(data_start + sum(round_up(s.size, ALIGN) for s in sources), ALIGN) + TRAILER.size
    _check_target(path, None if compress else needed)
    if progress:
        progress(f"packing {len(sources)} files ({human_size(sum(s.size for s in sources))}) into {path}")
    try:
        with fileio.atomic_fd(path, mode=0o600) as fd:  # durable; removed on any failure
            return _pack(fd, manifest, sources, data_start, zstd, progress)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ChkpntError(_no_space(path.parent, needed, estimate=compress)) from e
        raise ChkpntError(f"cannot write the dump file {path}: {kio.os_text(e)}") from e


def write_dumpfile_streamed(
    path: Path,
    images_dir: Path,
    *,
    pages_images: int,
    take_images: Callable[[], None],
    describe: Callable[[], tuple[Manifest, Mapping[str, Path]]],
    spill_dir: Path,
    manifest_room: int = MANIFEST_ROOM,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Like write_dumpfile, with the memory images streamed into PATH while take_images() runs CRIU.

    pages_images: how many pages images CRIU is expected to write (stream.pages_images).
    describe() runs after CRIU (the CT still frozen) and gives the manifest and the extra members.
    """
    path, images_dir = Path(path), Path(images_dir)
    _check_target(path, None)
    start = MANIFEST_OFFSET + round_up(manifest_room, ALIGN)
    try:
        with fileio.atomic_fd(path, mode=0o600) as fd:  # durable; removed on any failure
            fifos = min(pages_images + FIFO_SLACK, MAX_FIFOS)
            pump = stream.PagesPump(fd, images_dir, spill_dir, fifos, start)
            try:
                pump.start()
                take_images()
                streamed, spilled = _written(path, lambda: pump.finish(DRAIN_TIMEOUT))
            finally:
                pump.close()
            manifest, extra = describe()
            rest = {**spilled, **extra}
            return _written(path, lambda: _pack_rest(fd, manifest, images_dir, rest, streamed, pump, progress))
    except OSError as e:  # the temp file's own creation or its final fsync
        raise _write_error(path, e) from e


def _written(path: Path, write: Callable[[], _T]) -> _T:
    try:
        return write()
    except OSError as e:
        raise _write_error(path, e) from e


def _write_error(path: Path, e: OSError) -> ChkpntError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path.parent) // (1 << 20)
        return ChkpntError(
            f"not enough disk space for the dump file in {path.parent} ({free} MiB free): "
            "free some space or write the dump elsewhere"
        )
    return ChkpntError(f"cannot write the dump file {path}: {kio.os_text(e)}")


def _pack_rest(
    fd: int,
    manifest: Manifest,
    images_dir: Path,
    extra: Mapping[str, Path],
    streamed: list[stream.Streamed],
    pump: stream.PagesPump,
    progress: Callable[[str], None] | None,
) -> Manifest:
    """The images CRIU wrote as files and the extra members after the streamed ones, then the manifest."""
    sources = _collect_sources(images_dir, extra, compress=False)
    members = {s.name: Member(s.size, s.digest, s.offset, s.size) for s in streamed}
    if clash := members.keys() & {s.name for s in sources}:
        raise ChkpntError(f"dump member {sorted(clash)[0]} was both streamed and written as a file")
    members |= _write_members(fd, sources, pump.end, None, progress)
    start = min([pump.data_start] + [m.offset for m in members.values()])
    manifest = replace(
        manifest,
        format_version=FORMAT_VERSION,
        digest=DIGEST,
        compression="none",
        memory_bytes=memory_bytes({name: m.size for name, m in members.items()}),
        members=dict(sorted(members.items())),
    )
    start, manifest = _make_room(fd, manifest, start)
    trailer_offset = max([start] + [m.offset + m.stored_size for m in manifest.members.values()])
    _finish(fd, manifest.to_json().encode(), start, trailer_offset)
    return manifest


def _make_room(fd: int, manifest: Manifest, start: int) -> tuple[int, Manifest]:
    """Members start at `start`; if the manifest does not fit before them, move them all further on."""
    end = max([start] + [m.offset + m.stored_size for m in manifest.members.values()])
    moved, placed = 0, manifest
    while MANIFEST_OFFSET + len(placed.to_json().encode()) > start + moved:
        # the offsets grow by the move, and with them the manifest: room for a few more digits a member
        needed = MANIFEST_OFFSET + len(placed.to_json().encode()) + 8 * len(manifest.members)
        moved = round_up(needed, ALIGN) - start
        members = {name: replace(m, offset=m.offset + moved) for name, m in manifest.members.items()}
        placed = replace(manifest, members=members)
    if moved:
        stream.move_forward(fd, start, end, moved)
        _write_zeros(fd, start, moved)  # what the members left behind is padding now (the manifest goes over it)
    return start + moved, placed


def _collect_sources(images_dir: Path, extra: Mapping[str, Path], compress: bool) -> list[_Source]:
    if not images_dir.is_dir():
        raise ChkpntError(f"CRIU image directory {images_dir} does not exist")
    named = [(e.name, Path(e.path)) for e in sorted(os.scandir(images_dir), key=lambda e: e.name)]
    for name, source in extra.items():
        if name in dict(named):
            raise ChkpntError(f"extra dump member {name} clashes with a CRIU image of that name")
        named.append((name, Path(source)))
    return [_source(name, source, compress) for name, source in named]


def _source(name: str, path: Path, compress: bool) -> _Source:
    if problem := name_problem(name):
        raise ChkpntError(f"cannot pack {path}: {problem}")
    try:
        st = path.stat()
    except OSError as e:
        raise ChkpntError(f"cannot pack {path}: {kio.os_text(e)}") from e
    if not path.is_file():
        raise ChkpntError(f"cannot pack {path}: not a regular file")
    zstd = compress and st.st_size > 0 and not name.endswith(STORED_AS_IS)
    return _Source(name, path, st.st_size, "zstd" if zstd else "none")


def _placeholder(manifest: Manifest, sources: list[_Source]) -> Manifest:
    """The manifest with every number at its widest: its JSON is the most the real one can take.

    A member's codec may still turn from "zstd" to "none" (incompressible data): both are four characters.
    """
    members = {s.name: Member(_PLACEHOLDER, "0" * 64, _PLACEHOLDER, _PLACEHOLDER, s.codec) for s in sources}
    return replace(manifest, members=members, memory_bytes=_PLACEHOLDER)


def _check_target(path: Path, needed: int | None) -> None:
    if not path.parent.is_dir():
        raise ChkpntError(
            f"directory {path.parent} for the dump file does not exist (create it or choose another --dumpfile)"
        )
    if path.is_dir():
        raise ChkpntError(f"{path} is a directory (give --dumpfile a file name)")
    if needed is not None and (free := _free_bytes(path.parent)) < needed:
        raise ChkpntError(_no_space(path.parent, needed, free=free))


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _no_space(directory: Path, needed: int, *, estimate: bool = False, free: int | None = None) -> str:
    free = _free_bytes(directory) if free is None else free
    mib = 1 << 20
    return (
        f"not enough disk space for the dump file in {directory}: {'up to ' if estimate else ''}"
        f"{-(-needed // mib)} MiB needed, {free // mib} MiB free (free some space or write the dump elsewhere)"
    )


def _pack(
    fd: int,
    manifest: Manifest,
    sources: list[_Source],
    data_start: int,
    zstd: Any,
    progress: Callable[[str], None] | None,
) -> Manifest:
    members = _write_members(fd, sources, data_start, zstd, progress)
    trailer_offset = max([data_start] + [m.offset + m.stored_size for m in members.values()])
    manifest = replace(manifest, members=members)
    _finish(fd, manifest.to_json().encode(), data_start, trailer_offset)
    return manifest


def _write_members(
    fd: int, sources: list[_Source], start: int, zstd: Any, progress: Callable[[str], None] | None
) -> dict[str, Member]:
    """Place the sources from `start` on, each hashed while it is copied: two cores, one pass each."""
    with ThreadPoolExecutor(1, thread_name_prefix="vzpy-hash") as pool:
        hashes = [pool.submit(kio.hash_file, s.path, DIGEST) for s in sources]
        try:
            placed = _place_members(fd, sources, start, zstd, progress)
        except BaseException:
            for future in hashes:  # only on failure: on success every hash is still wanted
                future.cancel()
            raise
        return {s.name: _member(s, where, future) for s, where, future in zip(sources, placed, hashes, strict=True)}


def _place_members(
    fd: int, sources: list[_Source], data_start: int, zstd: Any, progress: Callable[[str], None] | None
) -> list[tuple[int, int, str]]:
    """Write each source at the next aligned offset; (offset, stored size, codec) per source."""
    placed, pos = [], data_start
    compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS) if zstd else None
    for s in sources:
        pos = round_up(pos, ALIGN)
        if progress and s.size >= PROGRESS_MIN:
            progress(f"packing {s.name} ({human_size(s.size)})")
        codec = s.codec
        stored = _compress_member(fd, s, pos, compressor) if codec == "zstd" else _copy_member(fd, s, pos)
        if codec == "zstd" and stored >= s.size:  # incompressible (random or encrypted memory): store it plain
            attempt, (codec, stored) = stored, ("none", _copy_member(fd, s, pos))
            # padding must be zeros: the end of the longer compressed attempt must not show through
            _write_zeros(fd, pos + stored, attempt - stored)
        placed.append((pos, stored, codec))
        pos += stored
    return placed


def _copy_member(fd: int, source: _Source, pos: int) -> int:
    src = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copied = kio.copy_range(src, fd, 0, pos, source.size, writeback=True)
    finally:
        os.close(src)
    if copied != source.size:
        raise ChkpntError(f"{source.path} shrank while it was being packed")
    return copied


def _write_zeros(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = min(length, kio.STREAM_CHUNK)
        kio.pwrite_all(fd, bytes(n), offset)
        offset, length = offset + n, length - n


def _compress_member(fd: int, source: _Source, pos: int, compressor: Any) -> int:
    writer = kio.FdWriter(fd, pos)
    with open(source.path, "rb", buffering=0) as src:
        try:
            compressor.copy_stream(
                src, writer, size=source.size, read_size=kio.STREAM_CHUNK, write_size=kio.STREAM_CHUNK
            )
        except OSError:
            raise
        except Exception as e:  # zstandard.ZstdError: "Src size is incorrect" when the file changed size
            raise ChkpntError(f"{source.path} changed while it was being packed ({e})") from e
    return writer.written


def _member(source: _Source, where: tuple[int, int, str], digest: Future[tuple[int, str]]) -> Member:
    size, hexdigest = digest.result()
    if size != source.size:
        raise ChkpntError(f"{source.path} changed size while it was being packed")
    offset, stored_size, codec = where
    return Member(size=size, digest=hexdigest, offset=offset, stored_size=stored_size, codec=codec)


def _finish(fd: int, manifest_json: bytes, data_start: int, trailer_offset: int) -> None:
    if MANIFEST_OFFSET + len(manifest_json) > data_start:
        raise AssertionError("the manifest outgrew the room reserved for it")
    digest = hashlib.sha256(manifest_json).digest()
    kio.pwrite_all(fd, manifest_json, MANIFEST_OFFSET)
    kio.pwrite_all(fd, TRAILER.pack(TRAILER_MAGIC, trailer_offset, digest), trailer_offset)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, MANIFEST_OFFSET, len(manifest_json), trailer_offset, digest)
    kio.pwrite_all(fd, header, 0)
    # A member stored plain after all leaves its longer compressed attempt behind; nothing may follow the trailer.
    os.ftruncate(fd, trailer_offset + TRAILER.size)
