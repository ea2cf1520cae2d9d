"""The vzpy dump file: a CRIU image directory, optional extra members and a JSON manifest in one file.

Layout (docs/dumpfile.md): header at 0, manifest at 4096, members at 4096-aligned offsets, trailer at the end.
The manifest sits at the front, so `dumpinfo` reads two small pieces, and a cut-off copy still says which
member it lost. It is written last into room reserved up front, so packing streams every member exactly once.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import platform
import queue
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from vzpy import __version__
from vzpy.errors import ChkpntError, RestoreError, VzError

FORMAT_NAME = "vzpy-dump"
FORMAT_VERSION = 1
MAGIC = b"VZPYDUMP"
TRAILER_MAGIC = b"VZPYTAIL"
# magic, format version, flags (0), manifest offset, manifest length, trailer offset, manifest sha256
HEADER = struct.Struct("<8sIIQQQ32s")
# magic, trailer offset, manifest sha256: ties the trailer to this header, so a file cut short is never taken whole
TRAILER = struct.Struct("<8sQ32s")
ALIGN = 4096  # members start page-aligned: mmap maps them without slack, and reflinking filesystems can share blocks
MANIFEST_OFFSET = ALIGN
MAX_MANIFEST = 64 << 20
COPY_CHUNK = 64 << 20
STREAM_CHUNK = 4 << 20
# Level 1 on every core: CRIU pages of code and heap shrink ~2.5x at level 1 and ~2.7x at 3, but 3 is half as fast.
ZSTD_LEVEL = 1
ZSTD_THREADS = -1
STORED_AS_IS = (".zst", ".gz", ".xz", ".bz2", ".lz4", ".zip")  # already compressed: zstd would only cost time
PROGRESS_MIN = 64 << 20
SYNC_FILE_RANGE_WRITE = 2
_PLACEHOLDER = 10**20 - 1  # wider than any u64, so the real manifest never outgrows the room reserved for it
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@+:=-]{1,255}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_FALLBACK_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
# Flags the kernel reports about itself or the hypervisor; a restored process never sees them.
_IGNORED_FLAGS_TEXT = (
    "hypervisor constant_tsc nonstop_tsc tsc_known_freq tsc_reliable tsc_adjust tsc_deadline_timer rep_good nopl "
    "xtopology cpuid extd_apicid aperfmperf arat x2apic apic acpi ht tm tm2 pbe ss est vmx svm smx ds_cpl dtes64 "
    "pdcm xtpr dca epb pti ibrs ibpb stibp ssbd md_clear flush_l1d arch_capabilities cpuid_fault pts pln dtherm ida "
    "hwp hwp_notify hwp_act_window hwp_epp hwp_pkg_req vmmcall osvw skinit wdt topoext perfctr_core perfctr_nb "
    "perfctr_llc cmp_legacy cr8_legacy tpr_shadow vnmi flexpriority ept vpid ept_ad npt lbrv nrip_save tsc_scale "
    "vmcb_clean flushbyasid decodeassists pausefilter pfthreshold v_vmsave_vmload vgif v_spec_ctrl avic ibs "
    "nodeid_msr invpcid_single cat_l3 cdp_l3 mba cqm cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local rdt_a "
    "overflow_recov succor smca sme sev sev_es amd_ppin proc_feedback ssbd_virt virt_ssbd amd_ssbd amd_stibp "
    "ibrs_enhanced retpoline retpoline_amd user_shstk"
)
IGNORED_CPU_FLAGS = frozenset(_IGNORED_FLAGS_TEXT.split())


@dataclass
class Member:
    """One file in the dump: `size`/`sha256` describe the original bytes, `stored_size` what the dump holds."""

    size: int
    sha256: str
    offset: int
    stored_size: int
    codec: str = "none"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Manifest:
    ctid: str
    criu_version: str
    ct_config: str
    processes: list[dict[str, Any]] = field(default_factory=list)
    fs_fingerprint: Any = None
    with_fs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    created_unix: float = 0.0
    vzpy_version: str = __version__
    kernel: str = field(default_factory=platform.release)
    arch: str = field(default_factory=platform.machine)
    cpu: dict[str, Any] = field(default_factory=lambda: host_cpu_info())
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    compression: str = "none"
    memory_bytes: int = 0
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.created:
            now = _now()
            self.created = now.isoformat(timespec="seconds").replace("+00:00", "Z")
            self.created_unix = round(now.timestamp(), 3)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest; ValueError says what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = sorted(known - {"extra"} - data.keys())
        if missing:
            raise ValueError(f"missing field {missing[0]}")
        for name, kind in _FIELD_TYPES.items():
            if name in data and not isinstance(data[name], kind):
                raise ValueError(f"field {name} has the wrong type")
        values = {k: v for k, v in data.items() if k in known}
        values["members"] = _parse_members(values["members"])
        manifest = cls(**values)
        if manifest.format != FORMAT_NAME:
            raise ValueError(f"format is {manifest.format!r}, not {FORMAT_NAME!r}")
        return manifest


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("ctid", "criu_version", "ct_config", "created", "vzpy_version", "kernel", "arch"), str),
    **dict.fromkeys(("format", "compression"), str),
    **dict.fromkeys(("format_version", "memory_bytes"), int),
    **dict.fromkeys(("cpu", "extra", "members"), dict),
    "processes": list,
    "with_fs": bool,
    "created_unix": (int, float),
}


def _parse_members(raw: Any) -> dict[str, Member]:
    if not isinstance(raw, dict):
        raise ValueError("members is not an object")
    members = {}
    for name, entry in raw.items():
        if problem := _name_problem(name):
            raise ValueError(f"member {name!r}: {problem}")
        member = Member(**entry)
        ints = (member.size, member.offset, member.stored_size)
        if not all(type(n) is int and n >= 0 for n in ints) or not _SHA_RE.match(str(member.sha256)):
            raise ValueError(f"member {name}: bad size, offset or sha256")
        if member.codec not in ("none", "zstd") or (member.codec == "none" and member.size != member.stored_size):
            raise ValueError(f"member {name}: bad codec {member.codec!r}")
        members[name] = member
    return members


def _name_problem(name: Any) -> str | None:
    """Members are plain file names: nothing that could climb out of the directory they are extracted to."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        return "not a plain file name (letters, digits and _.@+:=- only)"
    return None


