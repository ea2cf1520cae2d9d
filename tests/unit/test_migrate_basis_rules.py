"""The CT's old private area (PRIVATE.migrated) as the first sync's rsync basis: the agent's side (which area
qualifies, the hard-link tree rsync is given, rollback and retirement) and real rsync's behaviour with it
(local, through a stand-in remote shell: no root, no network)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import write_vz_conf
from vzpy.config import GlobalConfig
from vzpy.migrate import CopyFailed, ops
from vzpy.migrate.agent import serve
from vzpy.migrate.destination import BASIS_DIR, build_basis, old_area
from vzpy.migrate.protocol import Client, Connection, FdStream
from vzpy.migrate.remote import RemoteAgent
from vzpy.migrate.rsync import BASE_OPTIONS, basis_options, rsync_argv, run_rsync
from vzpy.migrate.session import AgentSession
from vzpy.migrate.ssh import OpenSsh, Target

MTIME = 1_700_000_000


def write(path: Path, data: bytes, mtime: int = MTIME) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def state(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every entry under root: mode, size, mtime_ns and content (file) or target (link)."""
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        what: bytes | str = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else ""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, what)
    return found


# --- rsync's argv ----------------------------------------------------------------------------------------


def test_a_basis_adds_checksum_and_copy_dest_before_the_transport() -> None:
    ssh = OpenSsh(Target("root", "10.231.0.2", 2222), Path("/root/.ssh/known_hosts"), None, 5, prefer_gcm=False)
    argv = rsync_argv(Path("/vz/private/101"), "/vz/private/101", ssh, basis="/vz/dump/Migrate.101/basis")
    e = argv.index("-e")
    assert argv[1:e] == [*BASE_OPTIONS, "--checksum", "--copy-dest=/vz/dump/Migrate.101/basis"]
    assert "--checksum" not in rsync_argv(Path("/vz/private/101"), "/vz/private/101", ssh)
    for bad in ("relative/basis", "/a\nb"):
        with pytest.raises(CopyFailed, match="basis"):
            basis_options(bad)


# --- real rsync with a basis -------------------------------------------------------------------------------


@pytest.fixture
def remote_shell(tmp_path: Path) -> Path:
    """An rsh that runs the remote rsync here: rsync then works as over ssh (sender and receiver apart, so the
    delta algorithm and the stats are those of a real migration)."""
    rsh = tmp_path / "rsh"
    rsh.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    rsh.chmod(0o755)
    return rsh


def sync(source: Path, dest: Path, rsh: Path, basis: Path | None) -> int:
    """rsync as sync_tree runs it; rsync's "Total bytes sent"."""
    options = [*BASE_OPTIONS, *basis_options(str(basis) if basis else None)]
    argv = ["rsync", *options, "-e", str(rsh), "--", f"{source}/", f"here:{dest}/"]
    return run_rsync(argv, timeout=60).sent


def test_unchanged_files_come_from_the_basis_as_copies_with_the_sources_attributes(
    tmp_path: Path, remote_shell: Path
) -> None:
    source, old, dest = tmp_path / "src", tmp_path / "101.migrated", tmp_path / "101"
    data = os.urandom(4 << 20)
    write(source / "var" / "big", data)
    write(old / "var" / "big", data, mtime=MTIME - 3600)  # same content, older mtime, other mode
    (old / "var" / "big").chmod(0o600)
    os.setxattr(old / "var" / "big", "user.planted", b"by the old area")
    (source / "var" / "big").chmod(0o644)
    dest.mkdir()
    build_basis(old, tmp_path / "basis")
    sent = sync(source, dest, remote_shell, tmp_path / "basis")
    arrived = dest / "var" / "big"
    assert arrived.read_bytes() == data and sent < len(data) // 100
    assert (arrived.stat().st_mode & 0o777, arrived.stat().st_mtime) == (0o644, MTIME)
    assert arrived.stat().st_ino != (old / "var" / "big").stat().st_ino  # a copy: the CT cannot write the old area
    assert os.listxattr(arrived) == []  # extended attributes (file capabilities...) are the source's too


def test_a_planted_file_of_the_same_size_and_mtime_does_not_leak_into_the_arriving_ct(
    tmp_path: Path, remote_shell: Path
) -> None:
    source, old, dest = tmp_path / "src", tmp_path / "101.migrated", tmp_path / "101"
    theirs = os.urandom(1 << 20)
    planted = os.urandom(1 << 20)
    write(source / "etc" / "shadow", theirs)
    write(old / "etc" / "shadow", planted)  # same size, same mtime, same mode: rsync's quick check matches
    (old / "etc" / "shadow").chmod((source / "etc" / "shadow").stat().st_mode & 0o7777)
    dest.mkdir()
    build_basis(old, tmp_path / "basis")
    sync(source, dest, remote_shell, tmp_path / "basis")
    assert (dest / "etc" / "shadow").read_bytes() == theirs


def test_a_directory_symlink_in_the_old_area_does_not_lead_rsync_to_host_files(
    tmp_path: Path, remote_shell: Path
) -> None:
    """The CT left `etc -> HOST` in its old area and now has etc/secret equal to a host file (a guess it wants
    confirmed). Through the old area itself rsync would resolve etc/secret to the host's file, read it and
    copy it instead of receiving it (the stats would say so); through the basis tree it is sent."""
    source, old, dest, host = tmp_path / "src", tmp_path / "101.migrated", tmp_path / "101", tmp_path / "host"
    secret = os.urandom(2 << 20)
    write(host / "secret", secret)
    write(source / "etc" / "secret", secret)
    old.mkdir()
    (old / "etc").symlink_to(host)
    (old / "lnk").symlink_to(host / "secret")
    dest.mkdir()
    build_basis(old, tmp_path / "basis")
    sent = sync(source, dest, remote_shell, tmp_path / "basis")
    assert sent > len(secret)  # received from the source, not copied from the host's file
    assert (dest / "etc" / "secret").read_bytes() == secret and not (dest / "etc").is_symlink()


