"""The dump file: round trips, atomic writes, and every damaged file refused with the check that failed."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vzpy import dumpfile
from vzpy.dumpfile import FORMAT_VERSION, HEADER, MANIFEST_OFFSET, TRAILER, Manifest
from vzpy.errors import ChkpntError, RestoreError

PAGES = b"".join(hashlib.sha256(bytes([i % 256])).digest() * 128 for i in range(64))  # 256 KiB, compressible
CPU = {"arch": "x86_64", "vendor": "GenuineIntel", "model_name": "Xeon", "family": "6", "model": "85", "flags": []}


def manifest(**changes: Any) -> Manifest:
    values: dict[str, Any] = {
        "ctid": "101",
        "criu_version": "4.2.1",
        "ct_config": 'OSTEMPLATE="debian-12"\nRAM="1G"\n',
        "processes": [{"pid": 1, "comm": "init"}, {"pid": 42, "comm": "sshd"}],
        "fs_fingerprint": {"private": "/vz/private/101", "mtime": 1700000000},
        "cpu": {**CPU, "flags": ["fpu", "sse2", "avx2"]},
        **changes,
    }
    return Manifest(**values)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "inventory.img").write_bytes(b"inventory")
    (d / "core-1.img").write_bytes(os.urandom(3000))
    (d / "empty.img").write_bytes(b"")
    (d / "pages-1.img").write_bytes(PAGES)
    (d / "pages-2.img").write_bytes(os.urandom(4096))
    return d


@pytest.fixture
def dump(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest())
    return path


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def cut(path: Path, size: int) -> Path:
    os.truncate(path, size)
    return path


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def header(path: Path) -> tuple[Any, ...]:
    return HEADER.unpack(path.read_bytes()[: HEADER.size])


def rewrite_manifest(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change the manifest and keep header and trailer consistent, as a buggy or hostile writer would."""
    magic, version, flags, offset, length, trailer_offset, _ = header(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = json.loads(f.read(length))
        mutate(data)
        raw = json.dumps(data).encode()
        assert len(raw) <= length, "the test's change must not grow the manifest"
        digest = hashlib.sha256(raw).digest()
        f.seek(offset)
        f.write(raw)
        f.seek(0)
        f.write(HEADER.pack(magic, version, flags, offset, len(raw), trailer_offset, digest))
        f.seek(trailer_offset)
        f.write(TRAILER.pack(dumpfile.TRAILER_MAGIC, trailer_offset, digest))


def refused(action: Callable[[], object], message: str) -> RestoreError:
    with pytest.raises(RestoreError) as info:
        action()
    assert message in info.value.message
    assert "\n" not in info.value.message
    return info.value


# --- round trip ---


def test_round_trip_keeps_every_byte_and_the_manifest(tmp_path: Path, images: Path, dump: Path) -> None:
    written = dumpfile.read_manifest(dump)
    assert (written.ctid, written.criu_version, written.ct_config) == ("101", "4.2.1", manifest().ct_config)
    assert written.processes == [{"pid": 1, "comm": "init"}, {"pid": 42, "comm": "sshd"}]
    assert written.fs_fingerprint == {"private": "/vz/private/101", "mtime": 1700000000}
    assert written.memory_bytes == len(PAGES) + 4096
    assert written.format_version == FORMAT_VERSION and written.compression == "none"
    assert written.members["pages-1.img"].sha256 == hashlib.sha256(PAGES).hexdigest()
    assert {n: m.size for n, m in written.members.items()} == {n: len(b) for n, b in files(images).items()}
    assert dumpfile.verify(dump) == written
    out = tmp_path / "out"
    assert dumpfile.extract(dump, out) == written
    assert files(out) == files(images)


def test_permissions_are_0600_and_0700_whatever_the_umask(tmp_path: Path, images: Path) -> None:
    old = os.umask(0)
    try:
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
        dumpfile.extract(tmp_path / "ct.dump", tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ct.dump").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {0o600}


def test_members_are_page_aligned_and_the_manifest_is_at_the_front(dump: Path) -> None:
    magic, version, _, offset, _, trailer_offset, _ = header(dump)
    assert (magic, version, offset) == (b"VZPYDUMP", FORMAT_VERSION, MANIFEST_OFFSET)
    assert all(m.offset % 4096 == 0 for m in dumpfile.read_manifest(dump).members.values())
    assert dump.stat().st_size == trailer_offset + TRAILER.size


def test_manifest_json_round_trip() -> None:
    m = manifest(extra={"migration": {"from": "hostA"}})
    assert Manifest.from_json(m.to_json()) == m
    assert m.created.endswith("Z") and abs(m.created_unix - time.time()) < 60


def test_extra_members_are_packed_and_extracted_alone(tmp_path: Path, images: Path) -> None:
    fs = tmp_path / "fs.tar.zst"
    fs.write_bytes(os.urandom(10000))
    path = tmp_path / "ct.dump"
    written = dumpfile.write_dumpfile(path, images, manifest(with_fs=True), extra_members={"fs.tar.zst": fs})
    assert written.with_fs and written.members["fs.tar.zst"].size == 10000
    dumpfile.extract(path, tmp_path / "fs", only=["fs.tar.zst"])
    assert files(tmp_path / "fs") == {"fs.tar.zst": fs.read_bytes()}


def test_an_extra_member_may_not_shadow_an_image(tmp_path: Path, images: Path) -> None:
    with pytest.raises(ChkpntError, match="clashes"):
        dumpfile.write_dumpfile(tmp_path / "d", images, manifest(), extra_members={"core-1.img": images / "empty.img"})
    assert list(tmp_path.iterdir()) == [images]


@pytest.mark.parametrize("unavailable", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_copy_falls_back(tmp_path: Path, images: Path, monkeypatch: Any, unavailable: list[str]) -> None:
    def fails(*_: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in unavailable:
        monkeypatch.setattr(os, name, fails)
    dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    dumpfile.extract(tmp_path / "ct.dump", tmp_path / "out")
    assert files(tmp_path / "out") == files(images)


# --- compression ---


def test_compressed_round_trip(tmp_path: Path, images: Path) -> None:
    pytest.importorskip("zstandard")
    fs = tmp_path / "fs.tar.zst"
    fs.write_bytes(PAGES)
    path = tmp_path / "ct.dump"
    written = dumpfile.write_dumpfile(path, images, manifest(), compress=True, extra_members={"fs.tar.zst": fs})
    members = written.members
    assert written.compression == "zstd"
    assert members["pages-1.img"].codec == "zstd" and members["pages-1.img"].stored_size < len(PAGES) // 4
    assert members["pages-2.img"].codec == "none", "random pages do not shrink: stored plain"
    assert members["fs.tar.zst"].codec == "none", "already compressed members are stored as they are"
    assert dumpfile.verify(path) == written
    dumpfile.extract(path, tmp_path / "out")
    assert files(tmp_path / "out") == {**files(images), "fs.tar.zst": PAGES}


def test_a_flipped_byte_in_a_compressed_member_is_refused(tmp_path: Path, images: Path) -> None:
    pytest.importorskip("zstandard")
    path = tmp_path / "ct.dump"
    member = dumpfile.write_dumpfile(path, images, manifest(), compress=True).members["pages-1.img"]
    flip(path, member.offset + member.stored_size // 2)
    refused(lambda: dumpfile.verify(path), "dump file is corrupt:")
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), "pages-1.img")
    assert not (tmp_path / "out").exists()


def test_a_compressed_member_longer_than_its_manifest_entry_is_refused(tmp_path: Path, images: Path) -> None:
    pytest.importorskip("zstandard")
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=True)
    rewrite_manifest(path, lambda m: m["members"]["pages-1.img"].update(size=1000))
    refused(lambda: dumpfile.verify(path), "dump file is corrupt: pages-1.img decompresses to more than 1000 bytes")


def test_a_write_error_while_decompressing_is_refused_and_cleaned_up(
    tmp_path: Path, images: Path, monkeypatch: Any
) -> None:
    pytest.importorskip("zstandard")
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=True)

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dumpfile, "_pwrite_all", full)
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), "into " + str(tmp_path / "out") + ": No space left")
    assert not (tmp_path / "out").exists()


