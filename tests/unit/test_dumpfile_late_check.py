"""extract_checking_later: the memory images' digests may finish after extraction, every other member's not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpy import dumpfile
from vzpy.criu.images import is_memory_image
from vzpy.dumpfile import Manifest
from vzpy.errors import RestoreError


def _dump(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "core-1.img").write_bytes(os.urandom(3000))
    (images / "pages-1.img").write_bytes(os.urandom(256 << 10))
    (images / "pagemap-1.img").write_bytes(os.urandom(100))
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, Manifest(ctid="101", criu_version="4.2.1", ct_config=""))
    return path


def _flip(path: Path, member: str) -> None:
    entry = dumpfile.read_manifest(path).members[member]
    with open(path, "r+b") as f:
        f.seek(entry.offset + entry.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_bad_memory_image_is_extracted_and_refused_by_wait(tmp_path: Path) -> None:
    path = _dump(tmp_path)
    _flip(path, "pages-1.img")
    out = tmp_path / "out"
    _, late = dumpfile.extract_checking_later(path, out, later=is_memory_image)
    assert (out / "pages-1.img").stat().st_size == 256 << 10
    with pytest.raises(RestoreError, match=r"blake3 mismatch in pages-1\.img"):
        late.wait()


def test_a_bad_member_that_is_not_memory_is_refused_before_it_returns(tmp_path: Path) -> None:
    path = _dump(tmp_path)
    _flip(path, "core-1.img")
    out = tmp_path / "out"
    with pytest.raises(RestoreError, match=r"blake3 mismatch in core-1\.img"):
        dumpfile.extract_checking_later(path, out, later=is_memory_image)
    assert not out.exists(), "a refused extraction leaves nothing behind"


def test_good_members_pass_and_plain_extract_still_checks_everything(tmp_path: Path) -> None:
    path = _dump(tmp_path)
    _, late = dumpfile.extract_checking_later(path, tmp_path / "late", later=is_memory_image)
    late.wait()
    late.close()  # idempotent
    _flip(path, "pages-1.img")
    with pytest.raises(RestoreError, match=r"blake3 mismatch in pages-1\.img"):
        dumpfile.extract(path, tmp_path / "plain")


def test_memory_images_are_pages_images_only() -> None:
    assert is_memory_image("pages-1.img") and is_memory_image("pages-12.img")
    assert not any(map(is_memory_image, ["pagemap-1.img", "pages-.img", "pages-1.img.x", "core-1.img"]))
