"""`vzpy restore` checks the memory images' digests while CRIU restores them: a corrupt one is refused and the
restored tasks never run (vzpy.checkpoint.undump, vzpy.dumpfile.extract_checking_later)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import VZPY, VzRoot
from vzpy import dumpfile
from vzpy.criu.images import is_memory_image
from vzpy.dumpfile.format import HEADER, TRAILER, TRAILER_MAGIC

pytestmark = pytest.mark.root
CTID = "147"
TICKS = "var/log/ticks"
TICKER = f"while true; do echo tick >> /{TICKS}; sleep 0.02; done"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _as_version_1(path: Path) -> None:
    """Rewrite a dump as format version 1 wrote it: no "digest" field, each member's sha256 under "sha256"."""
    magic, _, flags, offset, length, trailer_offset, _ = HEADER.unpack(path.read_bytes()[: HEADER.size])
    with open(path, "r+b") as f:
        f.seek(offset)
        data = json.loads(f.read(length))
        data["format_version"] = 1
        del data["digest"]
        for member in data["members"].values():
            assert member["codec"] == "none"
            f.seek(member["offset"])
            member["sha256"] = hashlib.sha256(f.read(member["stored_size"])).hexdigest()
            del member["blake3"]
        raw = json.dumps(data, separators=(",", ":")).encode()
        assert len(raw) <= length
        digest = hashlib.sha256(raw).digest()
        f.seek(offset)
        f.write(raw + bytes(length - len(raw)))
        f.seek(0)
        f.write(HEADER.pack(magic, 1, flags, offset, len(raw), trailer_offset, digest))
        f.seek(trailer_offset)
        f.write(TRAILER.pack(TRAILER_MAGIC, trailer_offset, digest))


def _wait_for_ticks(ticks: Path, more_than: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ticks.exists() and ticks.stat().st_size > more_than:
            return
        time.sleep(0.05)
    raise AssertionError(f"{ticks} did not grow past {more_than} bytes")


def test_a_corrupt_memory_image_is_refused_and_the_ct_never_runs(vzroot: VzRoot) -> None:
    vz = vzroot
    vz.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vz.new_ip(), check=True)
    vz.add_service(CTID, "ticker", TICKER)
    vz.run("start", CTID, check=True)
    ticks = vz.private(CTID) / TICKS
    _wait_for_ticks(ticks, 0)
    vz.run("chkpnt", CTID, check=True)
    dump = vz.base / "dump" / f"Dump.{CTID}"
    members = dumpfile.read_manifest(dump).members
    name, member = max(((n, m) for n, m in members.items() if is_memory_image(n)), key=lambda item: item[1].size)
    _flip(dump, member.offset + member.size // 2)
    before = ticks.read_bytes()

    refused = vz.run("restore", CTID)

    assert refused.returncode == 17, refused.stderr
    assert f"blake3 mismatch in {name}" in refused.stderr and "\n" not in refused.stderr.strip()
    time.sleep(0.3)  # a ticker that had been let run would have written by now (not a timed assert)
    assert ticks.read_bytes() == before, "the restored tasks ran before their memory was checked"
    assert vz.stage(CTID) == "stopped"
    assert not Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{CTID}").exists()
    assert not any(Path("/dev/shm").glob(f".vzpy-restore-*-{CTID}-*")), "the scratch images were left behind"

    _flip(dump, member.offset + member.size // 2)  # repaired: the same dump restores and runs on
    _as_version_1(dump)  # as an older vzpy wrote it (sha256 members): it restores too
    assert (dumpfile.read_manifest(dump).format_version, dumpfile.read_manifest(dump).digest) == (1, "sha256")
    vz.run("restore", CTID, check=True)
    _wait_for_ticks(ticks, len(before))
    assert os.path.getsize(ticks) > len(before)


def test_a_restore_killed_while_it_copies_the_memory_images_leaves_the_dump_restorable(vzroot: VzRoot) -> None:
    """SIGKILL lands while the memory images are still being copied out of the dump file (a thread, while CRIU
    waits for them): nothing of the CT runs, the next command removes the scratch copy, the dump restores."""
    vz = vzroot
    vz.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vz.new_ip(), check=True)
    # a shell holding ~600 MB: its memory image takes long enough to copy to be caught at it
    vz.add_service(CTID, "hog", f"x=$(yes aaaaaaaaaaaaaaa | head -c 600000000)\n{TICKER}")
    vz.run("start", CTID, check=True)
    ticks = vz.private(CTID) / TICKS
    _wait_for_ticks(ticks, 0)
    vz.run("chkpnt", CTID, check=True, timeout=120)
    dump = vz.base / "dump" / f"Dump.{CTID}"
    before = dump.read_bytes()

    restore = subprocess.Popen([VZPY, "restore", CTID], env=vz.env, stderr=subprocess.PIPE, text=True)
    partial = f".vzpy-restore-*-{CTID}-*/.pages-*.img.partial"
    deadline = time.monotonic() + 60
    while not any(Path("/dev/shm").glob(partial)):
        assert restore.poll() is None, f"the restore ended before its copy was seen: {restore.stderr.read()}"
        assert time.monotonic() < deadline, "no memory image copy seen in 60s"
        time.sleep(0.001)
    restore.send_signal(signal.SIGKILL)
    restore.communicate(timeout=30)

    written = ticks.read_bytes()
    time.sleep(0.3)  # a restored ticker let run would have written by now (not a timed assert)
    assert ticks.read_bytes() == written, "the CT runs after its restore was killed"
    stage = vz.stage(CTID)
    assert stage in ("undumped", "stopped"), stage
    if stage == "undumped":
        vz.run("restore", CTID, "--kill", check=True)
    assert vz.stage(CTID) == "stopped"
    assert dump.read_bytes() == before
    vz.run("restore", CTID, check=True, timeout=120)
    _wait_for_ticks(ticks, len(written))
    assert not any(Path("/dev/shm").glob(f".vzpy-restore-*-{CTID}-*")), "the killed restore's scratch copy stayed"
