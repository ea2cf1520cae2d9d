"""create_debian for real: debootstrap from Debian's mirror, pack, install, and run the vzpy init in it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vzpy.templates import TemplateStore, init_script, resolve_in

pytestmark = [pytest.mark.root, pytest.mark.slow]

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[TemplateStore, Path, list[str]]:
    store = TemplateStore(tmp_path_factory.mktemp("template-cache") / "template")
    lines: list[str] = []
    tarball = store.create_debian(progress=lines.append)
    return store, tarball, lines


@pytest.fixture(scope="module")
def private(built: tuple[TemplateStore, Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store, _, _ = built
    private = tmp_path_factory.mktemp("vz") / "private/101"
    store.install("debian-12", private)
    return private


def test_create_debian_packs_one_tarball(built: tuple[TemplateStore, Path, list[str]]) -> None:
    store, tarball, lines = built
    assert tarball == store.cache_dir / "debian-12.tar.zst"
    assert [entry.name for entry in store.cache_dir.iterdir()] == ["debian-12.tar.zst"]
    assert store.names() == ["debian-12", "minimal"]
    assert any("debootstrap" in line for line in lines)
    assert lines[-1].startswith("template debian-12 ready")


def test_installed_debian_is_a_vzpy_ct(private: Path) -> None:
    assert (private / "etc/debian_version").read_text().startswith("12.")
    init = resolve_in(private, "/sbin/vzpy-init")
    assert init is not None and init.read_bytes() == init_script()
    assert resolve_in(private, "/sbin/init") == init
    assert resolve_in(private, "/bin/sh") is not None
    assert (private / "etc/vzpy/services").is_dir()
    assert (private / "etc/hostname").read_text() == "localhost\n"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(private / "tmp").st_mode) == 0o1777
    assert os.stat(private / "usr/bin/passwd").st_mode & stat.S_ISUID
    assert list((private / "var/cache/apt/archives").glob("*.deb")) == []


def test_vzpy_init_runs_under_debian_dash(private: Path, tmp_path: Path) -> None:
    service = private / "etc/vzpy/services/10-hello"
    service.write_text('#!/bin/sh\necho "$(cat /etc/debian_version)" >/tmp/hello\nexec sleep 1000\n')
    os.chmod(service, 0o755)
    if not (private / "dev/null").exists():
        os.mknod(private / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "chroot", private, "/sbin/init"]
    with open(tmp_path / "init.log", "wb") as log:
        starter = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    children = Path(f"/proc/{starter.pid}/task/{starter.pid}/children")
    try:
        _wait_for(lambda: (private / "run/vzpy-init.ready").exists() and (private / "tmp/hello").exists())
        init_pid = int(children.read_text().split()[0])
        assert Path(f"/proc/{init_pid}/exe").resolve().name == "dash"
        os.kill(init_pid, signal.SIGTERM)
        assert starter.wait(timeout=TIMEOUT) == 0, (tmp_path / "init.log").read_text()
    finally:
        if starter.poll() is None:
            for pid in children.read_text().split():
                os.kill(int(pid), signal.SIGKILL)  # ends the whole pid namespace
            starter.wait(timeout=TIMEOUT)
    assert (private / "tmp/hello").read_text().startswith("12.")


def _wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s"
        time.sleep(0.05)


def test_a_debian_ct_runs_and_survives_chkpnt_restore(
    built: tuple[TemplateStore, Path, list[str]], tmp_path: Path
) -> None:
    """What operators run: a CT from the real Debian template, started, entered, checkpointed, restored."""
    from helpers import VzRoot

    processes = ("sh", "-c", r'for p in /proc/[0-9]*; do tr "\0" " " <"$p/cmdline"; echo; done')
    _, tarball, _ = built
    vz = VzRoot(tmp_path / "vz", "debian")
    try:
        (vz.base / "template").mkdir()
        os.link(tarball, vz.base / "template" / tarball.name)
        ip = vz.new_ip()
        vz.run("create", "301", "--ostemplate", "debian-12", "--ipadd", ip, "--hostname", "deb.test", check=True)
        vz.add_service("301", "sleeper", "exec /bin/sleep infinity")
        vz.run("start", "301", check=True)
        assert vz.run("exec", "301", "cat", "/etc/debian_version", check=True).stdout.startswith("12.")
        assert vz.run("exec", "301", "hostname", check=True).stdout == "deb.test\n"
        assert "sleep infinity" in vz.run("exec", "301", *processes, check=True).stdout
        vz.run("chkpnt", "301", check=True)
        assert "down" in vz.run("status", "301").stdout
        vz.run("restore", "301", check=True)
        assert "sleep infinity" in vz.run("exec", "301", *processes, check=True).stdout
        vz.run("stop", "301", check=True)
    finally:
        vz.cleanup()
