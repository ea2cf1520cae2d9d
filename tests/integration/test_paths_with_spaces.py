"""A VE_ROOT and VE_PRIVATE with spaces in them: mountinfo writes a space as \\040, so every mount check must
unescape it (issue 11). Real CTs through the real command line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VzRoot, http_get
from vzpy.host import mounts

pytestmark = pytest.mark.root


@pytest.fixture
def spaced(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VzRoot]:
    root = VzRoot(tmp_path / "vz with spaces", request.node.name[:20])
    try:
        yield root
    finally:
        root.cleanup()


def _mount_count(path: Path) -> int:
    return sum(1 for m in mounts.mounts() if m.point == os.fspath(path))


def test_create_start_stop_destroy_with_spaces_in_ve_root(spaced: VzRoot) -> None:
    vz, ctid, ip = spaced, "101", spaced.new_ip()
    root, private = vz.base / "root" / ctid, vz.private(ctid)
    assert " " in os.fspath(root) and " " in os.fspath(private)
    vz.run("create", ctid, "--ostemplate", "minimal", "--ipadd", ip, check=True)
    (private / "var" / "www").mkdir(parents=True, exist_ok=True)
    (private / "var" / "www" / "index.html").write_text("spaced\n")
    vz.add_service(ctid, "httpd", "exec httpd -f -p 80 -h /var/www")

    vz.run("start", ctid, check=True)
    assert _mount_count(root) == 1
    assert vz.run("status", ctid).stdout == f"CTID {ctid} exist mounted running\n"
    assert http_get(ip) == "spaced\n"
    assert vz.run("exec", ctid, "cat", "/var/www/index.html", check=True).stdout == "spaced\n"

    vz.run("stop", ctid, check=True)
    assert _mount_count(root) == 0
    assert vz.run("status", ctid).stdout == f"CTID {ctid} exist unmounted down\n"

    # a second start must not stack a second bind mount on the first
    vz.run("start", ctid, check=True)
    assert _mount_count(root) == 1
    vz.run("stop", ctid, check=True)
    assert _mount_count(root) == 0

    vz.run("destroy", ctid, check=True)
    assert not private.exists()
    assert not root.exists()
    assert vz.run("status", ctid).stdout == f"CTID {ctid} deleted unmounted down\n"


def test_ve_root_through_a_symlink_is_mounted_and_unmounted_once(spaced: VzRoot) -> None:
    vz, ctid = spaced, "102"
    (vz.base / "real root").mkdir()
    (vz.base / "root").symlink_to(vz.base / "real root")
    vz.run("create", ctid, "--ostemplate", "minimal", check=True)
    real = vz.base / "real root" / ctid
    for _ in range(2):
        vz.run("start", ctid, check=True)
        assert _mount_count(real) == 1
        assert vz.run("status", ctid).stdout == f"CTID {ctid} exist mounted running\n"
        vz.run("stop", ctid, check=True)
        assert _mount_count(real) == 0
    vz.run("destroy", ctid, check=True)
    assert not real.exists()


def test_chkpnt_and_restore_with_spaces_in_ve_root(spaced: VzRoot) -> None:
    vz, ctid, ip = spaced, "103", spaced.new_ip()
    vz.run("create", ctid, "--ostemplate", "minimal", "--ipadd", ip, check=True)
    (vz.private(ctid) / "var" / "www").mkdir(parents=True, exist_ok=True)
    (vz.private(ctid) / "var" / "www" / "index.html").write_text("spaced\n")
    vz.add_service(ctid, "httpd", "exec httpd -f -p 80 -h /var/www")
    vz.run("start", ctid, check=True)
    dumpfile = vz.base / "dump dir" / f"Dump {ctid}"
    dumpfile.parent.mkdir()
    vz.run("chkpnt", ctid, "--dumpfile", str(dumpfile), check=True, timeout=120)
    assert _mount_count(vz.base / "root" / ctid) == 0
    vz.run("restore", ctid, "--dumpfile", str(dumpfile), check=True, timeout=120)
    assert _mount_count(vz.base / "root" / ctid) == 1
    assert http_get(ip) == "spaced\n"
    vz.run("stop", ctid, check=True)
    assert _mount_count(vz.base / "root" / ctid) == 0
