"""The frozen final sync sends only what changed since the live sync began (vzpy.migrate.changes and
.finalsync): against real trees rsynced from host_a to host_b over real SSH, and in a real migration of a
CT that keeps changing its files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vzpy_lab.netns import TestHost, TestNetwork

pytestmark = pytest.mark.root

PYTHON = sys.executable
CTID = "101"

# Run inside host_a: build a tree, live sync (a full rsync), change it in every way, then the final sync of
# the changes only. The margin is shrunk (and the tree aged past it) so that what was made before the
# snapshot does not count as changed: the lists show how selective it is.
SCRIPT = textwrap.dedent(
    """\
    import json, os, shutil, sys, time
    from pathlib import Path
    from vzpy.migrate import changes
    from vzpy.migrate.finalsync import FinalSync
    from vzpy.migrate.rsync import sync_tree
    from vzpy.migrate.ssh import SshSession, parse_target
    target, source, dest, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    changes.CTIME_MARGIN_NS = 20_000_000

    def build(root):
        for d in ("untouched/many", "data", "a/sub/deep", "b", "c", "d/inside", "z/y/x", "attrs/below"):
            (root / d).mkdir(parents=True)
        for i in range(50):
            (root / "untouched" / "many" / f"f{i}").write_text(f"{i}\\n")
        for f in ("data/file", "a/f", "a/sub/g", "a/sub/deep/h", "b/keep", "b/keep2", "c/x", "d/inside/i",
                  "e", "top", "z/y/x/w"):
            (root / f).write_text(f"{f}\\n")
        (root / "b" / "link").symlink_to("keep")
        os.link(root / "b" / "keep2", root / "c" / "keep2-link")
        os.setxattr(root / "b" / "keep", "user.vzpy", b"before")

    def mutate(root):
        (root / "data" / "file").write_text("changed, and longer than before\\n")
        (root / "data" / "added").write_text("added\\n")
        (root / "c" / "x").unlink()
        (root / "a" / "sub").rename(root / "moved")
        (root / "b" / "tmp").symlink_to("/etc/passwd")
        os.replace(root / "b" / "tmp", root / "b" / "link")
        os.link(root / "top", root / "c" / "top-link")
        os.unlink(root / "c" / "keep2-link")
        f = root / "a" / "f"
        before = os.stat(f)
        f.write_text(f.read_text().upper())
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.setxattr(root / "b" / "keep", "user.vzpy", b"after")
        os.chmod(root / "b" / "keep2", 0o640)
        shutil.rmtree(root / "d")
        (root / "d").write_text("a file where a directory was\\n")
        (root / "e").unlink()
        (root / "e").mkdir()
        (root / "e" / "in-new-dir").write_text("x\\n")
        shutil.rmtree(root / "z" / "y")
        os.chmod(root / "attrs", 0o700)  # a directory's own metadata, nothing in it changed
        os.setxattr(root / "attrs", "user.vzpy", b"dir")
        os.chmod(root / "attrs" / "below", 0o711)

    if mode == "changes":
        build(source)
        time.sleep(0.1)
    with SshSession.connect(parse_target(target), key="/root/.ssh/id_ed25519") as session:
        ssh = session.openssh()
        snap = changes.snapshot(source)
        sync_tree(source, dest, ssh)
        time.sleep(0.1)
        if mode == "changes":
            mutate(source)
        found = changes.changes_since(snap)
        final = FinalSync()
        final.start(source, dest, ssh)
        results = final.run(found, 60.0)
    print(json.dumps({"dirs": found.dirs, "files": found.files, "forced": found.forced,
                      "why_full": found.why_full, "runs": len(results)}))
    """
)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under root: kind, mode, owner, size, mtime, content digest or link target, xattrs, and
    which entries share an inode (by the first path with it)."""
    entries: dict[str, tuple[object, ...]] = {}
    first_of_inode: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            relative = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                what: object = hashlib.sha256(path.read_bytes()).hexdigest()
                linked = first_of_inode.setdefault(st.st_ino, relative)
                mtime = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                what, linked, mtime = os.readlink(path), "", 0
            else:
                what, linked, mtime = "", "", 0
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {a: os.getxattr(path, a) for a in os.listxattr(path)}
            entries[relative] = (kind, st.st_mode, st.st_uid, st.st_gid, st.st_size if mtime else 0, mtime, what,
                                 linked, sorted(xattrs.items()))  # fmt: skip
    return entries


