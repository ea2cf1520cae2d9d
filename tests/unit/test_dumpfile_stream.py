"""The streamed dump file writer (vzpy.dumpfile.stream) with real FIFOs, a stand-in for CRIU writing into
them, and the reader checking every result."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vzpy.dumpfile import extract, stream, verify
from vzpy.dumpfile.format import ALIGN, MANIFEST_OFFSET, Manifest
from vzpy.dumpfile.writer import FIFO_SLACK, MANIFEST_ROOM, write_dumpfile_streamed
from vzpy.errors import ChkpntError

CHUNK = 256 << 10


def blob(seed: int, size: int) -> bytes:
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 128
        counter += 1
    return bytes(out[:size])


def write_image(path: Path, data: bytes) -> None:
    """As CRIU does: O_WRONLY|O_CREAT|O_TRUNC, whether a FIFO waits there or not."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:CHUNK]) :]
    finally:
        os.close(fd)


def manifest(**fields: object) -> Manifest:
    return Manifest(ctid="101", criu_version="4.2.1", ct_config="x=1\n", **fields)  # type: ignore[arg-type]


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    images, spill = tmp_path / "images", tmp_path / "spill"
    images.mkdir()
    yield images, spill, tmp_path / "Dump"


def run_streamed(
    dirs: tuple[Path, Path, Path],
    criu: Callable[[Path], None],
    *,
    pages_images: int = 1,
    extra: dict[str, Path] | None = None,
    the_manifest: Manifest | None = None,
    room: int = MANIFEST_ROOM,
) -> Manifest:
    images, spill, dump = dirs
    return write_dumpfile_streamed(
        dump,
        images,
        pages_images=pages_images,
        take_images=lambda: criu(images),
        describe=lambda: (the_manifest or manifest(), extra or {}),
        spill_dir=spill,
        manifest_room=room,
    )


def member_bytes(dump: Path, name: str, written: Manifest) -> bytes:
    member = written.members[name]
    with dump.open("rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def in_file_order(written: Manifest) -> list[str]:
    return sorted(written.members, key=lambda name: written.members[name].offset)


def assert_no_threads_left() -> None:
    assert not [t.name for t in threading.enumerate() if t.name.startswith("vzpy-stream")]


def test_pages_stream_first_from_the_reserved_offset_and_everything_reads_back(dirs, tmp_path: Path) -> None:
    pages = {"pages-1.img": blob(1, 3 << 20), "pages-2.img": b"", "pages-3.img": blob(3, 5000)}
    others = {"core-1.img": blob(4, 700), "pagemap-1.img": blob(5, 90)}
    (tmp_path / "extra").write_bytes(blob(6, 12345))

    def criu(images: Path) -> None:
        for name, data in {**pages, **others}.items():
            write_image(images / name, data)

    written = run_streamed(dirs, criu, extra={"fs.tar.zst": tmp_path / "extra"})
    images, _, dump = dirs
    assert verify(dump) == written
    assert written.members["pages-1.img"].offset == MANIFEST_OFFSET + MANIFEST_ROOM
    assert in_file_order(written)[:3] == ["pages-1.img", "pages-2.img", "pages-3.img"]
    assert written.memory_bytes == sum(len(d) for d in pages.values())
    expected = {**pages, **others, "fs.tar.zst": blob(6, 12345)}
    assert {name: member_bytes(dump, name, written) for name in written.members} == expected
    # the FIFOs CRIU never opened (pages-4.img and on) are gone and are no members
    assert sorted(p.name for p in images.iterdir()) == sorted(others)
    out = tmp_path / "out"
    extract(dump, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected
    assert_no_threads_left()


def test_pages_images_beyond_the_fifos_are_packed_as_files(dirs) -> None:
    count = 1 + FIFO_SLACK
    pages = {f"pages-{n}.img": blob(n, 70000 + n) for n in range(1, count + 4)}

    def criu(images: Path) -> None:
        for name, data in pages.items():
            write_image(images / name, data)

    written = run_streamed(dirs, criu, pages_images=1)
    _, _, dump = dirs
    verify(dump)
    order = in_file_order(written)
    assert order[:count] == [f"pages-{n}.img" for n in range(1, count + 1)]
    assert set(order[count:]) == {f"pages-{n}.img" for n in range(count + 1, count + 4)}
    assert {name: member_bytes(dump, name, written) for name in written.members} == pages


def test_a_fifo_filled_while_another_streams_is_spilled_and_packed_after(dirs) -> None:
    first, second = blob(1, 6 << 20), blob(2, 5 << 20)

    def criu(images: Path) -> None:
        one = os.open(images / "pages-1.img", os.O_WRONLY | os.O_TRUNC)
        two = os.open(images / "pages-2.img", os.O_WRONLY | os.O_TRUNC)
        try:
            for at in range(0, len(first), CHUNK):  # interleaved, each far beyond a pipe's buffer
                os.write(one, first[at : at + CHUNK])
                os.write(two, second[at : at + CHUNK])
        finally:
            os.close(one)
            os.close(two)

    written = run_streamed(dirs, criu)
    _, spill, dump = dirs
    verify(dump)
    assert in_file_order(written) == ["pages-1.img", "pages-2.img"]
    assert member_bytes(dump, "pages-1.img", written) == first
    assert member_bytes(dump, "pages-2.img", written) == second
    assert (spill / "pages-2.img").exists()  # it did not stream: it went through the spill file


def test_a_manifest_larger_than_its_room_moves_the_members(dirs) -> None:
    pages = {"pages-1.img": blob(1, 2 << 20), "pages-2.img": blob(2, 4096 * 3)}

    def criu(images: Path) -> None:
        for name, data in pages.items():
            write_image(images / name, data)
        write_image(images / "core-1.img", blob(3, 100))

    big = manifest()
    big.ct_config = "# " + "y" * 20000 + "\n"
    written = run_streamed(dirs, criu, the_manifest=big, room=ALIGN)
    _, _, dump = dirs
    assert verify(dump) == written
    first = written.members[in_file_order(written)[0]]
    assert first.offset > MANIFEST_OFFSET + 20000
    assert in_file_order(written)[:2] == ["pages-1.img", "pages-2.img"]
    assert {name: member_bytes(dump, name, written) for name in pages} == pages


def test_a_write_error_drains_criu_to_the_end_and_leaves_no_dump_file(dirs) -> None:
    pages = {"pages-1.img": blob(1, 4 << 20), "pages-2.img": blob(2, 2 << 20)}
    finished = []

    def criu(images: Path) -> None:
        for name, data in pages.items():
            write_image(images / name, data)
        finished.append(True)

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MANIFEST_ROOM + (2 << 20), old_limit[1]))  # EFBIG on the way
    try:
        with pytest.raises(ChkpntError, match="cannot write the dump file"):
            run_streamed(dirs, criu)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    images, _, dump = dirs
    assert finished, "CRIU must be able to finish (the CT stays intact)"
    assert list(dump.parent.glob("*Dump*")) == []
    assert not [p for p in images.iterdir() if p.is_fifo()]
    assert_no_threads_left()


