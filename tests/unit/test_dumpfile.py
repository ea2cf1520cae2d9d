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

import blake3
import pytest

from vzpy import dumpfile
from vzpy.dumpfile import FORMAT_VERSION, HEADER, MANIFEST_OFFSET, TRAILER, Manifest, kio, writer
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
        raw = json.dumps(data, separators=(",", ":")).encode()
        assert len(raw) <= length, "the test's change must not grow the manifest"
        digest = hashlib.sha256(raw).digest()
        f.seek(offset)
        f.write(raw + bytes(length - len(raw)))  # the manifest's old room stays zero-padded
        f.seek(0)
        f.write(HEADER.pack(magic, version, flags, offset, len(raw), trailer_offset, digest))
        f.seek(trailer_offset)
        f.write(TRAILER.pack(dumpfile.TRAILER_MAGIC, trailer_offset, digest))


def resize(m: dict[str, Any], name: str, size: int) -> None:
    """Give a member another original size, and memory_bytes with it (it must add up)."""
    m["memory_bytes"] += size - m["members"][name]["size"]
    m["members"][name]["size"] = size


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
    assert written.digest == "blake3"
    assert written.members["pages-1.img"].digest == blake3.blake3(PAGES).hexdigest()
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


# --- member digests: BLAKE3 in format version 2, sha256 in version 1 ---


def test_the_manifest_names_its_digest_algorithm_and_each_member_its_digest(images: Path, dump: Path) -> None:
    offset, length = header(dump)[3:5]
    data = json.loads(dump.read_bytes()[offset : offset + length])
    assert (data["format_version"], data["digest"]) == (2, "blake3")
    for name, member in data["members"].items():
        assert "sha256" not in member
        assert member["blake3"] == blake3.blake3((images / name).read_bytes()).hexdigest()


def test_an_unknown_digest_algorithm_is_refused(dump: Path) -> None:
    def to_md5(m: dict[str, Any]) -> None:
        m["digest"] = "md5"
        for member in m["members"].values():
            member["md5"] = member.pop("blake3")

    rewrite_manifest(dump, to_md5)
    want = "manifest unreadable: member digest algorithm 'md5' is not one this vzpy knows (sha256, blake3)"
    refused(lambda: dumpfile.read_manifest(dump), want)


def test_a_version_2_manifest_must_name_its_digest_algorithm(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m.pop("digest"))
    refused(lambda: dumpfile.read_manifest(dump), "manifest unreadable: missing field digest")


def as_version_1(path: Path, images: Path) -> None:
    """Rewrite a dump as format version 1 wrote it: no "digest" field, each member's sha256 under "sha256"."""

    def to_version_1(m: dict[str, Any]) -> None:
        m["format_version"] = 1
        del m["digest"]
        for name, member in m["members"].items():
            del member["blake3"]
            member["sha256"] = hashlib.sha256((images / name).read_bytes()).hexdigest()

    rewrite_manifest(path, to_version_1)
    write_header(path, version=1)


@pytest.mark.parametrize("compress", [False, True])
def test_a_version_1_dump_reads_verifies_and_extracts(tmp_path: Path, images: Path, compress: bool) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=compress)
    as_version_1(path, images)
    old = dumpfile.read_manifest(path)
    assert (old.format_version, old.digest) == (1, "sha256")
    assert old.members["pages-1.img"].digest == hashlib.sha256(PAGES).hexdigest()
    assert dumpfile.verify(path) == old
    assert dumpfile.extract(path, tmp_path / "out") == old
    assert files(tmp_path / "out") == files(images)
    late_manifest, late = dumpfile.extract_checking_later(path, tmp_path / "late", lambda n: n.startswith("pages-"))
    late.wait()
    assert late_manifest == old and files(tmp_path / "late") == files(images)


def test_a_corrupt_member_of_a_version_1_dump_is_refused_by_its_sha256(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest())
    as_version_1(path, images)
    flip(path, dumpfile.read_manifest(path).members["pages-1.img"].offset + 5000)
    refused(lambda: dumpfile.verify(path), "dump file is corrupt: sha256 mismatch in pages-1.img")
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), "sha256 mismatch in pages-1.img")
    _, late = dumpfile.extract_checking_later(path, tmp_path / "late", lambda n: n == "pages-1.img")
    refused(late.wait, "sha256 mismatch in pages-1.img")