# --- CPU ---


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The compatibility-relevant part of /proc/cpuinfo's first processor (x86 and arm64 spellings)."""
    first: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    return {
        "arch": platform.machine(),
        "vendor": first.get("vendor_id", first.get("CPU implementer", "")),
        "model_name": first.get("model name", ""),
        "family": first.get("cpu family", first.get("CPU architecture", "")),
        "model": first.get("model", first.get("CPU part", "")),
        "flags": sorted(set(first.get("flags", first.get("Features", "")).split())),
    }


def host_cpu_info() -> dict[str, Any]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return parse_cpuinfo("")


def cpu_compatible(dumped: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Why processes dumped on `dumped` may not run on `here`: one line per problem, empty when none."""
    if dumped.get("arch") and here.get("arch") and dumped["arch"] != here["arch"]:
        return [f"the dump was made on {dumped['arch']}, this host is {here['arch']}"]
    missing = set(dumped.get("flags", ())) - set(here.get("flags", ())) - IGNORED_CPU_FLAGS
    return [f"CPU flag {flag} of the dumping host is missing here" for flag in sorted(missing)]


# --- describe ---


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def describe(manifest: Manifest) -> list[str]:
    """Human lines for `vzpy dumpinfo`."""
    m = manifest
    when = datetime.fromtimestamp(m.created_unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    stored = sum(x.stored_size for x in m.members.values())
    total = sum(x.size for x in m.members.values())
    packed = f" (stored {human_size(stored)}, {m.compression})" if m.compression != "none" else ""
    cpu = m.cpu or {}
    return [
        f"CT {m.ctid}, dumped {when}",
        f"vzpy {m.vzpy_version}, CRIU {m.criu_version}, kernel {m.kernel} ({m.arch})",
        f"CPU: {cpu.get('vendor', '?')} {cpu.get('model_name', '?')}, {len(cpu.get('flags', ()))} flags",
        _processes_line(m.processes),
        f"memory: {human_size(m.memory_bytes)}",
        f"filesystem: {'included' if m.with_fs else 'not included'}",
        f"members: {len(m.members)} files, {human_size(total)}{packed}",
    ]


def _processes_line(processes: list[dict[str, Any]], shown: int = 8) -> str:
    names = [f"{p.get('pid', '?')} {p.get('comm', '?')}" for p in processes[:shown]]
    more = f", and {len(processes) - shown} more" if len(processes) > shown else ""
    return f"processes: {len(processes)}" + (f" ({', '.join(names)}{more})" if names else "")


# --- writing ---


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
    zstd = _zstd(ChkpntError) if compress else None
    sources = _collect_sources(Path(images_dir), extra_members or {}, compress)
    manifest = replace(
        manifest,
        compression="zstd" if compress else "none",
        memory_bytes=sum(s.size for s in sources if s.name.startswith("pages-") and s.name.endswith(".img")),
    )
    data_start = MANIFEST_OFFSET + _round_up(len(_placeholder(manifest, sources).to_json().encode()), ALIGN)
    needed = _round_up(data_start + sum(_round_up(s.size, ALIGN) for s in sources), ALIGN) + TRAILER.size
    _check_target(path, None if compress else needed)
    if progress:
        progress(f"packing {len(sources)} files ({human_size(sum(s.size for s in sources))}) into {path}")
    try:
        with _atomic_file(path) as fd:
            return _pack(fd, manifest, sources, data_start, zstd, progress)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ChkpntError(_no_space(path.parent, needed, estimate=compress)) from e
        raise ChkpntError(f"cannot write the dump file {path}: {_os_text(e)}") from e


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
    if problem := _name_problem(name):
        raise ChkpntError(f"cannot pack {path}: {problem}")
    try:
        st = path.stat()
    except OSError as e:
        raise ChkpntError(f"cannot pack {path}: {_os_text(e)}") from e
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


@contextmanager
def _atomic_file(path: Path) -> Iterator[int]:
    """A 0600 temp file next to PATH; renamed over PATH once written and fsync'ed, removed on any failure."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pack(
    fd: int,
    manifest: Manifest,
    sources: list[_Source],
    data_start: int,
    zstd: ModuleType | None,
    progress: Callable[[str], None] | None,
) -> Manifest:
    # The hasher reads each source while the main thread copies it: two cores, one pass each.
    with ThreadPoolExecutor(1, thread_name_prefix="vzpy-sha256") as pool:
        hashes = [pool.submit(_hash_file, s.path) for s in sources]
        try:
            placed = _place_members(fd, sources, data_start, zstd, progress)
        except BaseException:
            for future in hashes:  # only on failure: on success every hash is still wanted
                future.cancel()
            raise
        members = {s.name: _member(s, where, future) for s, where, future in zip(sources, placed, hashes, strict=True)}
    trailer_offset = max([data_start] + [m.offset + m.stored_size for m in members.values()])
    manifest = replace(manifest, members=members)
    _finish(fd, manifest.to_json().encode(), data_start, trailer_offset)
    return manifest


