"""chkpnt streams CRIU's memory images straight into the dump file (vzpy.dumpfile.stream): real CTs, real
CRIU, and a workload that checks every byte of its memory after the restore."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import blake3
import pytest

from helpers import VzRoot
from vzpy import scratch
from vzpy.config import GlobalConfig
from vzpy.container import Container
from vzpy.dumpfile import Manifest, read_manifest, verify
from vzpy.dumpfile.format import MANIFEST_OFFSET
from vzpy.dumpfile.writer import MANIFEST_ROOM, MAX_FIFOS

pytestmark = pytest.mark.root
CTID = "131"
CHILDREN = 4
# shared anonymous mappings: CRIU gives each a pages image of its own, more than there are FIFOs
SHARED = MAX_FIFOS + 40
PRIVATE_MIB = 8

# Processes with private memory and shared anonymous mappings, each filled with a pattern of its own. On
# SIGUSR1 every process checks all of its memory and writes ok/bad to /tmp/streamhog.<index>.
STREAMHOG_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SHARED_SIZE (256 << 10)
static volatile sig_atomic_t check;
static void on_usr1(int sig) { (void)sig; check = 1; }

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)((i * 2654435761u + seed * 40503u) >> 13);
}
static int same(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)((i * 2654435761u + seed * 40503u) >> 13)) return 0;
    return 1;
}

int main(int argc, char **argv) {
    int children = atoi(argv[1]), shared = atoi(argv[2]);
    size_t private_size = (size_t)atoi(argv[3]) << 20;
    unsigned char **regions = calloc(shared, sizeof *regions);
    for (int r = 0; r < shared; r++) {
        regions[r] = mmap(NULL, SHARED_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        fill(regions[r], SHARED_SIZE, 1000 + r);
    }
    signal(SIGUSR1, on_usr1);
    int index = 0;
    for (int c = 1; c <= children; c++)
        if (fork() == 0) { index = c; break; }
    unsigned char *own = malloc(private_size);
    fill(own, private_size, index);
    char name[64];
    if (index == 0) {
        sleep(1);
        FILE *ready = fopen("/tmp/streamhog.ready", "w");
        fclose(ready);
    }
    for (;;) {
        pause();
        if (!check) continue;
        check = 0;
        int good = same(own, private_size, index);
        for (int r = 0; r < shared; r++) good = good && same(regions[r], SHARED_SIZE, 1000 + r);
        snprintf(name, sizeof name, "/tmp/streamhog.%d.tmp", index);
        FILE *out = fopen(name, "w");
        fputs(good ? "ok" : "bad", out);
        fclose(out);
        char final[64];
        snprintf(final, sizeof final, "/tmp/streamhog.%d", index);
        rename(name, final);
    }
}
"""


@pytest.fixture(scope="module")
def streamhog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("streamhog")
    source = out / "streamhog.c"
    source.write_text(STREAMHOG_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out / "streamhog"), str(source)], check=True)
    return out / "streamhog"


@pytest.fixture
def hog_ct(vzroot: VzRoot, streamhog: Path):
    vzroot.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vzroot.new_ip(), check=True)
    shutil.copy(streamhog, vzroot.private(CTID) / "usr" / "bin" / "streamhog")
    vzroot.add_service(CTID, "streamhog", f"exec /usr/bin/streamhog {CHILDREN} {SHARED} {PRIVATE_MIB}")
    vzroot.run("start", CTID, check=True)
    wait_for(vzroot.private(CTID) / "tmp" / "streamhog.ready")
    return vzroot


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def memory_intact(vz: VzRoot) -> bool:
    """Every streamhog process checked all of its memory and found it as it filled it."""
    tmp = vz.private(CTID) / "tmp"
    for old in tmp.glob("streamhog.[0-9]*"):
        old.unlink()
    pids = Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{CTID}/cgroup.procs").read_text().split()
    for pid in pids:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "streamhog":
            os.kill(int(pid), signal.SIGUSR1)
    results = [tmp / f"streamhog.{index}" for index in range(CHILDREN + 1)]
    for result in results:
        wait_for(result)
    return all(result.read_text() == "ok" for result in results)


def file_digests(dump: Path, manifest: Manifest) -> dict[str, str]:
    """Each member's BLAKE3 digest, read straight from its bytes in the file."""
    digests = {}
    with dump.open("rb") as f:
        for name, member in manifest.members.items():
            f.seek(member.offset)
            digests[name] = blake3.blake3(f.read(member.stored_size)).hexdigest()
    return digests


def in_file_order(manifest: Manifest) -> list[str]:
    return sorted(manifest.members, key=lambda name: manifest.members[name].offset)


def pages_number(name: str) -> int:
    return int(name.removeprefix("pages-").removesuffix(".img"))