def test_a_version_1_manifest_needs_no_digest_field_and_its_json_names_sha256(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest())
    as_version_1(path, images)
    data = json.loads(dumpfile.read_manifest(path).to_json())  # what `vzpy dumpinfo --json` prints
    assert data["digest"] == "sha256" and "blake3" not in data["members"]["pages-1.img"]
    assert data["members"]["pages-1.img"]["sha256"] == hashlib.sha256(PAGES).hexdigest()


# --- compression ---


def test_compressed_round_trip(tmp_path: Path, images: Path) -> None:
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
    path = tmp_path / "ct.dump"
    member = dumpfile.write_dumpfile(path, images, manifest(), compress=True).members["pages-1.img"]
    flip(path, member.offset + member.stored_size // 2)
    refused(lambda: dumpfile.verify(path), "dump file is corrupt:")
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), "pages-1.img")
    assert not (tmp_path / "out").exists()


def test_a_compressed_member_longer_than_its_manifest_entry_is_refused(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=True)
    real = len(PAGES)
    rewrite_manifest(path, lambda m: resize(m, "pages-1.img", real - 1))
    want = f"dump file is corrupt: pages-1.img decompresses to more than {real - 1} bytes"
    refused(lambda: dumpfile.verify(path), want)
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), want)
    assert not (tmp_path / "out").exists()


def test_a_compressed_member_shorter_than_its_manifest_entry_is_refused(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=True)
    real = len(PAGES)
    rewrite_manifest(path, lambda m: resize(m, "pages-1.img", real + 1))
    want = f"dump file is corrupt: pages-1.img has {real} bytes, the manifest says {real + 1}"
    refused(lambda: dumpfile.verify(path), want)
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), want)


def test_a_write_error_while_decompressing_is_refused_and_cleaned_up(
    tmp_path: Path, images: Path, monkeypatch: Any
) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, manifest(), compress=True)

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kio, "pwrite_all", full)
    refused(lambda: dumpfile.extract(path, tmp_path / "out"), "into " + str(tmp_path / "out") + ": No space left")
    assert not (tmp_path / "out").exists()


# --- atomic writing ---


def test_a_failure_midway_leaves_no_file_and_keeps_the_old_dump(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    path = tmp_path / "ct.dump"
    path.write_bytes(b"the previous dump")
    calls = []
    real = writer._copy_member

    def failing(fd: int, source: Any, pos: int) -> int:
        calls.append(source.name)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, source, pos)

    monkeypatch.setattr(writer, "_copy_member", failing)
    with pytest.raises(ChkpntError, match=re.escape(f"cannot write the dump file {path}: Input/output error")):
        dumpfile.write_dumpfile(path, images, manifest())
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.dump", "images"]
    assert path.read_bytes() == b"the previous dump"


