"""A CT migrated back to a host that kept its old private area (`-r no`: PRIVATE.migrated) is synced with that
area as rsync's basis: what did not change is copied there instead of sent. The old area is the CT's own
(hostile) files: a file planted there with the size and mtime of the CT's, or a directory symlink out of it,
must not put anything but the source's bytes into the arriving CT. Two test hosts with real sshd."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy_lab.netns import TestHost, TestNetwork

pytestmark = pytest.mark.root
CTID = "301"
MiB = 1 << 20
DATA_SIZES = [16 * MiB, 12 * MiB, 8 * MiB, 4 * MiB, 1 * MiB, 300_000, 4096, 17]  # about 41 MiB unchanged
PLANTED_SIZE = 2 * MiB
SECRET_SIZE = 6 * MiB
MTIME = 1_700_000_000
CTIME_MARGIN = 2  # vzpy.migrate.changes.CTIME_MARGIN_NS


def vzpy(host: TestHost, *args: str, fault: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {"VZPY_MIGRATE_FAULT": fault} if fault else {}
    return host.run(["vzpy", *args], env=env, timeout=timeout)


def status(host: TestHost) -> str:
    result = vzpy(host, "status", "--json", CTID)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return data["status"] if data["exist"] else "absent"


def migrate(source: TestHost, target: TestHost, *extra: str, fault: str = "") -> subprocess.CompletedProcess[str]:
    return vzpy(source, "migrate", "--online", "--json", *extra, target.address, CTID, fault=fault)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (MTIME, MTIME))


def digests(root: Path) -> dict[str, str]:
    """sha256 of every regular file under root (data/ and lnk/: the CT's own init leaves them alone)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in ("data", "lnk")
        for p in sorted((root / top).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def area_state(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every entry of an area: mode, owner, size, mtime and content digest (or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, what)
    return found


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.fixture
def ct_on_a(host_a: TestHost, host_b: TestHost, test_network: TestNetwork) -> Iterator[None]:
    """CT 301 running on host_a with ~41 MiB of data files, a file planted/ and a directory lnk/."""
    ip = test_network.new_ct_address()
    created = vzpy(host_a, "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "basis.test")
    assert created.returncode == 0, created.stderr
    private = host_a.path(f"/vz/private/{CTID}")
    for number, size in enumerate(DATA_SIZES):
        write(private / "data" / f"file{number}", os.urandom(size))
    write(private / "data" / "planted", os.urandom(PLANTED_SIZE))
    write(private / "lnk" / "secret", b"not yet the secret")
    service = private / "etc" / "vzpy" / "services" / "sleeper"
    service.write_text("#!/bin/sh\nexec sleep 100000\n")
    service.chmod(0o755)
    assert vzpy(host_a, "start", CTID).returncode == 0
    try:
        yield
    finally:
        for host in (host_a, host_b):
            host.remove_ct(CTID)
            for planted in host.path("/vz/private").glob(f"{CTID}.migrated*"):
                if planted.is_symlink() or not planted.is_dir():  # remove_ct leaves them
                    planted.unlink()
        shutil.rmtree(host_a.path("/vz/hostdir"), ignore_errors=True)


def leave_with_area_kept(host_a: TestHost, host_b: TestHost) -> Path:
    """Migrate the CT to host_b with -r no; host_a's old area."""
    there = migrate(host_a, host_b, "--remove-area", "no")
    assert there.returncode == 0, there.stderr
    old = host_a.path(f"/vz/private/{CTID}.migrated")
    assert old.is_dir() and status(host_b) == "running"
    return old


def test_migrating_back_sends_only_what_the_old_area_lacks_and_nothing_of_it_leaks(host_a, host_b, ct_on_a) -> None:
    secret = os.urandom(SECRET_SIZE)  # a file of host_a the CT wants confirmed (a guess, or got some other way)
    write(host_a.path("/vz/hostdir/secret"), secret)
    write(host_a.path(f"/vz/private/{CTID}/lnk/secret"), secret)
    old = leave_with_area_kept(host_a, host_b)
    ct_there = host_b.path(f"/vz/private/{CTID}")
    # what it left in its old area on host_a: planted of the size and mtime of its file now, other bytes; and
    # lnk -> the host's directory
    write(old / "data" / "planted", os.urandom(PLANTED_SIZE))
    (old / "lnk" / "secret").unlink()
    (old / "lnk").rmdir()
    (old / "lnk").symlink_to("/vz/hostdir")
    # the final (frozen) sync sends again whatever changed shortly before the live one began, which would
    # mend a leak of the live sync: let the files on host_b age past its margin
    newest = max(p.lstat().st_ctime for p in ct_there.rglob("*"))
    time.sleep(max(0.0, newest + CTIME_MARGIN + 1 - time.time()))
    expected = digests(ct_there)

    back = migrate(host_b, host_a)
    assert back.returncode == 0, back.stderr
    summary = json.loads(back.stdout)
    assert status(host_a) == "running" and status(host_b) == "absent"
    arrived = host_a.path(f"/vz/private/{CTID}")
    assert digests(arrived) == expected  # planted/ and lnk/secret are the source's bytes
    assert not (arrived / "lnk").is_symlink()
    live_sent = summary["files_sent"][0]
    unchanged = sum(DATA_SIZES)
    # planted/ and lnk/secret were sent (neither matched by size+mtime nor through the symlink), the rest not
    assert PLANTED_SIZE + SECRET_SIZE < live_sent < PLANTED_SIZE + SECRET_SIZE + unchanged // 4, summary
    # the old area served its purpose: it goes (in the background, after the commit)
    wait_until(lambda: not list(host_a.path("/vz/private").glob(f"{CTID}.migrated*")))
    assert host_a.path("/vz/hostdir/secret").read_bytes() == secret  # the link was removed, not what it named
    assert not host_a.path(f"/vz/dump/Migrate.{CTID}").exists()


def test_a_failed_migration_back_leaves_the_old_area_as_it_was(host_a, host_b, ct_on_a) -> None:
    old = leave_with_area_kept(host_a, host_b)
    (old / "lnk" / "secret").unlink()
    (old / "lnk").rmdir()
    (old / "lnk").symlink_to("/vz/hostdir")
    write(host_a.path("/vz/hostdir/secret"), b"host")
    before = area_state(old)
    failed = migrate(host_b, host_a, fault="source:fail:restore")
    assert failed.returncode != 0, failed.stdout
    assert "rolling back" in failed.stdout + failed.stderr
    assert status(host_b) == "running"
    wait_until(lambda: status(host_a) == "absent" and not host_a.path(f"/vz/dump/Migrate.{CTID}").exists())
    assert area_state(old) == before
    assert not host_a.path(f"/vz/private/{CTID}").exists()


def plant_at_old_area(old: Path, kind: str) -> None:
    """What may stand at PRIVATE.migrated and not qualify as rsync's basis: a symlink or a file planted in the
    old area's place, or the old area itself owned by another user (a CT may chown its own /)."""
    if kind == "chowned":
        os.chown(old, 65534, 65534)
        return
    shutil.rmtree(old)
    if kind == "symlink":
        old.symlink_to("/vz/hostdir")
    else:
        old.write_bytes(b"not an area")


@pytest.mark.parametrize("kind", ["symlink", "file", "chowned"])
def test_migrating_back_retires_what_this_host_kept_of_the_ct(host_a, host_b, ct_on_a, kind: str) -> None:
    """Once the CT is back, the old area at PRIVATE.migrated (used as the basis or not) and CTID.conf.migrated
    are out of date: both go, a symlink as a link (what it names stays), so the next `-r no` can keep the area."""
    write(host_a.path("/vz/hostdir/keep"), b"host")
    old = leave_with_area_kept(host_a, host_b)
    assert host_a.path(f"/etc/vz/conf/{CTID}.conf.migrated").is_file()
    plant_at_old_area(old, kind)

    back = migrate(host_b, host_a)
    assert back.returncode == 0, back.stderr
    assert status(host_a) == "running" and status(host_b) == "absent"
    wait_until(lambda: not list(host_a.path("/vz/private").glob(f"{CTID}.migrated*")))
    assert host_a.path("/vz/hostdir/keep").read_bytes() == b"host"

    again = migrate(host_a, host_b, "--remove-area", "no")
    assert again.returncode == 0, again.stdout + again.stderr
    assert status(host_b) == "running" and host_a.path(f"/vz/private/{CTID}.migrated/data/file0").is_file()

    migrate(host_b, host_a).check_returncode()
    assert not host_a.path(f"/etc/vz/conf/{CTID}.conf.migrated").exists(), "a retired config of a CT that runs here"
    assert host_b.path(f"/etc/vz/conf/{CTID}.conf.migrated").is_file()  # where it left: vzmigrate's


def test_r_no_with_its_name_taken_is_refused_before_anything_moves(host_a, host_b, ct_on_a) -> None:
    """PRIVATE.migrated already stands on this host (say a CT created anew under the CTID of one that left with
    -r no): keeping the area would fail only after the commit, so preflight refuses, naming it."""
    taken = host_a.path(f"/vz/private/{CTID}.migrated")
    taken.mkdir()
    (taken / "older").write_bytes(b"an older CT's file")

    refused = migrate(host_a, host_b, "--remove-area", "no")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert f"/vz/private/{CTID}.migrated exists already" in refused.stderr and "-r yes" in refused.stderr
    assert "sync files" not in refused.stderr and "suspend" not in refused.stderr  # --json: progress on stderr
    assert status(host_a) == "running" and status(host_b) == "absent"
    assert (taken / "older").read_bytes() == b"an older CT's file"
    shutil.rmtree(taken)