def test_streamed_chkpnt_with_more_pages_images_than_fifos_restores_every_byte(hog_ct: VzRoot) -> None:
    vz = hog_ct
    assert memory_intact(vz)
    vz.run("chkpnt", CTID, check=True)
    dump = vz.base / "dump" / f"Dump.{CTID}"
    manifest = verify(dump)
    fifos = MAX_FIFOS
    pages = sorted((n for n in manifest.members if n.startswith("pages-")), key=pages_number)
    assert pages_number(pages[-1]) > fifos, "the test needs pages images beyond the FIFOs"
    order = in_file_order(manifest)
    streamed = [n for n in pages if pages_number(n) <= fifos]
    # the FIFOs' members come first, from the reserved offset on; the rest (files) after them
    assert order[: len(streamed)] == sorted(streamed, key=lambda n: manifest.members[n].offset)
    assert manifest.members[order[0]].offset == MANIFEST_OFFSET + MANIFEST_ROOM
    assert {pages_number(n) for n in order[len(streamed) :] if n.startswith("pages-")} == {
        pages_number(n) for n in pages if pages_number(n) > fifos
    }
    assert manifest.digest == "blake3"
    assert file_digests(dump, manifest) == {name: m.digest for name, m in manifest.members.items()}
    assert not list(Path("/dev/shm").glob(f".vzpy-dump-*-{CTID}-*")), "the scratch dir (and its FIFOs) is gone"

    vz.run("restore", CTID, check=True)  # extracts and checks every member against the manifest
    assert memory_intact(vz)
    assert "running" in vz.run("status", CTID, check=True).stdout


def test_a_manifest_beyond_its_room_moves_the_members_and_restores(hog_ct: VzRoot) -> None:
    vz = hog_ct
    with (vz.base / "etc" / "conf" / f"{CTID}.conf").open("a") as conf:
        conf.write("# " + "x" * (MANIFEST_ROOM + 4096) + "\n")
    vz.run("chkpnt", CTID, check=True)
    dump = vz.base / "dump" / f"Dump.{CTID}"
    manifest = verify(dump)
    order = in_file_order(manifest)
    assert manifest.members[order[0]].offset > MANIFEST_OFFSET + MANIFEST_ROOM
    assert order[0].startswith("pages-"), "the streamed members still come first"
    assert manifest.digest == "blake3"
    assert file_digests(dump, manifest) == {name: m.digest for name, m in manifest.members.items()}
    vz.run("restore", CTID, check=True)
    assert memory_intact(vz)


def test_a_full_disk_while_streaming_resumes_the_ct_and_leaves_no_dump_file(hog_ct: VzRoot, tmp_path: Path) -> None:
    vz = hog_ct
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        result = vz.run("chkpnt", CTID, "--dumpfile", str(small / "Dump"))
        assert result.returncode == 16, result.stderr
        assert "space" in result.stderr
        assert not list(small.iterdir()), "a failed dump must leave no partial file"
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert not list(Path("/dev/shm").glob(f".vzpy-dump-*-{CTID}-*"))
    assert "running" in vz.run("status", CTID, check=True).stdout
    assert memory_intact(vz)
    # and the next dump works
    vz.run("chkpnt", CTID, check=True)
    assert read_manifest(vz.base / "dump" / f"Dump.{CTID}").memory_bytes > 0
    vz.run("restore", CTID, check=True)
    assert memory_intact(vz)


def criu_using(directory: Path) -> set[int]:
    """CRIU processes with an open file (the image directory's fd) in `directory`."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() != "criu":
                continue
            targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(target == str(directory) or target.startswith(f"{directory}/") for target in targets):
            found.add(int(proc.name))
    return found


def pages_open(pids: set[int]) -> set[str]:
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            names |= {os.path.basename(os.readlink(fd)) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    return {name for name in names if name.startswith("pages-")}


def stop_between_fifos(criu: set[int], chkpnt: subprocess.Popen, deadline: float) -> None:
    """SIGSTOP CRIU at a moment it has written a pages FIFO, holds none open, and has more FIFOs to go."""
    highest = 0
    while True:
        assert time.monotonic() < deadline and chkpnt.poll() is None, "no gap between two FIFOs was caught"
        numbers = {pages_number(name) for name in pages_open(criu)}
        highest = max([highest, *numbers])
        if numbers or not 0 < highest < MAX_FIFOS - 1:
            continue
        signal_all(criu, signal.SIGSTOP)
        while any(state(pid) not in ("T", "") for pid in criu):
            time.sleep(0.001)
        numbers = {pages_number(name) for name in pages_open(criu)}
        if not numbers and max([highest, *numbers]) < MAX_FIFOS - 1:
            return
        signal_all(criu, signal.SIGCONT)


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def test_a_chkpnt_killed_while_criu_dumps_leaves_no_criu_blocked_on_a_fifo(hog_ct: VzRoot) -> None:
    vz = hog_ct
    ct = Container(CTID, GlobalConfig.load(vz.conf))
    chkpnt = subprocess.Popen(["vzpy", "chkpnt", CTID], env=vz.env)
    criu: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while not criu:  # CRIU runs on the dump's image directory, where the FIFOs wait
            assert time.monotonic() < deadline and chkpnt.poll() is None
            images = [d / "images" for d in scratch.leftovers(ct) if (d / "images" / "pages-1.img").exists()]
            criu = criu_using(images[0]) if images else set()
        # vzpy dies between two pages FIFOs: CRIU closed one and is yet to open the next, whose open would wait
        # for a reader forever (CRIU's parasite held in the CT's tasks). CRIU is stopped in that gap meanwhile.
        stop_between_fifos(criu, chkpnt, deadline)
        chkpnt.send_signal(signal.SIGKILL)
        chkpnt.wait()
        signal_all(criu, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in criu):
            assert time.monotonic() < deadline, "CRIU is still running a minute after vzpy was killed"
            time.sleep(0.1)
    finally:
        for pid in criu:  # only if the test failed: a CRIU blocked forever
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert vz.run("chkpnt", CTID, "--resume").returncode == 0
    assert memory_intact(vz)
    assert not scratch.leftovers(ct)