def test_the_basis_tree_holds_only_the_old_areas_regular_files_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    old, basis = tmp_path / "101.migrated", tmp_path / "basis"
    write(old / "a" / "b" / "file", b"data")
    write(old / "top", b"top")
    (old / "dirlink").symlink_to("/etc")
    (old / "a" / "filelink").symlink_to("/etc/hostname")
    os.mkfifo(old / "a" / "fifo")
    before = state(old)
    assert build_basis(old, basis) == 2
    assert state(basis).keys() == {"a", "a/b", "a/b/file", "top"}
    assert not any(p.is_symlink() for p in basis.rglob("*"))
    assert (basis / "a" / "b" / "file").stat().st_ino == (old / "a" / "b" / "file").stat().st_ino
    assert state(old) == before
    write(basis / "stale", b"x")
    assert build_basis(old, basis) == 2 and not (basis / "stale").exists()  # rebuilt from scratch


def test_which_old_area_may_serve(tmp_path: Path) -> None:
    gconf = GlobalConfig.load(write_vz_conf(tmp_path / "vz.conf", tmp_path))
    private = gconf.ve_private("101")
    old = private.with_name("101.migrated")
    private.parent.mkdir(parents=True, exist_ok=True)
    assert old_area("101", private, gconf) is None  # none there
    old.symlink_to(tmp_path)
    assert old_area("101", private, gconf) is None  # a symlink
    old.unlink()
    old.write_text("")
    assert old_area("101", private, gconf) is None  # not a directory
    old.unlink()
    old.mkdir()
    assert old_area("101", private, gconf) == old
    # CTIDs may contain dots: CT "101.migrated" has this very directory as its private area
    gconf.confdir.mkdir(parents=True, exist_ok=True)
    (gconf.confdir / "101.migrated.conf").write_text('HOSTNAME="other"\n')
    assert old_area("101", private, gconf) is None


# --- the agent: prepare offers it, a rollback leaves it, the commit retires it -------------------------------


class Served:
    def __init__(self, gconf: GlobalConfig) -> None:
        self.agent = AgentSession(lambda: gconf)
        self.sock, self.theirs = socket.socketpair()
        theirs = self.theirs
        ours = Connection(FdStream(self.sock.fileno(), self.sock.fileno()), peer="agent")
        self.remote = RemoteAgent(Client(ours, timeout=10), {})
        connection = Connection(FdStream(theirs.fileno(), theirs.fileno()), peer="source")
        self.thread = threading.Thread(target=lambda: serve(self.agent, connection), daemon=True)
        self.thread.start()
        self.remote.client.hello()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Served, GlobalConfig]]:
    facts = {"hostname": "dst", "criu": {"ok": True}, "cpu": {"flags": []}, "disk": {}, "config": {}}
    monkeypatch.setattr(ops, "host_facts", lambda gconf: facts)
    gconf = GlobalConfig.load(write_vz_conf(tmp_path / "vz.conf", tmp_path))
    s = Served(gconf)
    yield s, gconf
    s.sock.shutdown(socket.SHUT_RDWR)
    s.thread.join(10)


def old_area_of(gconf: GlobalConfig, ctid: str) -> Path:
    private = gconf.ve_private(ctid)
    old = private.with_name(private.name + ".migrated")
    write(old / "etc" / "file", b"old")
    (old / "etc" / "link").symlink_to("/etc")
    return old


def test_prepare_offers_the_basis_and_a_rollback_leaves_the_old_area_as_it_was(served) -> None:
    s, gconf = served
    old = old_area_of(gconf, "101")
    before = state(old)
    paths = s.remote.prepare("101", 'HOSTNAME="x"\n', token="t")
    basis = Path(paths["rsync_basis"])
    assert basis == Path(paths["workdir"]) / BASIS_DIR and (basis / "etc" / "file").read_bytes() == b"old"
    assert s.remote.prepare("101", 'HOSTNAME="x"\n', token="t") == paths  # a retried request
    s.remote.cleanup("101", keep_dst=True)  # even the rollback that keeps the synced area drops the basis
    assert not basis.exists() and state(old) == before


def test_the_commit_retires_the_old_area_it_used(served) -> None:
    s, gconf = served
    old = old_area_of(gconf, "102")
    s.remote.prepare("102", 'HOSTNAME="x"\n', token="t")
    s.remote.start("102", start=False, timeout=10)
    for thread in [t for t in threading.enumerate() if t.name == "retire"]:
        thread.join(30)
    assert not old.exists() and not list(old.parent.glob("102.migrated*"))


def test_no_basis_from_an_area_that_does_not_qualify_yet_the_commit_removes_the_link_only(served) -> None:
    s, gconf = served
    private = gconf.ve_private("103")
    private.parent.mkdir(parents=True, exist_ok=True)
    elsewhere = write(private.parent / "elsewhere" / "file", b"x").parent
    private.with_name("103.migrated").symlink_to(elsewhere)
    assert "rsync_basis" not in s.remote.prepare("103", 'HOSTNAME="x"\n', token="t")
    s.remote.start("103", start=False, timeout=10)
    for thread in [t for t in threading.enumerate() if t.name == "retire"]:
        thread.join(30)
    assert not list(private.parent.glob("103.migrated*")) and (elsewhere / "file").read_bytes() == b"x"