# --- atomic writing ---


def test_a_failure_midway_leaves_no_file_and_keeps_the_old_dump(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    path = tmp_path / "ct.dump"
    path.write_bytes(b"the previous dump")
    calls = []
    real = dumpfile._copy_member

    def failing(fd: int, source: Any, pos: int) -> int:
        calls.append(source.name)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, source, pos)

    monkeypatch.setattr(dumpfile, "_copy_member", failing)
    with pytest.raises(ChkpntError, match=re.escape(f"cannot write the dump file {path}: Input/output error")):
        dumpfile.write_dumpfile(path, images, manifest())
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.dump", "images"]
    assert path.read_bytes() == b"the previous dump"


def test_disk_full_while_writing_is_one_line_with_the_fix(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    def full(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dumpfile, "_copy_member", full)
    with pytest.raises(ChkpntError) as info:
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    assert info.value.message.startswith(f"not enough disk space for the dump file in {tmp_path}: 1 MiB needed, ")
    assert "free some space" in info.value.message
    assert list(tmp_path.iterdir()) == [images]


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(dumpfile, "_free_bytes", lambda _: 4096)
    with pytest.raises(ChkpntError, match=r"not enough disk space for the dump file in .*: 1 MiB needed, 0 MiB free"):
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    assert list(tmp_path.iterdir()) == [images]


def test_a_missing_target_directory_is_refused(tmp_path: Path, images: Path) -> None:
    with pytest.raises(ChkpntError, match=r"directory .*/nowhere for the dump file does not exist \(create it"):
        dumpfile.write_dumpfile(tmp_path / "nowhere" / "ct.dump", images, manifest())


def test_a_missing_images_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ChkpntError, match=r"CRIU image directory .* does not exist"):
        dumpfile.write_dumpfile(tmp_path / "ct.dump", tmp_path / "none", manifest())


