"""Nothing a CT does to its own files reaches the host, and no config value hands a host directory to a CT.

Real CTs through the real `vzpy` command line. The "host files" a hostile CT aims at are files under the
test's tmp_path (never real system files); a CT reaches for them with symlinks (absolute, or climbing
with ..) planted where vzpy writes from the host side.

What vzpy does with a planted link is what the CT itself would see: the CT's /etc/hostname is replaced by
a regular file holding the hostname (the command succeeds, exit 0); a directory link that leads nowhere
inside the CT means there is no file to write. The host file is never touched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root

HOST_DATA = "host data\n"


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    target = tmp_path / "host" / "victim"
    target.parent.mkdir()
    target.write_text(HOST_DATA)
    return target


def link_to(host_path: Path, kind: str) -> str:
    """A symlink target that reaches `host_path` if followed on the host: absolute, or climbing out with .."""
    return str(host_path) if kind == "absolute" else "../" * 16 + str(host_path).lstrip("/")


def in_ct(vz: VzRoot, ctid: str, script: str) -> None:
    vz.run("exec", ctid, "sh", "-c", script, check=True)


def host_tree(path: Path) -> dict[str, str]:
    """Every file under `path` (links not followed): its text (small files), its sha256, or its link target."""
    tree = {}
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(top, name)
            key = str(entry.relative_to(path))
            if entry.is_symlink():
                tree[key] = f"-> {os.readlink(entry)}"
            elif entry.is_file():
                data = entry.read_bytes()
                tree[key] = data.decode() if len(data) < 256 else hashlib.sha256(data).hexdigest()
    return tree


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(f"{path}/")]


# --- /etc/hostname: written by `set --hostname` (running CT) and by every `start`


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_set_hostname_replaces_a_planted_symlink_and_leaves_the_host_file(
    running_ct: tuple[VzRoot, str, str], host_file: Path, kind: str
) -> None:
    vz, ctid, _ = running_ct
    in_ct(vz, ctid, f"rm /etc/hostname && ln -s {link_to(host_file, kind)} /etc/hostname")
    result = vz.run("set", ctid, "--hostname", "renamed", "--save")
    assert result.returncode == 0, result.stderr
    assert host_file.read_text() == HOST_DATA
    written = vz.private(ctid) / "etc" / "hostname"
    assert not written.is_symlink() and written.read_text() == "renamed\n"
    assert vz.run("exec", ctid, "hostname", check=True).stdout == "renamed\n"


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_restart_replaces_a_planted_symlink_and_leaves_the_host_file(
    running_ct: tuple[VzRoot, str, str], host_file: Path, kind: str
) -> None:
    vz, ctid, _ = running_ct
    in_ct(vz, ctid, f"rm /etc/hostname && ln -s {link_to(host_file, kind)} /etc/hostname")
    assert vz.run("stop", ctid).returncode == 0
    result = vz.run("start", ctid)
    assert result.returncode == 0, result.stderr
    assert host_file.read_text() == HOST_DATA
    written = vz.private(ctid) / "etc" / "hostname"
    assert not written.is_symlink() and written.read_text() == "ct101.test\n"


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_an_etc_linked_to_a_host_directory_gets_nothing_written_there(
    running_ct: tuple[VzRoot, str, str], host_file: Path, kind: str
) -> None:
    vz, ctid, _ = running_ct
    in_ct(vz, ctid, f"mv /etc /etc.real && ln -s {link_to(host_file.parent, kind)} /etc")
    assert vz.run("set", ctid, "--hostname", "renamed", "--save").returncode == 0
    assert vz.run("stop", ctid).returncode == 0
    assert vz.run("start", ctid).returncode == 0
    assert host_tree(host_file.parent) == {"victim": HOST_DATA}


def test_a_hostname_that_cannot_be_written_in_the_ct_fails_set_clearly(running_ct: tuple[VzRoot, str, str]) -> None:
    vz, ctid, _ = running_ct
    in_ct(vz, ctid, "rm /etc/hostname && mkdir /etc/hostname")
    result = vz.run("set", ctid, "--hostname", "renamed", "--save")
    assert result.returncode == 8
    assert "cannot write /etc/hostname inside the CT root" in result.stderr
    assert "fix or remove the CT's /etc/hostname" in result.stderr


# --- create: the template goes into the CT's own private area only


def test_create_refuses_a_private_area_that_is_a_symlink_to_a_host_directory(vzroot: VzRoot, tmp_path: Path) -> None:
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    vzroot.private("101").parent.mkdir(parents=True)
    vzroot.private("101").symlink_to(host_dir)
    result = vzroot.run("create", "101", "--ostemplate", "minimal")
    assert result.returncode == 44, result.stderr
    assert list(host_dir.iterdir()) == []
    assert not (vzroot.base / "etc" / "conf" / "101.conf").exists()


# --- config paths: refused with file:line before anything is mounted or written


@pytest.fixture
def two_cts(vzroot: VzRoot) -> Iterator[VzRoot]:
    """Stopped CTs 101 and 102, each with a file in its private area."""
    for ctid in ("101", "102"):
        vzroot.run("create", ctid, "--ostemplate", "minimal", check=True)
        (vzroot.private(ctid) / "root" / "data").write_text(f"data of {ctid}\n")
    yield vzroot


def add_conf_line(vz: VzRoot, ctid: str, key: str, value: str) -> str:
    """Append KEY="value" (the last one counts) to CTID.conf; returns "file:line" of it."""
    conf = vz.base / "etc" / "conf" / f"{ctid}.conf"
    lines = [*conf.read_text().splitlines(), f'{key}="{value}"']
    conf.write_text("\n".join(lines) + "\n")
    return f"{conf}:{len(lines)}"


BAD_AREAS = {
    "relative private": ("VE_PRIVATE", "private/101"),
    "private equals root": ("VE_PRIVATE", "{base}/root/101"),
    "root inside private": ("VE_ROOT", "{base}/private/101/mnt"),
    "private inside root": ("VE_PRIVATE", "{base}/root/101/private"),
    "another CT's private": ("VE_PRIVATE", "{base}/private/102"),
    "another CT's root": ("VE_ROOT", "{base}/root/102"),
    "containing another CT's private": ("VE_PRIVATE", "{base}/private"),
}
OPERATIONS = {
    "start": ("start",),
    "set": ("set", "--hostname", "renamed", "--save"),
    "destroy": ("destroy",),
}


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("case", BAD_AREAS)
def test_bad_area_paths_are_refused_before_anything_is_touched(
    two_cts: VzRoot, tmp_path: Path, case: str, operation: str
) -> None:
    vz = two_cts
    key, value = BAD_AREAS[case]
    where = add_conf_line(vz, "101", key, value.format(base=vz.base))
    before = {ctid: host_tree(vz.private(ctid)) for ctid in ("101", "102")}
    result = vz.run(*OPERATIONS[operation], "101", cwd=tmp_path)
    assert result.returncode == 85, result.stderr
    assert result.stderr.startswith("vzpy: error: ") and f"{where}" in result.stderr
    assert f'{key} "{value.format(base=vz.base)}"' in result.stderr
    assert mounts_under(vz.base) == []
    assert {ctid: host_tree(vz.private(ctid)) for ctid in ("101", "102")} == before
    assert list(tmp_path.glob("private")) == []  # a relative path was not made under the cwd either
    assert vz.run("status", "101").stdout == "CTID 101 exist unmounted down\n"


@pytest.mark.parametrize("with_fs", [False, True], ids=["processes", "with-fs"])
def test_restore_into_another_cts_private_area_is_refused(two_cts: VzRoot, with_fs: bool) -> None:
    vz = two_cts
    vz.run("start", "101", check=True)
    if with_fs:
        vz.run("chkpnt", "101", "--snapshot", "--with-fs", check=True)
        vz.run("stop", "101", check=True)
    else:
        vz.run("chkpnt", "101", check=True)  # saves the CT and stops it
    where = add_conf_line(vz, "101", "VE_PRIVATE", str(vz.private("102")))
    before = host_tree(vz.private("102"))
    result = vz.run("restore", "101")
    assert result.returncode == 85, result.stderr
    assert f'{where}: VE_PRIVATE "{vz.private("102")}" overlaps CT 102\'s VE_PRIVATE' in result.stderr
    assert host_tree(vz.private("102")) == before
    assert mounts_under(vz.base) == []
    waits = "" if with_fs else " suspended"  # the refused restore changed nothing: chkpnt's dump still waits
    assert vz.run("status", "101").stdout == f"CTID 101 exist unmounted down{waits}\n"


def test_root_over_a_non_empty_host_directory_is_not_mounted_over(vzroot: VzRoot, tmp_path: Path) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "victim").write_text(HOST_DATA)
    add_conf_line(vzroot, "101", "VE_ROOT", str(host_dir))
    result = vzroot.run("start", "101")
    assert result.returncode == 50, result.stderr
    assert f"VE_ROOT {host_dir} of CT 101 is not empty" in result.stderr
    assert mounts_under(tmp_path) == []
    assert host_tree(host_dir) == {"victim": HOST_DATA}


# --- destroy: only the CT's own areas go


def test_destroy_removes_links_to_host_files_not_the_files(
    running_ct: tuple[VzRoot, str, str], host_file: Path
) -> None:
    vz, ctid, _ = running_ct
    links = " && ".join(
        f"ln -s {link_to(target, kind)} /root/{name}-{kind}"
        for kind in ("absolute", "relative")
        for name, target in (("file", host_file), ("dir", host_file.parent))
    )
    in_ct(vz, ctid, links)
    assert vz.run("stop", ctid).returncode == 0
    result = vz.run("destroy", ctid)
    assert result.returncode == 0, result.stderr
    assert not vz.private(ctid).exists()
    assert host_tree(host_file.parent) == {"victim": HOST_DATA}


def test_destroy_refuses_to_delete_through_a_mount_in_the_private_area(vzroot: VzRoot, host_file: Path) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    mount_point = vzroot.private("101") / "mnt"
    mount_point.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", host_file.parent, mount_point], check=True)
    try:
        result = vzroot.run("destroy", "101")
        assert host_tree(host_file.parent) == {"victim": HOST_DATA}
        assert result.returncode == 52, result.stderr
        assert f"{mount_point} is mounted inside CT 101's areas" in result.stderr
        assert (vzroot.base / "etc" / "conf" / "101.conf").exists()
    finally:
        subprocess.run(["umount", mount_point], check=True)
    assert vzroot.run("destroy", "101").returncode == 0
    assert host_tree(host_file.parent) == {"victim": HOST_DATA}


def test_start_with_kernel_dirs_linked_to_host_directories_leaves_them_alone(vzroot: VzRoot, tmp_path: Path) -> None:
    vzroot.run("create", "101", "--ostemplate", "minimal", check=True)
    host_dirs = {sub: tmp_path / f"host-{sub}" for sub in ("proc", "sys", "dev")}
    for sub, host_dir in host_dirs.items():
        host_dir.mkdir()
        (host_dir / "victim").write_text(HOST_DATA)
        os.rmdir(vzroot.private("101") / sub)
        (vzroot.private("101") / sub).symlink_to(host_dir)
    result = vzroot.run("start", "101")
    assert result.returncode == 3
    assert "is not a directory of the CT" in result.stderr
    for host_dir in host_dirs.values():
        assert host_tree(host_dir) == {"victim": HOST_DATA}
    assert mounts_under(tmp_path) == []