def test_disk_full_while_writing_is_one_line_with_the_fix(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    def full(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_copy_member", full)
    with pytest.raises(ChkpntError) as info:
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    assert info.value.message.startswith(f"not enough disk space for the dump file in {tmp_path}: 1 MiB needed, ")
    assert "free some space" in info.value.message
    assert list(tmp_path.iterdir()) == [images]


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(writer, "_free_bytes", lambda _: 4096)
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
    refused(lambda: dumpfile.verify(dump), "dump file is corrupt: blake3 mismatch in pages-1.img")


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


def test_a_manifest_with_a_wrong_size_is_refused(dump: Path) -> None:
    def shrink(m: dict[str, Any]) -> None:
        resize(m, "pages-1.img", len(PAGES) - 1)
        m["members"]["pages-1.img"]["stored_size"] -= 1

    offset = dumpfile.read_manifest(dump).members["pages-1.img"].offset
    rewrite_manifest(dump, shrink)
    # the member's last byte now sits where padding belongs, and padding must be zero
    want = f"dump file is corrupt: padding at offset {offset + len(PAGES) - 1} is not zero"
    refused(lambda: dumpfile.read_manifest(dump), want)


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
    refused(lambda: dumpfile.extract(dump, tmp_path / "out"), f"blake3 mismatch in {last}")
    assert not (tmp_path / "out").exists()


def test_extract_into_an_existing_directory_removes_only_its_own_files(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("keep")
    flip(dump, dumpfile.read_manifest(dump).members["pages-1.img"].offset)
    refused(lambda: dumpfile.extract(dump, out), "blake3 mismatch in pages-1.img")
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


# --- every byte is checked ---


@pytest.fixture
def small_images(tmp_path: Path) -> Path:
    """Tiny members, so that most of the file is header, manifest and padding: the parts read_manifest checks."""
    d = tmp_path / "small"
    d.mkdir()
    (d / "core-1.img").write_bytes(os.urandom(300))
    (d / "empty.img").write_bytes(b"")
    (d / "inventory.img").write_bytes(b"inventory")
    (d / "pages-1.img").write_bytes(b"page" * 1000)
    return d


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_a_flipped_byte_anywhere_in_a_dump_file_is_refused(tmp_path: Path, small_images: Path, compress: bool) -> None:
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, small_images, manifest(), compress=compress)
    pristine = path.read_bytes()
    written = dumpfile.verify(path)
    accepted = []
    for offset in sorted(_offsets_to_flip(written, len(pristine))):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0x01
        path.write_bytes(damaged)
        try:
            dumpfile.verify(path)
        except RestoreError:
            continue
        accepted.append(offset)
    assert accepted == []


def _offsets_to_flip(written: Manifest, size: int) -> set[int]:
    """Every byte of the header, the members and the trailer, and the first, last and every 61st byte of
    the manifest and of the padding: each is checked by a different rule (padding all by the same one)."""
    header_length, trailer = HEADER.size, size - TRAILER.size
    offsets = set(range(header_length)) | set(range(trailer, size)) | set(range(0, size, 61))
    for member in written.members.values():
        offsets |= set(range(member.offset, member.offset + member.stored_size))
        offsets |= {member.offset - 1, member.offset + member.stored_size}
    return offsets | {header_length, MANIFEST_OFFSET - 1, MANIFEST_OFFSET, trailer - 1}


def write_header(path: Path, **changes: int) -> None:
    names = ("magic", "version", "flags", "manifest_offset", "manifest_length", "trailer_offset", "sha256")
    values = dict(zip(names, header(path), strict=True))
    values.update(changes)
    with open(path, "r+b") as f:
        f.write(HEADER.pack(*values.values()))


@pytest.mark.parametrize("flags", [1, 0x80000000])
def test_reserved_header_flags_are_refused(dump: Path, flags: int) -> None:
    write_header(dump, flags=flags)
    refused(lambda: dumpfile.read_manifest(dump), f"dump file is corrupt: bad header: reserved flags {flags:#x}")


def test_format_version_0_is_refused(dump: Path) -> None:
    write_header(dump, version=0)
    refused(lambda: dumpfile.read_manifest(dump), "dump file is corrupt: bad header: format version 0")


@pytest.mark.parametrize("offset", [0, HEADER.size, MANIFEST_OFFSET - 1, MANIFEST_OFFSET + 1, 2 * MANIFEST_OFFSET])
def test_a_manifest_anywhere_but_at_4096_is_refused(dump: Path, offset: int) -> None:
    write_header(dump, manifest_offset=offset)
    refused(lambda: dumpfile.read_manifest(dump), f"bad header: manifest offset {offset}, not 4096")


@pytest.mark.parametrize("length", [0, dumpfile.format.MAX_MANIFEST + 1])
def test_a_manifest_length_out_of_bounds_is_refused(dump: Path, length: int) -> None:
    write_header(dump, manifest_length=length)
    refused(lambda: dumpfile.read_manifest(dump), f"bad header: manifest length {length}")


def test_the_largest_manifest_length_is_not_a_bad_header(dump: Path) -> None:
    length = dumpfile.format.MAX_MANIFEST
    write_header(dump, manifest_length=length, trailer_offset=MANIFEST_OFFSET + length)
    refused(lambda: dumpfile.read_manifest(dump), "dump file is truncated: manifest has")


def test_a_trailer_offset_inside_the_manifest_is_refused(dump: Path) -> None:
    length = header(dump)[4]
    write_header(dump, trailer_offset=MANIFEST_OFFSET + length - 1)
    refused(lambda: dumpfile.read_manifest(dump), "bad header: the trailer offset is inside the manifest")


def test_a_trailer_offset_right_after_the_manifest_passes_the_header_check(dump: Path) -> None:
    length = header(dump)[4]
    write_header(dump, trailer_offset=MANIFEST_OFFSET + length)
    refused(lambda: dumpfile.read_manifest(dump), "overlaps another part of the file")


@pytest.mark.parametrize("where", [HEADER.size, 1000, MANIFEST_OFFSET - 1])
def test_a_byte_in_the_header_padding_is_refused(dump: Path, where: int) -> None:
    flip(dump, where)
    refused(lambda: dumpfile.read_manifest(dump), f"dump file is corrupt: the header's padding at offset {where}")


def test_a_byte_after_the_manifest_is_refused(dump: Path) -> None:
    end = MANIFEST_OFFSET + header(dump)[4]
    flip(dump, end)
    refused(lambda: dumpfile.read_manifest(dump), f"dump file is corrupt: padding at offset {end} is not zero")


def test_a_byte_between_members_is_refused(dump: Path) -> None:
    member = dumpfile.read_manifest(dump).members["core-1.img"]
    gap = member.offset + member.stored_size
    for where in (gap, member.offset + 4095):
        flip(dump, where)
        refused(lambda: dumpfile.read_manifest(dump), f"padding at offset {where} is not zero")
        flip(dump, where)
    dumpfile.verify(dump)


def test_a_file_cut_in_the_header_page_is_truncated(dump: Path) -> None:
    cut(dump, 1000)
    refused(lambda: dumpfile.read_manifest(dump), "dump file is truncated: header page has 1000 of 4096 bytes")


# --- the layout: members in order, aligned, inside the file ---


def members_by_offset(path: Path) -> list[str]:
    members = dumpfile.read_manifest(path).members
    return sorted(members, key=lambda n: (members[n].offset, members[n].stored_size))


def test_overlapping_members_are_refused(dump: Path) -> None:
    first, second = [n for n in members_by_offset(dump) if dumpfile.read_manifest(dump).members[n].size][:2]
    offset = dumpfile.read_manifest(dump).members[first].offset
    rewrite_manifest(dump, lambda m: m["members"][second].update(offset=offset))
    refused(lambda: dumpfile.read_manifest(dump), "overlaps another part of the file")


def test_a_member_reaching_into_the_trailer_is_refused(dump: Path) -> None:
    last = members_by_offset(dump)[-1]
    trailer_offset = header(dump)[5]
    rewrite_manifest(dump, lambda m: m["members"][last].update(offset=m["members"][last]["offset"] + 4096))
    refused(lambda: dumpfile.read_manifest(dump), f"member {last} overlaps another part of the file")
    assert trailer_offset == header(dump)[5]


def test_a_member_one_page_later_than_packed_is_refused(dump: Path) -> None:
    names = members_by_offset(dump)
    last = names[-1]

    def later(m: dict[str, Any]) -> None:
        m["members"][last]["offset"] += 4096

    rewrite_manifest(dump, later)
    with open(dump, "r+b") as f:  # move the trailer along, so that only the gap is wrong
        old = header(dump)[5]
        f.seek(old)
        tail = f.read()
        f.seek(old)
        f.write(bytes(4096) + tail.replace(old.to_bytes(8, "little"), (old + 4096).to_bytes(8, "little"), 1))
    write_header(dump, trailer_offset=old + 4096)
    refused(lambda: dumpfile.read_manifest(dump), f"member {last} does not start at the first aligned offset")


def test_a_gap_before_the_trailer_is_refused(dump: Path) -> None:
    old = header(dump)[5]
    with open(dump, "r+b") as f:
        f.seek(old)
        tail = f.read()
        f.seek(old)
        f.write(bytes(1) + tail.replace(old.to_bytes(8, "little"), (old + 1).to_bytes(8, "little"), 1))
    write_header(dump, trailer_offset=old + 1)
    refused(lambda: dumpfile.read_manifest(dump), "dump file is corrupt: the trailer does not follow the last member")


def test_a_dump_without_members_round_trips(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    path = tmp_path / "ct.dump"
    written = dumpfile.write_dumpfile(path, tmp_path / "none", manifest())
    assert dumpfile.verify(path) == written and written.members == {}
    cut(path, header(path)[5] - 1)
    refused(lambda: dumpfile.read_manifest(path), "dump file is truncated: trailer has 0 of 48 bytes")


# --- every member field ---


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": -1}, "bad size, offset or blake3"),
        ({"size": True}, "bad size, offset or blake3"),
        ({"size": 9.0}, "bad size, offset or blake3"),
        ({"offset": "4096"}, "bad size, offset or blake3"),
        ({"stored_size": -9}, "bad size, offset or blake3"),
        ({"blake3": "A" * 64}, "bad size, offset or blake3"),
        ({"blake3": "0" * 63}, "bad size, offset or blake3"),
        ({"blake3": "0" * 64 + "\n"}, "bad size, offset or blake3"),
        ({"offset": 4097}, "offset 4097 is not a multiple of 4096"),
        ({"codec": "gzip"}, "bad codec 'gzip'"),
        ({"stored_size": 8}, "bad codec 'none' for its sizes"),
        ({"codec": "zstd"}, "bad codec 'zstd' for its sizes"),
        ({"codec": "zstd", "stored_size": 0}, "bad codec 'zstd' for its sizes"),
    ],
)
def test_every_member_field_is_checked(dump: Path, change: dict[str, Any], message: str) -> None:
    rewrite_manifest(dump, lambda m: m["members"]["inventory.img"].update(change))
    refused(lambda: dumpfile.read_manifest(dump), f"manifest unreadable: member inventory.img: {message}")


def test_a_compressed_member_in_a_plain_dump_is_unreadable(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m["members"]["inventory.img"].update(codec="zstd", stored_size=8))
    refused(lambda: dumpfile.read_manifest(dump), "a member is compressed but the dump's compression is none")


@pytest.mark.parametrize("field", ["size", "blake3", "offset", "stored_size", "codec"])
def test_a_member_missing_a_field_is_unreadable(dump: Path, field: str) -> None:
    rewrite_manifest(dump, lambda m: m["members"]["inventory.img"].pop(field))
    refused(lambda: dumpfile.read_manifest(dump), f"member inventory.img: missing field {field}")


def test_unknown_member_fields_are_ignored(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m["members"]["inventory.img"].update(mode=0o600))
    dumpfile.verify(dump)


def test_a_zstd_member_one_byte_smaller_than_its_original_is_accepted_by_the_format() -> None:
    member = {"size": 9, "blake3": "0" * 64, "offset": 8192, "stored_size": 8, "codec": "zstd"}
    text = manifest(compression="zstd", members={}).to_json()
    data = json.loads(text)
    data["members"] = {"inventory.img": member}
    assert Manifest.from_json(json.dumps(data)).members["inventory.img"].stored_size == 8
    data["members"]["inventory.img"]["stored_size"] = 9
    with pytest.raises(ValueError, match="bad codec 'zstd' for its sizes"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize("name", ["in\nventory.img", "inventory.img\n", "a/b", ".", "..", "x" * 256, ""])
def test_member_names_are_plain_file_names(dump: Path, name: str) -> None:
    rewrite_manifest(dump, lambda m: m["members"].update({name: m["members"].pop("inventory.img")}))
    refused(lambda: dumpfile.read_manifest(dump), "not a plain file name")


def test_a_member_name_of_255_characters_is_allowed() -> None:
    assert dumpfile.format.name_problem("x" * 255) is None
    assert dumpfile.format.name_problem("x" * 256) is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"members": {"inventory.img": [1, 2]}}, "member inventory.img: not an object"),
        ({"memory_bytes": 1}, "memory_bytes is not the size of the pages-*.img members"),
        ({"compression": "lz4"}, "compression 'lz4' is neither none nor zstd"),
        ({"format_version": True}, "field format_version has the wrong type"),
        ({"created_unix": "now"}, "field created_unix has the wrong type"),
        ({"with_fs": 1}, "field with_fs has the wrong type"),
        ({"format": "other"}, "format is 'other', not 'vzpy-dump'"),
    ],
)
def test_manifest_totals_and_types_are_checked(dump: Path, change: dict[str, Any], message: str) -> None:
    rewrite_manifest(dump, lambda m: m.update(change))
    refused(lambda: dumpfile.read_manifest(dump), f"manifest unreadable: {message}")