def _place_members(
    fd: int, sources: list[_Source], data_start: int, zstd: ModuleType | None, progress: Callable[[str], None] | None
) -> list[tuple[int, int, str]]:
    """Write each source at the next aligned offset; (offset, stored size, codec) per source."""
    placed, pos = [], data_start
    compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS) if zstd else None
    for s in sources:
        pos = _round_up(pos, ALIGN)
        if progress and s.size >= PROGRESS_MIN:
            progress(f"packing {s.name} ({human_size(s.size)})")
        codec = s.codec
        stored = _compress_member(fd, s, pos, compressor) if codec == "zstd" else _copy_member(fd, s, pos)
        if codec == "zstd" and stored >= s.size:  # incompressible (random or encrypted memory): store it plain
            codec, stored = "none", _copy_member(fd, s, pos)
        placed.append((pos, stored, codec))
        pos += stored
    return placed


def _copy_member(fd: int, source: _Source, pos: int) -> int:
    src = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copied = _copy_range(src, fd, 0, pos, source.size, writeback=True)
    finally:
        os.close(src)
    if copied != source.size:
        raise ChkpntError(f"{source.path} changed while it was being packed")
    return copied


def _compress_member(fd: int, source: _Source, pos: int, compressor: Any) -> int:
    writer = _FdWriter(fd, pos)
    with open(source.path, "rb", buffering=0) as src:
        try:
            read, _ = compressor.copy_stream(
                src, writer, size=source.size, read_size=STREAM_CHUNK, write_size=STREAM_CHUNK
            )
        except OSError:
            raise
        except Exception as e:  # zstandard.ZstdError, e.g. "Src size is incorrect" when the file changed
            raise ChkpntError(f"cannot compress {source.path}: {e}") from e
    if read != source.size:
        raise ChkpntError(f"{source.path} changed while it was being packed")
    return writer.written