def final_sync(host_a: TestHost, host_b: TestHost, mode: str) -> dict[str, object]:
    result = host_a.run([PYTHON, "-c", SCRIPT, host_b.ssh_target, "/vz/private/402", "/vz/private/402", mode])
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture
def trees(host_a: TestHost, host_b: TestHost):
    source, dest = host_a.path("/vz/private/402"), host_b.path("/vz/private/402")
    yield source, dest
    subprocess.run(["rm", "-rf", "--", str(source), str(dest)], check=True)


def test_the_changes_alone_make_the_destination_equal_the_source(host_a: TestHost, host_b: TestHost, trees) -> None:
    source, dest = trees
    found = final_sync(host_a, host_b, "changes")
    assert found["why_full"] is None
    assert tree(dest) == tree(source)
    # only the changes were named: nothing under untouched/, the set-back file forced past the quick check
    named = [*found["dirs"], *found["files"]]  # type: ignore[misc]
    assert not any(name.startswith("untouched") for name in named), named
    assert "a/f" in found["forced"] and found["runs"] == 2  # type: ignore[operator]
    assert {"moved", "moved/deep", "attrs", "attrs/below"} <= set(found["dirs"])  # type: ignore[arg-type]


def test_nothing_changed_sends_nothing(host_a: TestHost, host_b: TestHost, trees) -> None:
    source, dest = trees
    (source / "only").mkdir(parents=True)
    (source / "only" / "file").write_text("x\n")
    found = final_sync(host_a, host_b, "none")
    assert found["runs"] == 0 and found["why_full"] is None
    assert tree(dest) == tree(source)


# --- a real migration of a CT that keeps changing its files

MUTATOR = """#!/bin/sh
mkdir -p /var/mut
i=0
while :; do
  i=$((i+1))
  echo "$i" > /var/mut/counter
  mkdir -p /var/mut/new$i/deep && echo "$i" > /var/mut/new$i/deep/f
  mv /var/mut/new$i /var/mut/dir$i
  rm -rf /var/mut/dir$((i-3))
  ln -sfn dir$i /var/mut/latest
  usleep 20000
done
"""


@pytest.fixture
def busy_ct(host_a: TestHost, host_b: TestHost, test_network: TestNetwork):
    ip = test_network.new_ct_address()
    created = host_a.run(["vzpy", "create", CTID, "--ostemplate", "minimal", "--ipadd", ip], timeout=180)
    assert created.returncode == 0, created.stderr
    service = host_a.path(f"/vz/private/{CTID}/etc/vzpy/services/mutator")
    service.write_text(MUTATOR)
    service.chmod(0o755)
    assert host_a.run(["vzpy", "start", CTID], timeout=180).returncode == 0
    try:
        yield
    finally:
        for host in (host_a, host_b):
            host.remove_ct(CTID)


def test_a_ct_changing_its_files_migrates_with_only_the_changes_sent_frozen(
    host_a: TestHost, host_b: TestHost, busy_ct: None
) -> None:
    counter = host_a.path(f"/vz/private/{CTID}/var/mut/counter")
    assert _wait_for(counter), "the CT's mutator never wrote its counter"
    result = host_a.run(["vzpy", "migrate", "--online", "--json", "-r", "no", host_b.address, CTID], timeout=300)
    assert result.returncode == 0, result.stderr
    # the changes-only path was taken (not the whole tree), and the destination's restore found the tree equal
    # to the frozen source's (its fingerprint check refuses a restore otherwise)
    assert "final sync: " in result.stderr and "final sync of the whole tree" not in result.stderr
    status = json.loads(host_b.run(["vzpy", "status", "--json", CTID]).stdout)
    assert status["status"] == "running"
    kept = host_a.path(f"/vz/private/{CTID}.migrated/var/mut/counter")
    moved = host_b.path(f"/vz/private/{CTID}/var/mut/counter")
    assert int(moved.read_text()) >= int(kept.read_text())  # it went on from where it was frozen


def _wait_for(path: Path) -> bool:
    for _ in range(200):
        if path.exists() and path.read_text().strip():
            return True
        time.sleep(0.05)
    return False