def test_a_manifest_that_is_not_an_object_is_unreadable() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        Manifest.from_json("[]")


def test_a_manifest_without_extra_is_readable(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m.pop("extra"))
    assert dumpfile.read_manifest(dump).extra == {}


def test_a_format_version_that_differs_from_the_header_is_unreadable(dump: Path) -> None:
    write_header(dump, version=FORMAT_VERSION)
    rewrite_manifest(dump, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    refused(lambda: dumpfile.read_manifest(dump), "its format_version differs from the header's")


def test_describe_survives_a_process_list_of_non_objects() -> None:
    assert dumpfile.describe(manifest(processes=[1, "x"]))[3] == "processes: 2 (? ?, ? ?)"


# --- a source that changes while it is packed ---


@pytest.mark.parametrize("new_size", [100, len(PAGES) - 1])
def test_a_source_that_shrinks_while_it_is_copied_is_refused(
    tmp_path: Path, images: Path, monkeypatch: Any, new_size: int
) -> None:
    real_collect = writer._collect_sources

    def collect_then_shrink(*args: Any) -> Any:
        sources = real_collect(*args)
        os.truncate(images / "pages-1.img", new_size)
        return sources

    monkeypatch.setattr(writer, "_collect_sources", collect_then_shrink)
    monkeypatch.setattr(kio, "hash_file", lambda path, algorithm: (len(PAGES), "0" * 64))  # the hasher saw it whole
    with pytest.raises(ChkpntError, match=r"pages-1\.img shrank while it was being packed"):
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    assert not (tmp_path / "ct.dump").exists()


def test_a_source_the_hasher_sees_at_another_size_is_refused(tmp_path: Path, images: Path, monkeypatch: Any) -> None:
    real_hash = kio.hash_file
    monkeypatch.setattr(
        kio, "hash_file", lambda path, algorithm: (real_hash(path, algorithm)[0] + 1, real_hash(path, algorithm)[1])
    )
    with pytest.raises(ChkpntError, match="changed size while it was being packed"):
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest())
    assert not (tmp_path / "ct.dump").exists()