def _member(source: _Source, where: tuple[int, int, str], digest: Future[tuple[int, str]]) -> Member:
    size, sha256 = digest.result()
    if size != source.size:
        raise ChkpntError(f"{source.path} changed while it was being packed")
    offset, stored_size, codec = where
    return Member(size=size, sha256=sha256, offset=offset, stored_size=stored_size, codec=codec)


def _finish(fd: int, manifest_json: bytes, data_start: int, trailer_offset: int) -> None:
    if MANIFEST_OFFSET + len(manifest_json) > data_start:
        raise AssertionError("the manifest outgrew the room reserved for it")
    digest = hashlib.sha256(manifest_json).digest()
    _pwrite_all(fd, manifest_json, MANIFEST_OFFSET)
    _pwrite_all(fd, TRAILER.pack(TRAILER_MAGIC, trailer_offset, digest), trailer_offset)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, MANIFEST_OFFSET, len(manifest_json), trailer_offset, digest)
    _pwrite_all(fd, header, 0)
    # A member stored plain after all leaves its longer compressed attempt behind; nothing may follow the trailer.
    os.ftruncate(fd, trailer_offset + TRAILER.size)


# --- copying and hashing ---


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int, *, writeback: bool = False) -> int:
    """Copy in the kernel where it can (copy_file_range, else sendfile); returns the bytes copied, short only at EOF."""
    done = 0
    while done < length:
        n = _copy_chunk(src, dst, src_off + done, dst_off + done, min(COPY_CHUNK, length - done))
        if n == 0:
            break
        if writeback:
            _start_writeback(dst, dst_off + done, n)
        done += n
    return done


def _copy_chunk(src: int, dst: int, src_off: int, dst_off: int, count: int) -> int:
    try:
        return os.copy_file_range(src, dst, count, src_off, dst_off)
    except OSError as e:
        if e.errno not in _FALLBACK_COPY:
            raise
    # Across filesystems (EXDEV since Linux 5.19, e.g. images in tmpfs) sendfile still copies in the kernel.
    os.lseek(dst, dst_off, os.SEEK_SET)
    try:
        return os.sendfile(dst, src, src_off, count)
    except OSError as e:
        if e.errno not in _FALLBACK_COPY:
            raise
    data = os.pread(src, min(count, STREAM_CHUNK), src_off)
    _pwrite_all(dst, data, dst_off)
    return len(data)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the disk start on what was just written, so that the final fsync has little left to wait for."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range() -> Any:
    # Not in the os module. Unlike posix_fadvise(DONTNEED), it starts writeback without evicting pages that
    # are already clean, so a restore on this host finds the dump file in the page cache.
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _load_sync_file_range()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _FdWriter:
    """A write()-only file object over fd from `offset` on, for zstandard's copy_stream."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd, self.start, self.written, self._synced = fd, offset, 0, 0

    def write(self, data: bytes) -> int:
        _pwrite_all(self.fd, data, self.start + self.written)
        self.written += len(data)
        if self.written - self._synced >= COPY_CHUNK:
            _start_writeback(self.fd, self.start + self._synced, self.written - self._synced)
            self._synced = self.written
        return len(data)


def _hash_file(path: Path) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size, _hash_region(fd, 0, size)
    finally:
        os.close(fd)


def _hash_region(fd: int, offset: int, length: int) -> str:
    """sha256 of a file range, hashed in place through mmap (no copy; hashlib drops the GIL meanwhile)."""
    digest = hashlib.sha256()
    if length:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, offset - start + length, access=mmap.ACCESS_READ, offset=start) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mapped) as view, view[offset - start :] as region:
                digest.update(region)
    return digest.hexdigest()


class _Worker:
    """Runs `fn` on queued items on a thread of its own, so that it overlaps with producing the next item.

    An error in `fn` is kept (later items are dropped) and raised by the producer's next put() or check().
    """

    def __init__(self, fn: Callable[[Any], object]) -> None:
        self._fn = fn
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="vzpy-dumpfile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:
                    self._error = e

    def put(self, item: Any) -> None:
        self.check()
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def check(self) -> None:
        if self._error is not None:
            raise self._error


_STOP = object()


class _Sink:
    """Where a member is decompressed to: counted, then hashed and (unless verifying) written on worker threads."""

    def __init__(self, out: int | None, limit: int) -> None:
        self.limit, self.count, self.digest = limit, 0, hashlib.sha256()
        self.workers = [_Worker(self.digest.update)]
        if out is not None:
            self.workers.append(_Worker(lambda item: _pwrite_all(out, item[1], item[0])))

    def write(self, data: bytes) -> int:
        if self.count + len(data) > self.limit:
            raise _Oversize
        self.workers[0].put(data)
        if len(self.workers) > 1:
            self.workers[1].put((self.count, data))
        self.count += len(data)
        return len(data)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def finish(self) -> tuple[int, str]:
        """Wait for the workers; (bytes, sha256) or the error one of them met."""
        self.stop()
        for worker in self.workers:
            worker.check()
        return self.count, self.digest.hexdigest()


class _Oversize(Exception):
    pass


class _RegionReader:
    """A read()-only file object over fd[offset:offset+length], for zstandard's copy_stream."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + length

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


