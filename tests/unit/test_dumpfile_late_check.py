"""extract_checking_later: the memory images' digests may finish after extraction, every other member's not."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from vzpy import dumpfile
from vzpy.criu.images import is_memory_image, task_pages_images
from vzpy.dumpfile import Manifest, kio
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


def _dump_two_memory_images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "core-1.img").write_bytes(os.urandom(3000))
    (images / "pages-1.img").write_bytes(os.urandom(512 << 10))
    (images / "pages-2.img").write_bytes(os.urandom(8 << 10))
    path = tmp_path / "ct.dump"
    dumpfile.write_dumpfile(path, images, Manifest(ctid="101", criu_version="4.2.1", ct_config=""))
    return path


def _gated_copy(monkeypatch: pytest.MonkeyPatch, gate: threading.Event) -> None:
    """Copies of pages-1.img (the only 512 KiB member) wait for `gate`."""
    copy_range = kio.copy_range

    def gated(src: int, dst: int, src_off: int, dst_off: int, length: int, **kwargs: Any) -> int:
        if length == 512 << 10:
            assert gate.wait(10)
        return copy_range(src, dst, src_off, dst_off, length, **kwargs)

    monkeypatch.setattr(kio, "copy_range", gated)


def test_a_member_copied_later_appears_only_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _dump_two_memory_images(tmp_path)
    gate = threading.Event()
    _gated_copy(monkeypatch, gate)
    out = tmp_path / "out"
    _, late = dumpfile.extract_checking_later(
        path,
        out,
        later=is_memory_image,
        copy_later=lambda dest: {"pages-1.img"} if (dest / "core-1.img").exists() else set(),
    )
    try:
        assert (out / "pages-2.img").stat().st_size == 8 << 10, "a member not named is copied before it returns"
        assert not (out / "pages-1.img").exists(), "a member still being copied has no name a reader could open"
        with pytest.raises(RestoreError, match="took over 0s; check the disk"):
            late.copied(0.05)
        gate.set()
        late.copied(10)
        assert (out / "pages-1.img").read_bytes() == (tmp_path / "images" / "pages-1.img").read_bytes()
        assert sorted(p.name for p in out.iterdir()) == ["core-1.img", "pages-1.img", "pages-2.img"]
        late.wait()
    finally:
        gate.set()
        late.close()


def test_a_failed_later_copy_is_refused_and_leaves_no_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _dump_two_memory_images(tmp_path)
    copy_range = kio.copy_range

    def no_space_for_pages_1(src: int, dst: int, src_off: int, dst_off: int, length: int, **kwargs: Any) -> int:
        if length == 512 << 10:
            copy_range(src, dst, src_off, dst_off, 4096, **kwargs)  # a part of it is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy_range(src, dst, src_off, dst_off, length, **kwargs)

    monkeypatch.setattr(kio, "copy_range", no_space_for_pages_1)
    out = tmp_path / "out"
    _, late = dumpfile.extract_checking_later(path, out, later=is_memory_image, copy_later=lambda _d: ["pages-1.img"])
    try:
        with pytest.raises(RestoreError, match=r"cannot extract the memory images of .*: No space left on device"):
            late.copied(10)
        with pytest.raises(RestoreError, match="No space left on device"):
            late.wait()
    finally:
        late.close()
    assert sorted(p.name for p in out.iterdir()) == ["core-1.img", "pages-2.img"], "no partial file is left"


def test_task_pages_images_are_named_by_the_processes_pagemaps(tmp_path: Path) -> None:
    from pycriu import images as pycriu_images

    for name, pages_id in (("pagemap-1.img", 3), ("pagemap-7.img", 1), ("pagemap-shmem-4242.img", 2)):
        with open(tmp_path / name, "wb") as f:
            entries = [{"pages_id": pages_id}, {"vaddr": "0x400000", "compat_nr_pages": 1, "flags": "PE_PRESENT"}]
            pycriu_images.dump({"magic": "PAGEMAP", "entries": entries}, f)
    (tmp_path / "pages-2.img").write_bytes(b"shared memory's: read while the IPC namespace is restored")
    assert task_pages_images(tmp_path) == {"pages-3.img", "pages-1.img"}