@pytest.mark.parametrize("new_size", [100, len(PAGES) + 100])
def test_a_source_that_changes_size_while_it_is_compressed_is_refused(
    tmp_path: Path, images: Path, monkeypatch: Any, new_size: int
) -> None:
    real_collect = writer._collect_sources

    def collect_then_resize(*args: Any) -> Any:
        sources = real_collect(*args)
        os.truncate(images / "pages-1.img", new_size)
        return sources

    monkeypatch.setattr(writer, "_collect_sources", collect_then_resize)
    with pytest.raises(ChkpntError, match=r"pages-1\.img changed while it was being packed"):
        dumpfile.write_dumpfile(tmp_path / "ct.dump", images, manifest(), compress=True)


def test_an_incompressible_member_leaves_zero_padding(tmp_path: Path, small_images: Path) -> None:
    path = tmp_path / "ct.dump"
    written = dumpfile.write_dumpfile(path, small_images, manifest(), compress=True)
    core = written.members["core-1.img"]
    assert core.codec == "none"  # random bytes: the zstd attempt was longer and was replaced
    data = path.read_bytes()
    assert data[core.offset + core.size : core.offset + 4096] == bytes(4096 - core.size)
    dumpfile.verify(path)


def test_a_member_one_byte_short_is_truncated(dump: Path) -> None:
    last = members_by_offset(dump)[-1]
    member = dumpfile.read_manifest(dump).members[last]
    cut(dump, member.offset + member.stored_size - 1)
    want = f"dump file is truncated: member {last} has {member.stored_size - 1} of {member.stored_size} bytes"
    refused(lambda: dumpfile.read_manifest(dump), want)