# --- reading ---


def read_manifest(path: Path) -> Manifest:
    """The manifest, after the checks that need no member data (magic, version, manifest checksum, truncation)."""
    with _open_dump(Path(path)) as (_, manifest):
        return manifest


def verify(path: Path) -> Manifest:
    """Check every member's size and sha256 too; writes nothing anywhere."""
    path = Path(path)
    with _open_dump(path) as (fd, manifest), ThreadPoolExecutor(2, thread_name_prefix="vzpy-verify") as pool:
        items = [(name, manifest.members[name]) for name in _in_file_order(manifest, manifest.members)]
        digests = pool.map(lambda item: _member_digest(path, fd, item, None), items)
        for (name, member), (size, sha256) in zip(items, digests, strict=True):
            _check_member(path, name, member, size, sha256)
    return manifest


def extract(path: Path, dest_dir: Path, *, only: Iterable[str] | None = None) -> Manifest:
    """Verify and extract members into dest_dir (made 0700; files 0600). On failure, nothing is left behind."""
    path, dest_dir = Path(path), Path(dest_dir)
    with _open_dump(path) as (fd, manifest):
        names = _select(path, manifest, only)
        made_dir = _make_dest(dest_dir)
        created: list[Path] = []
        try:
            _extract_members(path, fd, manifest, names, dest_dir, created)
        except BaseException as e:
            for file in created:
                file.unlink(missing_ok=True)
            if made_dir:
                dest_dir.rmdir()
            if isinstance(e, OSError):
                raise RestoreError(f"cannot extract {path} into {dest_dir}: {_os_text(e)}") from e
            raise
    return manifest


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
        raise RestoreError(f"cannot extract into {dest_dir}: {_os_text(e)}") from e
    return True


def _extract_members(
    path: Path, fd: int, manifest: Manifest, names: list[str], dest_dir: Path, created: list[Path]
) -> None:
    # Plain members: the hasher reads the dump's range through mmap while the kernel copies the same range.
    with ThreadPoolExecutor(1, thread_name_prefix="vzpy-sha256") as pool:
        pending: list[tuple[str, Member, Future[str]]] = []
        try:
            for name in names:
                member = manifest.members[name]
                target = dest_dir / name
                out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created.append(target)
                try:
                    if member.codec == "none":
                        pending.append((name, member, pool.submit(_hash_region, fd, member.offset, member.size)))
                        copied = _copy_range(fd, out, member.offset, 0, member.size)
                        _check_member(path, name, member, copied, None)
                    else:
                        _check_member(path, name, member, *_member_digest(path, fd, (name, member), out))
                finally:
                    os.close(out)
            for name, member, digest in pending:
                _check_member(path, name, member, member.size, digest.result())
        finally:
            for _, _, digest in pending:
                digest.cancel()


def _member_digest(path: Path, fd: int, item: tuple[str, Member], out: int | None) -> tuple[int, str]:
    """(size, sha256) of a member's original bytes; decompressed into `out` on the way when given."""
    name, member = item
    if member.codec == "none":
        return member.stored_size, _hash_region(fd, member.offset, member.stored_size)
    sink = _Sink(out, member.size)
    try:
        _decompress(path, fd, name, member, sink)
    except BaseException:
        sink.stop()
        raise
    return sink.finish()


