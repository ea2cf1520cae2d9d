"""The dump file reader's checks, on dump files built byte by byte here: every refusal names the file first,
the header's bounds at their edges, where an extract may not go, and the zstd frame walk over every frame
header form RFC 8878 allows (content size of 0/1/2/4/8 bytes, a window byte, a dictionary id of 1/2/4 bytes,
a content checksum, raw and RLE blocks) as well as the frames it must refuse."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
import zstandard

from vzpy.dumpfile import reader
from vzpy.dumpfile.format import (
    ALIGN,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MANIFEST_OFFSET,
    TRAILER,
    TRAILER_MAGIC,
    Manifest,
    Member,
    memory_bytes,
    round_up,
)
from vzpy.errors import RestoreError

CPU = {"arch": "x86_64", "vendor": "GenuineIntel", "model_name": "Xeon", "family": "6", "model": "85", "flags": []}
ROOM = 4 * ALIGN  # the manifest's room: members start after it
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# name -> (original bytes, stored bytes, codec)
Members = dict[str, tuple[bytes, bytes, str]]


def build_dump(
    path: Path,
    members: Members,
    *,
    header_fields: dict[str, int] | None = None,
    room: int = ROOM,
    offsets: dict[str, int] | None = None,
    trailer_gap: int = 0,
) -> Path:
    """A dump file laid out as docs/dumpfile.md says, from the given stored bytes, unless told otherwise:
    `offsets` places members elsewhere, `trailer_gap` leaves zeros between the last member and the trailer."""
    placed: dict[str, Member] = {}
    pos = MANIFEST_OFFSET + room
    for name, (original, stored, codec) in members.items():
        pos = (offsets or {}).get(name, round_up(pos, ALIGN))
        digest = blake3.blake3(original).hexdigest()
        placed[name] = Member(size=len(original), digest=digest, offset=pos, stored_size=len(stored), codec=codec)
        pos += len(stored)
    pos += trailer_gap
    compressed = any(codec == "zstd" for _, _, codec in members.values())
    manifest = Manifest(ctid="101", criu_version="4.2.1", ct_config="", cpu=CPU, members=placed)
    manifest.compression = "zstd" if compressed else "none"
    manifest.memory_bytes = memory_bytes({name: m.size for name, m in placed.items()})
    raw = manifest.to_json().encode()
    assert len(raw) <= room
    digest = hashlib.sha256(raw).digest()
    fields = {"version": FORMAT_VERSION, "flags": 0, "offset": MANIFEST_OFFSET, "length": len(raw), "trailer": pos}
    fields.update(header_fields or {})
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, *(fields[k] for k in ("version", "flags", "offset", "length", "trailer")), digest))
        f.seek(MANIFEST_OFFSET)
        f.write(raw)
        for name, (_, stored, _) in members.items():
            f.seek(placed[name].offset)
            f.write(stored)
        f.seek(pos)
        f.write(TRAILER.pack(TRAILER_MAGIC, pos, digest))
    return path


def plain(data: bytes) -> tuple[bytes, bytes, str]:
    return data, data, "none"


PLAIN: Members = {"core-1.img": plain(os.urandom(3000)), "pages-1.img": plain(bytes(range(256)) * 40)}


def refusal(action: Callable[[], object]) -> str:
    with pytest.raises(RestoreError) as info:
        action()
    return info.value.message


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- every refusal names the file -----------------------------------------------------------------------------

DAMAGES = (
    "cut in the header",
    "cut after the header",
    "cut in the manifest",
    "cut in a member",
    "cut at the trailer",
    "cut in the trailer",
    "a newer version",
    "version 0",
    "reserved flags",
    "manifest offset",
    "manifest length 0",
    "trailer offset in the manifest",
    "header padding",
    "manifest byte",
    "manifest room",
    "member padding",
    "member byte",
    "trailer",
    "bytes after the trailer",
)


def damages(dump: Path) -> dict[str, Callable[[], None]]:
    manifest = reader.read_manifest(dump)
    core, pages = manifest.members["core-1.img"], manifest.members["pages-1.img"]
    trailer = pages.offset + pages.stored_size
    found = {
        "cut in the header": lambda: os.truncate(dump, 10),
        "cut after the header": lambda: os.truncate(dump, HEADER.size),
        "cut in the manifest": lambda: os.truncate(dump, MANIFEST_OFFSET + 10),
        "cut in a member": lambda: os.truncate(dump, core.offset + 10),
        "cut at the trailer": lambda: os.truncate(dump, trailer),
        "cut in the trailer": lambda: os.truncate(dump, trailer + 10),
        "a newer version": lambda: poke(dump, 8, (FORMAT_VERSION + 1).to_bytes(4, "little")),
        "version 0": lambda: poke(dump, 8, bytes(4)),
        "reserved flags": lambda: poke(dump, 12, b"\x01"),
        "manifest offset": lambda: poke(dump, 16, (2 * ALIGN).to_bytes(8, "little")),
        "manifest length 0": lambda: poke(dump, 24, bytes(8)),
        "trailer offset in the manifest": lambda: poke(dump, 32, MANIFEST_OFFSET.to_bytes(8, "little")),
        "header padding": lambda: poke(dump, HEADER.size + 3, b"\x01"),
        "manifest byte": lambda: poke(dump, MANIFEST_OFFSET + 5, b"!"),
        "manifest room": lambda: poke(dump, MANIFEST_OFFSET + ROOM - 1, b"\x01"),
        "member padding": lambda: poke(dump, core.offset + core.stored_size + 1, b"\x01"),
        "member byte": lambda: poke(dump, pages.offset + 7, b"\xff"),
        "trailer": lambda: poke(dump, trailer, b"X"),
        "bytes after the trailer": lambda: poke(dump, trailer + TRAILER.size, b"junk"),
    }
    assert set(found) == set(DAMAGES)
    return found


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_refusal_names_the_dump_file_first(tmp_path: Path, damage: str) -> None:
    dump = build_dump(tmp_path / "Dump.101", PLAIN)
    reader.verify(dump)
    damages(dump)[damage]()
    assert refusal(lambda: reader.verify(dump)).startswith(f"{dump}: ")


# --- the header's bounds at their edges ---------------------------------------------------------------------


def test_a_file_of_just_a_header_is_truncated_in_the_header_page(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    os.truncate(dump, HEADER.size)
    message = refusal(lambda: reader.read_manifest(dump))
    assert message == f"{dump}: dump file is truncated: header page has {HEADER.size} of {ALIGN} bytes"


def test_a_file_cut_right_after_the_manifest_is_truncated_in_its_first_member(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    length = HEADER.unpack(dump.read_bytes()[: HEADER.size])[4]
    os.truncate(dump, MANIFEST_OFFSET + length)
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is truncated: member core-1.img has 0 of 3000 bytes"
    )


def test_a_manifest_length_of_one_byte_is_within_bounds_and_fails_its_checksum(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN, header_fields={"length": 1})
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: manifest unreadable: checksum mismatch (the dump file is corrupt)"
    )


def test_a_trailer_offset_inside_the_manifest_is_refused_saying_so(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN, header_fields={"trailer": MANIFEST_OFFSET + 1})
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: bad header: the trailer offset is inside the manifest"
    )


# --- where an extract may go --------------------------------------------------------------------------------


def test_extract_into_a_file_is_refused(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    target = tmp_path / "a-file"
    target.write_text("")
    assert refusal(lambda: reader.extract(dump, target)) == f"cannot extract into {target}: not a directory"


def test_extract_under_a_missing_directory_is_refused_with_the_reason(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    target = tmp_path / "missing" / "images"
    message = refusal(lambda: reader.extract(dump, target))
    assert message.startswith(f"cannot extract into {target}: ")
    assert "No such file or directory" in message


# --- zstd frames ----------------------------------------------------------------------------------------------


def zstd_frame(
    blocks: list[tuple[str, bytes]],
    *,
    content_size: int,
    fcs_flag: int = 0,
    single_segment: bool = True,
    dict_id_bytes: int = 0,
    last: bool = True,
) -> bytes:
    """A zstd frame (RFC 8878) of raw ("raw", data) and RLE ("rle", byte * n) blocks, without a checksum."""
    dict_flag = {0: 0, 1: 1, 2: 2, 4: 3}[dict_id_bytes]
    frame = ZSTD_MAGIC + bytes([fcs_flag << 6 | int(single_segment) << 5 | dict_flag])
    if not single_segment:
        frame += bytes([0])  # window descriptor: 1 KiB
    frame += bytes(dict_id_bytes)  # dictionary id 0: none
    if fcs_flag == 0:
        frame += bytes([content_size]) if single_segment else b""
    elif fcs_flag == 1:
        frame += (content_size - 256).to_bytes(2, "little")
    else:
        frame += content_size.to_bytes({2: 4, 3: 8}[fcs_flag], "little")
    for index, (kind, data) in enumerate(blocks):
        is_last = last and index == len(blocks) - 1
        if kind == "raw":
            frame += (int(is_last) | 0 << 1 | len(data) << 3).to_bytes(3, "little") + data
        else:
            frame += (int(is_last) | 1 << 1 | len(data) << 3).to_bytes(3, "little") + data[:1]
    return frame


def zstd_dump(tmp_path: Path, original: bytes, frame: bytes) -> Path:
    return build_dump(tmp_path / "zstd.dump", {**PLAIN, "pages-2.img": (original, frame, "zstd")})


CONTENT = b"head" + b"a" * 600


@pytest.mark.parametrize(
    "form",
    [
        {"fcs_flag": 1},
        {"fcs_flag": 2},
        {"fcs_flag": 3},
        {"fcs_flag": 0, "single_segment": False},
        {"fcs_flag": 2, "single_segment": False},
        {"fcs_flag": 1, "dict_id_bytes": 1},
        {"fcs_flag": 1, "dict_id_bytes": 2},
        {"fcs_flag": 1, "dict_id_bytes": 4},
        {"fcs_flag": 0, "single_segment": False, "dict_id_bytes": 4},
    ],
)
def test_every_frame_header_form_with_raw_and_rle_blocks_is_read(tmp_path: Path, form: dict[str, int]) -> None:
    frame = zstd_frame([("raw", b"head"), ("rle", b"a" * 600)], content_size=len(CONTENT), **form)
    dump = zstd_dump(tmp_path, CONTENT, frame)
    reader.verify(dump)
    out = tmp_path / "out"
    reader.extract(dump, out)
    assert (out / "pages-2.img").read_bytes() == CONTENT


def test_a_one_byte_content_size_and_a_lone_rle_block_are_read(tmp_path: Path) -> None:
    content = b"z" * 200
    dump = zstd_dump(tmp_path, content, zstd_frame([("rle", content)], content_size=200))
    reader.verify(dump)


def test_a_frame_with_a_content_checksum_is_read(tmp_path: Path) -> None:
    content = bytes(range(256)) * 64
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(content)
    assert frame[4] & 0x04, "the frame carries a checksum"
    reader.verify(zstd_dump(tmp_path, content, frame))


def test_a_member_that_is_not_a_zstd_frame_is_refused_saying_so(tmp_path: Path) -> None:
    dump = zstd_dump(tmp_path, CONTENT, b"\x00" * 40)
    assert refusal(lambda: reader.verify(dump)) == f"{dump}: dump file is corrupt: pages-2.img is not a zstd frame"


def test_a_frame_with_the_reserved_bit_is_refused(tmp_path: Path) -> None:
    frame = bytearray(zstd_frame([("raw", b"head"), ("rle", b"a" * 600)], content_size=len(CONTENT), fcs_flag=1))
    frame[4] |= 0x08
    dump = zstd_dump(tmp_path, CONTENT, bytes(frame))
    assert refusal(lambda: reader.verify(dump)) == f"{dump}: dump file is corrupt: pages-2.img is not a zstd frame"


@pytest.mark.parametrize("trouble", ["no last block", "bytes after the frame"])
def test_an_incomplete_frame_or_one_with_bytes_after_it_is_refused(tmp_path: Path, trouble: str) -> None:
    blocks = [("raw", b"head"), ("rle", b"a" * 600)]
    if trouble == "no last block":
        frame = zstd_frame(blocks, content_size=len(CONTENT), fcs_flag=1, last=False)
    else:
        frame = zstd_frame(blocks, content_size=len(CONTENT), fcs_flag=1) + b"\x00\x00"
    dump = zstd_dump(tmp_path, CONTENT, frame)
    assert refusal(lambda: reader.verify(dump)) == (
        f"{dump}: dump file is corrupt: pages-2.img is not one complete zstd frame"
    )


# --- the layout, in messages that name the file ----------------------------------------------------------------


def test_members_that_overlap_are_refused(tmp_path: Path) -> None:
    start = MANIFEST_OFFSET + ROOM
    dump = build_dump(tmp_path / "d", PLAIN, offsets={"core-1.img": start, "pages-1.img": start})
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: member pages-1.img overlaps another part of the file"
    )


def test_a_member_after_a_needless_gap_is_refused(tmp_path: Path) -> None:
    start = MANIFEST_OFFSET + ROOM
    dump = build_dump(tmp_path / "d", PLAIN, offsets={"core-1.img": start, "pages-1.img": start + 2 * ALIGN})
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: member pages-1.img does not start at the first aligned offset after the one "
        "before"
    )


def test_a_trailer_apart_from_the_last_member_is_refused(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN, trailer_gap=8)
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: the trailer does not follow the last member"
    )


def test_a_dump_without_members_is_read_and_its_padding_and_trailer_checked(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", {})
    assert reader.verify(dump).members == {}
    poke(dump, MANIFEST_OFFSET + ROOM - 2, b"\x01")
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: padding at offset {MANIFEST_OFFSET + ROOM - 2} is not zero"
    )
    os.truncate(build_dump(tmp_path / "d", {}), MANIFEST_OFFSET + ROOM - 10)
    assert refusal(lambda: reader.read_manifest(dump)) == f"{dump}: dump file is truncated: trailer has 0 of 48 bytes"


def test_a_stray_byte_deep_in_a_long_padding_is_found_at_its_offset(tmp_path: Path) -> None:
    room = 3 << 20  # the padding is read a chunk at a time: the byte is in its second chunk
    dump = build_dump(tmp_path / "d", PLAIN, room=room)
    reader.read_manifest(dump)
    where = MANIFEST_OFFSET + room - ALIGN
    poke(dump, where, b"\x01")
    assert refusal(lambda: reader.read_manifest(dump)) == (
        f"{dump}: dump file is corrupt: padding at offset {where} is not zero"
    )


# --- extract's refusals name the file too ---------------------------------------------------------------------


def test_extract_of_a_damaged_plain_member_names_the_file_and_the_member(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    poke(dump, reader.read_manifest(dump).members["pages-1.img"].offset + 3, b"\xff")
    assert refusal(lambda: reader.extract(dump, tmp_path / "out")) == (
        f"{dump}: dump file is corrupt: blake3 mismatch in pages-1.img"
    )


def test_extract_of_an_unknown_member_names_the_file(tmp_path: Path) -> None:
    dump = build_dump(tmp_path / "d", PLAIN)
    assert refusal(lambda: reader.extract(dump, tmp_path / "out", only=["nope.img"])) == (
        f"{dump}: the dump file has no member nope.img"
    )


@pytest.mark.parametrize(
    ("frame_content", "claimed", "why"),
    [
        (CONTENT, CONTENT[:-1] + b"b", "blake3 mismatch in pages-2.img"),
        (CONTENT, CONTENT + b"a", f"pages-2.img has {len(CONTENT)} bytes, the manifest says {len(CONTENT) + 1}"),
        (CONTENT, CONTENT[:-1], f"pages-2.img decompresses to more than {len(CONTENT) - 1} bytes"),
    ],
)
def test_extract_of_a_damaged_compressed_member_names_the_file_and_why(
    tmp_path: Path, frame_content: bytes, claimed: bytes, why: str
) -> None:
    frame = zstd_frame([("raw", b"head"), ("rle", b"a" * 600)], content_size=len(frame_content), fcs_flag=1)
    dump = zstd_dump(tmp_path, claimed, frame)
    for action in (lambda: reader.verify(dump), lambda: reader.extract(dump, tmp_path / "out")):
        assert refusal(action) == f"{dump}: dump file is corrupt: {why}"


def test_a_frame_that_does_not_decompress_names_the_file(tmp_path: Path) -> None:
    frame = zstd_frame([("raw", b"head")], content_size=len(CONTENT), fcs_flag=1, last=False)
    frame += (1 | 2 << 1 | 2 << 3).to_bytes(3, "little") + b"\xff\xff"  # a last, compressed block of garbage
    dump = zstd_dump(tmp_path, CONTENT, frame)
    message = refusal(lambda: reader.extract(dump, tmp_path / "out"))
    assert message.startswith(f"{dump}: dump file is corrupt: pages-2.img does not decompress (")