def test_one_byte_after_the_trailer_is_refused(dump: Path) -> None:
    with open(dump, "ab") as f:
        f.write(b"\0")
    refused(lambda: dumpfile.read_manifest(dump), "dump file is corrupt: 1 unexpected bytes after the trailer")


def test_a_byte_before_the_trailer_of_a_dump_without_members_is_refused(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, tmp_path / "none", manifest())
    where = header(path)[5] - 1
    flip(path, where)
    refused(lambda: dumpfile.read_manifest(path), f"padding at offset {where} is not zero")


def compressed_dump(tmp_path: Path, images: Path) -> tuple[Path, Any]:
    path = tmp_path / "ct.dump"
    member = dumpfile.write_dumpfile(path, images, manifest(), compress=True).members["pages-1.img"]
    assert member.codec == "zstd" and (member.offset + member.stored_size) % 4096
    return path, member


def test_bytes_after_the_zstd_frame_are_refused(tmp_path: Path, images: Path) -> None:
    path, _ = compressed_dump(tmp_path, images)
    rewrite_manifest(
        path, lambda m: m["members"]["pages-1.img"].update(stored_size=m["members"]["pages-1.img"]["stored_size"] + 1)
    )
    refused(lambda: dumpfile.verify(path), "dump file is corrupt: pages-1.img is not one complete zstd frame")