def test_a_failing_criu_leaves_no_dump_file_no_fifo_and_no_thread(dirs) -> None:
    def criu(images: Path) -> None:
        write_image(images / "pages-1.img", blob(1, 1 << 20))
        raise ChkpntError("criu dump failed")

    with pytest.raises(ChkpntError, match="criu dump failed"):
        run_streamed(dirs, criu)
    images, _, dump = dirs
    assert list(dump.parent.glob("*Dump*")) == []
    assert list(images.iterdir()) == []
    assert_no_threads_left()


def test_move_forward_moves_overlapping_ranges_intact(tmp_path: Path) -> None:
    data = blob(9, 11 << 20)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * ALIGN + data)
    fd = os.open(path, os.O_WRONLY)
    try:
        stream.move_forward(fd, ALIGN, ALIGN + len(data), 3 * ALIGN)
    finally:
        os.close(fd)
    assert path.read_bytes()[4 * ALIGN :] == data


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from vzpy.dumpfile import stream
images = Path(sys.argv[1])
fd = os.open(images.parent / "Dump.tmp", os.O_WRONLY | os.O_CREAT, 0o600)
pump = stream.PagesPump(fd, images, images.parent / "spill", 2, 1 << 20)
pump.start()
print(pump._keeper.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_vzpy_leaves_criu_free_to_write_its_pages_and_the_keeper_goes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(images)], stdout=subprocess.PIPE, text=True)
    keeper_pid = int(writer.stdout.readline())
    writer.kill()
    writer.wait()
    written = []

    def criu() -> None:  # the blocking open a reader-less FIFO would hang forever in
        write_image(images / "pages-1.img", blob(1, 8 << 20))
        written.append(True)

    thread = threading.Thread(target=criu, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # unblock it before failing
        os.close(os.open(images / "pages-1.img", os.O_RDONLY | os.O_NONBLOCK))
    assert written, "CRIU's open or write of a FIFO blocked after vzpy was killed"
    shutil.rmtree(images)  # the CT's next command removes a killed run's scratch dir
    deadline = time.monotonic() + 10
    while Path(f"/proc/{keeper_pid}").exists() and Path(f"/proc/{keeper_pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the keeper outlived its FIFOs' directory"
        time.sleep(0.05)