# --- damaged files ---


@pytest.mark.parametrize("size", [0, 4, 40, HEADER.size - 1])
def test_truncated_in_the_header(dump: Path, size: int) -> None:
    cut(dump, size)
    want = "not a vzpy dump file (the file is empty)" if size == 0 else f"truncated: header has {size} of 72 bytes"
    refused(lambda: dumpfile.read_manifest(dump), want)


def test_truncated_in_the_manifest(dump: Path) -> None:
    length = header(dump)[4]
    cut(dump, MANIFEST_OFFSET + 100)
    refused(lambda: dumpfile.read_manifest(dump), f"dump file is truncated: manifest has 100 of {length} bytes")


def test_truncated_in_a_member(dump: Path) -> None:
    member = dumpfile.read_manifest(dump).members["pages-2.img"]
    cut(dump, member.offset + 1234)
    for action in (dumpfile.read_manifest, dumpfile.verify):
        refused(lambda a=action: a(dump), "dump file is truncated: member pages-2.img has 1234 of 4096 bytes")


@pytest.mark.parametrize("missing", [TRAILER.size, 10, 1])
def test_truncated_in_the_trailer(dump: Path, missing: int) -> None:
    cut(dump, dump.stat().st_size - missing)
    refused(lambda: dumpfile.read_manifest(dump), f"truncated: trailer has {TRAILER.size - missing} of 48 bytes")


def test_a_trailer_that_does_not_match_the_header_is_refused(dump: Path) -> None:
    flip(dump, dump.stat().st_size - 1)
    refused(lambda: dumpfile.read_manifest(dump), "dump file is corrupt: bad trailer")


def test_bytes_after_the_trailer_are_refused(dump: Path) -> None:
    with open(dump, "ab") as f:
        f.write(b"junk")
    refused(lambda: dumpfile.read_manifest(dump), "dump file is corrupt: 4 unexpected bytes after the trailer")


def test_a_flipped_byte_in_a_member_is_refused_by_verify(dump: Path) -> None:
    flip(dump, dumpfile.read_manifest(dump).members["pages-1.img"].offset + 5000)
    dumpfile.read_manifest(dump)  # the header-only read does not look at member data
    refused(lambda: dumpfile.verify(dump), "dump file is corrupt: sha256 mismatch in pages-1.img")


def test_a_flipped_byte_in_the_manifest_makes_it_unreadable(dump: Path) -> None:
    flip(dump, MANIFEST_OFFSET + 30)
    refused(lambda: dumpfile.read_manifest(dump), "manifest unreadable: checksum mismatch")


def test_a_member_name_that_climbs_out_is_refused(dump: Path, tmp_path: Path) -> None:
    rewrite_manifest(dump, lambda m: m["members"].update({"../evil": m["members"].pop("inventory.img")}))
    refused(lambda: dumpfile.extract(dump, tmp_path / "out"), "manifest unreadable: member '../evil'")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()


def test_a_manifest_missing_a_field_is_unreadable(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m.pop("ctid"))
    refused(lambda: dumpfile.read_manifest(dump), "manifest unreadable: missing field ctid")


def test_a_manifest_field_of_the_wrong_type_is_unreadable(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m.update(processes="init"))
    refused(lambda: dumpfile.read_manifest(dump), "manifest unreadable: field processes has the wrong type")


def test_a_manifest_with_a_wrong_size_is_refused_by_verify(dump: Path) -> None:
    def shrink(m: dict[str, Any]) -> None:
        m["members"]["pages-1.img"]["size"] -= 1
        m["members"]["pages-1.img"]["stored_size"] -= 1

    rewrite_manifest(dump, shrink)
    refused(lambda: dumpfile.verify(dump), "dump file is corrupt: sha256 mismatch in pages-1.img")