def test_a_zstd_frame_with_a_reserved_bit_is_refused(tmp_path: Path, images: Path) -> None:
    path, member = compressed_dump(tmp_path, images)
    with open(path, "r+b") as f:
        f.seek(member.offset + 4)
        descriptor = f.read(1)[0]
        f.seek(member.offset + 4)
        f.write(bytes([descriptor | 0x08]))
    refused(lambda: dumpfile.verify(path), "dump file is corrupt: pages-1.img is not a zstd frame")


def test_a_member_with_an_unknown_codec_is_unreadable_whatever_its_sizes(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m["members"]["inventory.img"].update(codec="gzip", stored_size=8))
    refused(lambda: dumpfile.read_manifest(dump), "member inventory.img: bad codec 'gzip'")


def test_an_extra_member_that_is_not_a_regular_file_is_refused(tmp_path: Path, images: Path) -> None:
    with pytest.raises(ChkpntError, match="not a regular file"):
        dumpfile.write_dumpfile(tmp_path / "d", images, manifest(), extra_members={"fs.tar.zst": tmp_path})


def test_a_dump_file_path_that_is_a_directory_is_refused(tmp_path: Path, images: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(ChkpntError, match=r"is a directory \(give --dumpfile a file name\)"):
        dumpfile.write_dumpfile(tmp_path / "d", images, manifest())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"created_unix": -1}, "created_unix -1 is not a time"),
        ({"created_unix": 253402300800}, "created_unix 253402300800 is not a time"),
        ({"cpu": {"flags": 3}}, "cpu flags are not a list of strings"),
        ({"cpu": {"flags": ["sse2", 1]}}, "cpu flags are not a list of strings"),
        ({"cpu": {"arch": 64}}, "a cpu field is not a string"),
        ({"cpu": {"model": None}}, "a cpu field is not a string"),
    ],
)
def test_fields_that_dumpinfo_and_restore_use_are_checked(dump: Path, change: dict[str, Any], message: str) -> None:
    rewrite_manifest(dump, lambda m: m.update(change))
    refused(lambda: dumpfile.read_manifest(dump), f"manifest unreadable: {message}")


def test_the_edges_of_those_fields_are_accepted(dump: Path) -> None:
    rewrite_manifest(dump, lambda m: m.update(created_unix=253402300799, cpu={}))
    manifest = dumpfile.read_manifest(dump)
    assert "dumped 9999-12-31 23:59:59 UTC" in dumpfile.describe(manifest)[0]
    rewrite_manifest(dump, lambda m: m.update(created_unix=0))
    assert "dumped 1970-01-01 00:00:00 UTC" in dumpfile.describe(dumpfile.read_manifest(dump))[0]


def test_an_infinite_created_unix_is_refused(dump: Path) -> None:
    def infinite(m: dict[str, Any]) -> None:
        m["created_unix"] = float("inf")  # json.dumps writes Infinity, which json.loads reads back

    rewrite_manifest(dump, infinite)
    refused(lambda: dumpfile.read_manifest(dump), "created_unix inf is not a time")