def _decompress(path: Path, fd: int, name: str, member: Member, sink: _Sink) -> None:
    reader = _RegionReader(fd, member.offset, member.stored_size)
    try:
        _zstd(RestoreError).ZstdDecompressor().copy_stream(
            reader, sink, read_size=STREAM_CHUNK, write_size=STREAM_CHUNK
        )
    except _Oversize:
        raise _corrupt(path, f"{name} decompresses to more than {member.size} bytes") from None
    except (OSError, VzError):
        raise
    except Exception as e:  # zstandard.ZstdError
        raise _corrupt(path, f"{name} does not decompress ({e})") from e


def _check_member(path: Path, name: str, member: Member, size: int, sha256: str | None) -> None:
    if size != member.size:
        raise _corrupt(path, f"{name} has {size} bytes, the manifest says {member.size}")
    if sha256 is not None and sha256 != member.sha256:
        raise _corrupt(path, f"sha256 mismatch in {name}")


@contextmanager
def _open_dump(path: Path) -> Iterator[tuple[int, Manifest]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot read dump file {path}: {_os_text(e)}") from e
    try:
        try:
            manifest = _check_structure(path, fd)
        except OSError as e:  # a directory opens fine but does not read
            raise RestoreError(f"cannot read dump file {path}: {_os_text(e)}") from e
        yield fd, manifest
    finally:
        os.close(fd)


def _check_structure(path: Path, fd: int) -> Manifest:
    """Everything that can be checked without reading member data, in file order."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER.size, 0)
    _, version, _, manifest_off, manifest_len, trailer_off, manifest_sha = _parse_header(path, head)
    if version > FORMAT_VERSION:
        raise RestoreError(
            f"{path}: dump file format version {version} is newer than this vzpy supports ({FORMAT_VERSION});"
            " restore it with a newer vzpy"
        )
    if version < 1 or not HEADER.size <= manifest_off <= trailer_off - manifest_len or manifest_len > MAX_MANIFEST:
        raise _corrupt(path, "bad header")
    if size < manifest_off + manifest_len:
        raise _truncated(path, "manifest", size - manifest_off, manifest_len)
    manifest = _load_manifest(path, os.pread(fd, manifest_len, manifest_off), manifest_sha, version)
    _check_layout(path, manifest, manifest_off + manifest_len, trailer_off, size)
    _check_trailer(path, os.pread(fd, TRAILER.size, trailer_off), trailer_off, manifest_sha, size)
    return manifest


def _parse_header(path: Path, head: bytes) -> tuple[Any, ...]:
    if not head or not head.startswith(MAGIC[: len(head)]):
        why = "the file is empty" if not head else "bad magic"
        raise RestoreError(f"{path}: not a vzpy dump file ({why})")
    if len(head) < HEADER.size:
        raise _truncated(path, "header", len(head), HEADER.size)
    return HEADER.unpack(head)


def _load_manifest(path: Path, raw: bytes, expected_sha: bytes, version: int) -> Manifest:
    if hashlib.sha256(raw).digest() != expected_sha:
        raise RestoreError(f"{path}: manifest unreadable: checksum mismatch (the dump file is corrupt)")
    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError; TypeError: a member with odd keys
        raise RestoreError(f"{path}: manifest unreadable: {e}") from e
    if manifest.format_version != version:
        raise RestoreError(f"{path}: manifest unreadable: its format_version differs from the header's")
    return manifest


def _check_layout(path: Path, manifest: Manifest, data_start: int, trailer_off: int, size: int) -> None:
    pos = data_start
    for name, member in sorted(manifest.members.items(), key=lambda item: item[1].offset):
        end = member.offset + member.stored_size
        if member.offset < pos or end > trailer_off:
            raise _corrupt(path, f"member {name} overlaps another part of the file")
        if size < end and member.stored_size:
            raise _truncated(path, f"member {name}", size - member.offset, member.stored_size)
        pos = end


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


# --- helpers ---


def _zstd(error: type[VzError]) -> ModuleType:
    try:
        import zstandard
    except ImportError:
        raise error("zstd compression needs the zstandard Python package (run `make setup`)") from None
    return zstandard


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _os_text(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "Member",
    "cpu_compatible",
    "describe",
    "extract",
    "host_cpu_info",
    "human_size",
    "parse_cpuinfo",
    "read_manifest",
    "verify",
    "write_dumpfile",
]