@pytest.mark.parametrize(
    "content",
    [gzip.compress(b"x" * 1000), os.urandom(5000), b"VZPY", b"\x7fELF\x02\x01\x01" + bytes(100), b"#!/bin/sh\n"],
    ids=["gzip", "random", "magic-prefix", "elf", "script"],
)
def test_foreign_files_are_refused_at_once(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "foreign"
    path.write_bytes(content)
    want = "truncated: header has 4 of 72" if content == b"VZPY" else "not a vzpy dump file (bad magic)"
    for action in (dumpfile.read_manifest, dumpfile.verify):
        refused(lambda a=action: a(path), want)


def test_a_missing_file_or_a_directory_is_a_restore_error(tmp_path: Path) -> None:
    refused(lambda: dumpfile.read_manifest(tmp_path / "none"), "cannot read dump file")
    refused(lambda: dumpfile.read_manifest(tmp_path), "cannot read dump file")


def test_a_newer_format_version_is_refused(dump: Path) -> None:
    fields = list(header(dump))
    fields[1] = FORMAT_VERSION + 1
    with open(dump, "r+b") as f:
        f.write(HEADER.pack(*fields))
    want = f"dump file format version {FORMAT_VERSION + 1} is newer than this vzpy supports ({FORMAT_VERSION})"
    refused(lambda: dumpfile.read_manifest(dump), want)


# --- extract leaves nothing behind ---


def test_extract_of_a_corrupt_last_member_removes_what_it_wrote(dump: Path, tmp_path: Path) -> None:
    members = dumpfile.read_manifest(dump).members
    last = max(members, key=lambda n: members[n].offset)
    flip(dump, members[last].offset + 1)
    refused(lambda: dumpfile.extract(dump, tmp_path / "out"), f"sha256 mismatch in {last}")
    assert not (tmp_path / "out").exists()


def test_extract_into_an_existing_directory_removes_only_its_own_files(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("keep")
    flip(dump, dumpfile.read_manifest(dump).members["pages-1.img"].offset)
    refused(lambda: dumpfile.extract(dump, out), "sha256 mismatch in pages-1.img")
    assert files(out) == {"mine": b"keep"}


def test_extract_never_overwrites(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pages-1.img").write_text("keep")
    refused(lambda: dumpfile.extract(dump, out), "File exists")
    assert files(out) == {"pages-1.img": b"keep"}


def test_extract_of_a_truncated_file_creates_nothing(dump: Path, tmp_path: Path) -> None:
    cut(dump, dump.stat().st_size - 1)
    refused(lambda: dumpfile.extract(dump, tmp_path / "out"), "truncated: trailer has 47 of 48 bytes")
    assert not (tmp_path / "out").exists()


def test_extract_only_an_unknown_member_is_refused(dump: Path, tmp_path: Path) -> None:
    refused(lambda: dumpfile.extract(dump, tmp_path / "out", only=["fs.tar.zst"]), "has no member fs.tar.zst")
    assert not (tmp_path / "out").exists()


# --- describe and CPU ---


def test_describe(tmp_path: Path, images: Path) -> None:
    written = dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest(created_unix=0.0, created="x"))
    lines = dumpfile.describe(written)
    assert lines[0] == "CT 101, dumped 1970-01-01 00:00:00 UTC"
    assert lines[1].startswith("vzpy ") and ", CRIU 4.2.1, kernel " in lines[1]
    assert "processes: 2 (1 init, 42 sshd)" in lines
    assert "memory: 260.0 KiB" in lines
    assert "filesystem: not included" in lines
    assert "members: 5 files, 262.9 KiB" in lines


def test_describe_shortens_long_process_lists() -> None:
    procs = [{"pid": i, "comm": f"p{i}"} for i in range(20)]
    assert "and 12 more)" in dumpfile.describe(manifest(processes=procs))[3]


def test_cpu_compatible_reports_only_missing_user_visible_flags() -> None:
    dumped = {**CPU, "flags": ["fpu", "avx2", "avx512f", "hypervisor", "constant_tsc"]}
    here = {**CPU, "vendor": "AuthenticAMD", "flags": ["fpu", "avx2", "sse4_2"]}
    assert dumpfile.cpu_compatible(dumped, here) == [
        "CPU flag avx512f of the dumping host is missing here",
    ]
    assert dumpfile.cpu_compatible(here, dumped) == ["CPU flag sse4_2 of the dumping host is missing here"]
    assert dumpfile.cpu_compatible(dumped, dumped) == []
    assert dumpfile.cpu_compatible(dumped, {**here, "arch": "aarch64"}) == [
        "the dump was made on x86_64, this host is aarch64"
    ]


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n"
    )
    info = dumpfile.parse_cpuinfo(text)
    assert {k: info[k] for k in ("vendor", "model_name", "family", "model", "flags")} == {
        "vendor": "AuthenticAMD",
        "model_name": "AMD EPYC",
        "family": "25",
        "model": "17",
        "flags": ["avx2", "fpu", "sse2"],
    }
    arm = dumpfile.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\n")
    assert (arm["vendor"], arm["flags"]) == ("0x41", ["aes", "asimd", "fp"])


def test_host_cpu_info_has_flags_here() -> None:
    info = dumpfile.host_cpu_info()
    assert info["arch"] and isinstance(info["flags"], list)
