"""Templates: the store's names, install's refusals and cleanup, the minimal build, and the vzpy init run for real."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import require_real
from vzpy import templates
from vzpy.errors import BadTemplate, CommandFailed, InvalidValue, PrivateExists, SystemFailure, TemplateNotFound
from vzpy.templates import TemplateStore, init_script, resolve_in

WAIT_TIMEOUT = 10.0
# the init's 5 s grace, stretched by load, and the rest of its stop
STUBBORN_STOP_TIMEOUT = 120.0


def make_tarball(tarball: Path, tree: Path) -> Path:
    flag = {".zst": "--zstd", ".xz": "--xz", ".gz": "--gzip"}[tarball.suffix]
    subprocess.run(["tar", "--create", flag, "--file", tarball, "--directory", tree, "."], check=True)
    return tarball


def make_tree(root: Path, links: dict[str, str] | None = None) -> Path:
    """A tiny CT tree: an executable bin/busybox stand-in and the given symlinks (default: sh and init)."""
    (root / "bin").mkdir(parents=True)
    (root / "sbin").mkdir()
    (root / "bin/busybox").write_text("#!/bin/true\n")
    os.chmod(root / "bin/busybox", 0o755)
    for path, target in (links or {"bin/sh": "busybox", "sbin/init": "../bin/busybox"}).items():
        (root / path).symlink_to(target)
    return root


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "cache")


@pytest.fixture(scope="module")
def minimal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minimal") / "private"
    TemplateStore(root.parent / "cache").install("minimal", root)
    return root


# --- names ---------------------------------------------------------------------------------------


def test_names_without_cache_dir_is_just_minimal(store: TemplateStore) -> None:
    assert store.names() == ["minimal"]
    assert not store.cache_dir.exists()


def test_names_lists_tarballs_sorted_once_each(store: TemplateStore) -> None:
    store.cache_dir.mkdir()
    for filename in ("zeta.tar.gz", "alpha.tar.xz", "debian-12.tar.zst", "debian-12.tar.gz", "notes.txt", "a b.tar.gz"):
        (store.cache_dir / filename).write_bytes(b"")
    (store.cache_dir / ".debian-13.build-x").mkdir()
    (store.cache_dir / ".hidden.tar.zst").write_bytes(b"")
    (store.cache_dir / "adir.tar.gz").mkdir()
    assert store.names() == ["alpha", "debian-12", "minimal", "zeta"]


# --- install: refusals and cleanup ----------------------------------------------------------------


def test_unknown_template_is_not_found(store: TemplateStore, tmp_path: Path) -> None:
    store.cache_dir.mkdir()
    (store.cache_dir / "centos-7.tar.xz").write_bytes(b"")
    with pytest.raises(TemplateNotFound) as caught:
        store.install("debian-99", tmp_path / "private")
    message = caught.value.message
    assert caught.value.exit_code == 91
    assert "'debian-99'" in message and str(store.cache_dir) in message
    assert "available: centos-7, minimal" in message
    assert "vzpy template create debian-12" in message
    assert not (tmp_path / "private").exists()


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden"])
def test_bad_template_names_are_invalid(store: TemplateStore, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidValue):
        store.install(name, tmp_path / "private")


def test_corrupt_tarball_is_refused_and_leaves_no_private_area(store: TemplateStore, tmp_path: Path) -> None:
    store.cache_dir.mkdir()
    good = make_tarball(tmp_path / "good.tar.gz", make_tree(tmp_path / "tree"))
    (store.cache_dir / "broken.tar.gz").write_bytes(good.read_bytes()[:-200])
    private = tmp_path / "vz/private/101"
    with pytest.raises(BadTemplate) as caught:
        store.install("broken", private)
    assert caught.value.exit_code == 47
    assert "extracting template 'broken'" in caught.value.message
    assert caught.value.detail
    assert not private.exists()


def test_failed_install_into_existing_empty_dir_leaves_it_empty(store: TemplateStore, tmp_path: Path) -> None:
    store.cache_dir.mkdir()
    (store.cache_dir / "junk.tar.zst").write_bytes(b"not a tarball at all")
    private = tmp_path / "private"
    private.mkdir()
    with pytest.raises(BadTemplate):
        store.install("junk", private)
    assert private.is_dir() and not any(private.iterdir())


def test_non_empty_private_area_is_refused_untouched(store: TemplateStore, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "keep").write_text("mine")
    with pytest.raises(PrivateExists) as caught:
        store.install("minimal", private)
    assert caught.value.exit_code == 44
    assert (private / "keep").read_text() == "mine"


@pytest.mark.parametrize(
    ("links", "missing"),
    [
        ({"bin/sh": "busybox"}, "/sbin/init or /sbin/vzpy-init"),
        ({"sbin/init": "../bin/busybox"}, "/bin/sh"),
        # Absolute links are resolved inside the tree: the host's /usr/bin/env must not count.
        ({"bin/sh": "busybox", "sbin/init": "/usr/bin/env"}, "/sbin/init"),
    ],
)
def test_tree_without_init_or_shell_is_bad_template(
    store: TemplateStore, tmp_path: Path, links: dict[str, str], missing: str
) -> None:
    store.cache_dir.mkdir()
    make_tarball(store.cache_dir / "broken.tar.xz", make_tree(tmp_path / "tree", links))
    with pytest.raises(BadTemplate, match=missing):
        store.install("broken", tmp_path / "private")
    assert not (tmp_path / "private").exists()


@pytest.mark.root
@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.xz", ".tar.gz"])
def test_tarball_install_keeps_owners_modes_and_absolute_links(
    store: TemplateStore, tmp_path: Path, suffix: str
) -> None:
    tree = make_tree(tmp_path / "tree", {"bin/sh": "/bin/busybox", "sbin/init": "/bin/sh"})
    (tree / "tmp").mkdir(mode=0o1777)
    os.chmod(tree / "tmp", 0o1777)
    (tree / "secret").write_text("x")
    os.chown(tree / "secret", 4321, 8765)
    os.chmod(tree / "secret", 0o4750)
    store.cache_dir.mkdir()
    make_tarball(store.cache_dir / f"custom{suffix}", tree)
    private = tmp_path / "private"
    store.install("custom", private)
    info = os.lstat(private / "secret")
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4321, 8765, 0o4750)
    assert stat.S_IMODE(os.lstat(private / "tmp").st_mode) == 0o1777
    assert os.readlink(private / "sbin/init") == "/bin/sh"


def test_resolve_in_follows_links_inside_the_root(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {"bin/sh": "/bin/../bin/busybox", "sbin/loop": "loop"})
    (root / "usr").symlink_to("/")
    assert resolve_in(root, "/bin/sh") == root / "bin/busybox"
    assert resolve_in(root, "usr/bin/busybox") == root / "bin/busybox"
    assert resolve_in(root, "../../../bin/busybox") == root / "bin/busybox"
    assert resolve_in(root, "sbin/loop") is None
    assert resolve_in(root, "etc/passwd") is None


def test_install_refuses_a_private_area_that_is_a_symlink_to_a_host_dir(store: TemplateStore, tmp_path: Path) -> None:
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (tmp_path / "private").symlink_to(host_dir)
    with pytest.raises(PrivateExists, match="is a symlink"):
        store.install("minimal", tmp_path / "private")
    assert list(host_dir.iterdir()) == []


def test_install_init_follows_sbin_links_inside_the_tree_only(tmp_path: Path) -> None:
    inside = make_tree(tmp_path / "inside")
    shutil.rmtree(inside / "sbin")
    (inside / "usr/sbin").mkdir(parents=True)
    (inside / "sbin").symlink_to("usr/sbin")
    templates.install_init(inside)
    assert (inside / "usr/sbin/vzpy-init").read_bytes() == init_script()
    assert os.readlink(inside / "usr/sbin/init") == "vzpy-init"

    host_dir = tmp_path / "host-sbin"
    host_dir.mkdir()
    outside = make_tree(tmp_path / "outside")
    shutil.rmtree(outside / "sbin")
    (outside / "sbin").symlink_to(host_dir)  # absolute: inside the tree it leads nowhere
    with pytest.raises(BadTemplate, match="cannot install the vzpy init"):
        templates.install_init(outside)
    assert list(host_dir.iterdir()) == []


# --- create_debian: failures leave nothing behind -------------------------------------------------


@pytest.mark.root
def test_failed_debootstrap_leaves_no_build_dir_or_tarball(store: TemplateStore) -> None:
    lines: list[str] = []
    with pytest.raises(CommandFailed) as caught:
        store.create_debian("debian-x", suite="no-such-suite", progress=lines.append)
    assert "debootstrap no-such-suite" in caught.value.message
    assert "no-such-suite" in caught.value.detail
    assert lines and "debootstrap" in lines[0]
    assert list(store.cache_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["../debian", "minimal"])
def test_create_debian_refuses_bad_names(store: TemplateStore, name: str) -> None:
    with pytest.raises(InvalidValue):
        store.create_debian(name)
    assert not store.cache_dir.exists()


@pytest.mark.root
def test_build_dir_removal_unmounts_what_is_mounted_below(tmp_path: Path) -> None:
    proc = tmp_path / "build/rootfs/proc"
    proc.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "leftover", proc], check=True)
    try:
        (proc / "file").write_text("on the tmpfs")
        templates._remove_tree(tmp_path / "build")
    finally:
        subprocess.run(["umount", "--lazy", proc], capture_output=True)
    assert not (tmp_path / "build").exists()
    assert str(proc) not in Path("/proc/self/mountinfo").read_text()


# --- the minimal template --------------------------------------------------------------------------


def test_minimal_has_busybox_shell_and_applets(minimal_root: Path) -> None:
    busybox = minimal_root / "bin/busybox"
    assert busybox.is_file() and not busybox.is_symlink()
    assert os.stat(busybox).st_mode & 0o111
    assert os.readlink(minimal_root / "bin/sh") == "busybox"
    assert os.readlink(minimal_root / "usr/bin/wget") == "../../bin/busybox"
    assert resolve_in(minimal_root, "sbin/ifconfig") == busybox
    assert not (minimal_root / "linuxrc").exists()


def test_minimal_init_is_the_vzpy_init(minimal_root: Path) -> None:
    init = resolve_in(minimal_root, "/sbin/init")
    assert init == minimal_root / "sbin/vzpy-init"
    assert init.read_bytes() == init_script()
    assert os.stat(init).st_mode & 0o777 == 0o755


def test_minimal_layout(minimal_root: Path) -> None:
    for path in ("etc", "proc", "sys", "run", "var/log", "var/www", "home", "usr/sbin"):
        assert (minimal_root / path).is_dir(), path
    assert stat.S_IMODE(os.stat(minimal_root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(minimal_root / "root").st_mode) == 0o700
    assert list((minimal_root / "dev").iterdir()) == []
    assert list((minimal_root / "etc/vzpy/services").iterdir()) == []
    assert "ID=vzpy-minimal\n" in (minimal_root / "etc/os-release").read_text()
    users = [line.split(":")[0] for line in (minimal_root / "etc/passwd").read_text().splitlines()]
    assert users == ["root", "nobody"]
    assert "PATH=" in (minimal_root / "etc/profile").read_text()
    for path in ("etc/group", "etc/hosts", "etc/hostname"):
        assert (minimal_root / path).read_text().strip(), path


def test_minimal_shell_runs(minimal_root: Path) -> None:
    busybox = minimal_root / "bin/busybox"
    result = subprocess.run([busybox, "sh", "-c", "echo $((6 * 7))"], capture_output=True, text=True)
    assert result.stdout == "42\n"


def test_minimal_needs_busybox(store: TemplateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(templates, "BUSYBOX", tmp_path / "no-busybox")
    with pytest.raises(SystemFailure, match="make setup"):
        store.install("minimal", tmp_path / "private")
    assert not (tmp_path / "private").exists()


def test_minimal_refuses_a_dynamic_busybox(
    store: TemplateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templates, "BUSYBOX", Path(os.path.realpath("/bin/sh")))
    with pytest.raises(SystemFailure, match="dynamically linked"):
        store.install("minimal", tmp_path / "private")
    assert not (tmp_path / "private").exists()


# --- the vzpy init, run for real -------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["/bin/busybox", "/bin/dash"])
def test_init_script_parses(shell: str) -> None:
    if not os.access(shell, os.X_OK):
        if require_real():  # make setup installs busybox-static, and Debian has dash: missing, it is broken
            pytest.fail(f"{shell} not installed", pytrace=False)
        pytest.skip(f"{shell} not installed")
    argv = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    subprocess.run([*argv, templates.INIT_SCRIPT], check=True, timeout=WAIT_TIMEOUT)


SERVICES = {
    "10-hello": "echo hello >/tmp/hello\nexec sleep 1000\n",
    # Leaves two orphans behind for the init to reap, and records the SIGTERM it gets at stop.
    "20-orphans": (
        "(sleep 0.2 &)\n(sleep 0.3 &)\n"
        "trap 'echo term >/tmp/got-term; exit 0' TERM\n"
        "while :; do sleep 1 & wait $!; done\n"
    ),
    "30-logs": "echo to-stdout\necho to-stderr >&2\nexec sleep 1000\n",
}
STUBBORN = {"40-stubborn": "trap '' TERM\necho >/tmp/stubborn\nexec sleep 1000\n"}


def _add_services(root: Path, services: dict[str, str]) -> None:
    for name, body in services.items():
        (root / "etc/vzpy/services" / name).write_text(f"#!/bin/sh\n{body}")
        os.chmod(root / "etc/vzpy/services" / name, 0o755)
    (root / "etc/vzpy/services/50-disabled").write_text("#!/bin/sh\necho ran >/tmp/disabled\n")


def _add_dash(root: Path) -> None:
    """Copy the host's dash and its libraries into `root`, to run the init under dash too."""
    dash = Path(os.path.realpath("/bin/dash"))
    ldd = subprocess.run(["ldd", dash], capture_output=True, text=True, check=True).stdout
    libraries = [word for word in ldd.split() if word.startswith("/")]
    for path in [str(dash), *libraries]:
        copy = root / path.lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
    (root / "bin/dash").symlink_to(os.path.relpath(root / str(dash).lstrip("/"), root / "bin"))


@pytest.fixture(params=["ash", "dash"])
def ct_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "root"
    TemplateStore(tmp_path / "cache").install("minimal", root)
    # The runtime mounts a populated /dev; this test only needs /dev/null.
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)
    if request.param == "dash":
        _add_dash(root)
        return root, ["/bin/dash", "/sbin/init"]
    return root, ["/sbin/init"]


class RunningInit:
    def __init__(self, starter: subprocess.Popen[bytes], pid: int, root: Path) -> None:
        self.starter = starter
        self.pid = pid
        self.root = root

    def children(self) -> list[int]:
        return [int(pid) for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def fd_targets(self) -> dict[int, str]:
        fds = Path(f"/proc/{self.pid}/fd")
        return {int(fd.name): os.readlink(fd) for fd in fds.iterdir()}

    def stop(self, timeout: float = WAIT_TIMEOUT) -> tuple[int, float]:
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        code = self.starter.wait(timeout=timeout)
        return code, time.monotonic() - started

    def stubborn_pid(self) -> int:
        """The child running the stubborn service's `sleep` (it exec'd, so it is the init's child)."""
        for pid in self.children():
            if _cmdline(pid) == ["sleep", "1000"] and _ignores_sigterm(pid):
                return pid
        raise AssertionError("no child of the init runs the stubborn service")


def _cmdline(pid: int) -> list[str]:
    return (read(Path(f"/proc/{pid}/cmdline")) or "").split("\0")[:-1]


def _ignores_sigterm(pid: int) -> bool:
    status = read(Path(f"/proc/{pid}/status")) or ""
    ignored = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(ignored, 16) & (1 << (signal.SIGTERM - 1)))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@contextmanager
def running_init(root: Path, command: list[str], log: Path) -> Iterator[RunningInit]:
    """The init as PID 1 of a new pid namespace, chrooted into `root` (enough for this test)."""
    argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "chroot", root, *command]
    with open(log, "wb") as out:
        starter = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        children = Path(f"/proc/{starter.pid}/task/{starter.pid}/children")
        wait_for(lambda: starter.poll() is not None or children.read_text().strip() != "", "the init")
        assert starter.poll() is None, log.read_text()
        yield RunningInit(starter, int(children.read_text().split()[0]), root)
    finally:
        _kill_namespace(starter)


def _kill_namespace(starter: subprocess.Popen[bytes]) -> None:
    """SIGKILL to a pid namespace's init ends every process in it."""
    children = read(Path(f"/proc/{starter.pid}/task/{starter.pid}/children")) or ""
    for pid in children.split():
        os.kill(int(pid), signal.SIGKILL)
    starter.wait(timeout=WAIT_TIMEOUT)


@pytest.mark.root
def test_init_runs_services_reaps_and_stops_cleanly(ct_root: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, command = ct_root
    _add_services(root, SERVICES)
    (root / "run/vzpy-init.ready").write_text("stale")
    with running_init(root, command, tmp_path / "init.log") as init:
        wait_for(lambda: read(root / "run/vzpy-init.ready") == "", "the ready marker")
        wait_for(lambda: read(root / "tmp/hello") == "hello\n", "the first service")
        wait_for(lambda: "to-stderr" in (read(root / "var/log/30-logs.log") or ""), "the service log")
        assert (root / "var/log/30-logs.log").read_text().splitlines() == ["to-stdout", "to-stderr"]
        time.sleep(1.0)
        assert not (root / "tmp/disabled").exists()
        assert [_state(pid) for pid in init.children() if _state(pid) == "Z"] == []
        assert init.cpu_ticks() < 30, "the init is busy-looping"
        assert all(fd < 3 or target.startswith(f"{root}/") for fd, target in init.fd_targets().items())
        code, elapsed = init.stop()
    assert code == 0, (tmp_path / "init.log").read_text()
    assert elapsed < 3.0
    assert (root / "tmp/got-term").read_text() == "term\n"


@pytest.mark.root
def test_init_kills_what_ignores_sigterm_after_5s(ct_root: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, command = ct_root
    _add_services(root, {**SERVICES, **STUBBORN})
    with running_init(root, command, tmp_path / "init.log") as init:
        wait_for(lambda: (root / "run/vzpy-init.ready").exists(), "the ready marker")
        wait_for(lambda: (root / "tmp/stubborn").exists(), "the stubborn service")
        wait_for(lambda: _has_stubborn_child(init), "the stubborn service's sleep")
        wait_for(lambda: _traps_sigterm(init, "20-orphans"), "the 20-orphans service's TERM trap")
        stubborn = init.stubborn_pid()
        # No upper bound on the time: the init's grace is 50 rounds of `sleep 0.1`, which a loaded machine
        # stretches. Only the lower bound is certain: nothing is killed before those 5 s have passed.
        code, elapsed = init.stop(timeout=STUBBORN_STOP_TIMEOUT)
        assert _state(stubborn) == "gone"
    assert code == 0, (tmp_path / "init.log").read_text()
    assert elapsed >= 5.0
    assert (root / "tmp/got-term").exists()


def _traps_sigterm(init: RunningInit, service: str) -> bool:
    """Whether the shell running `service` has its TERM trap set (a TERM before it would go unrecorded)."""
    for pid in init.children():
        if any(arg.endswith(f"/{service}") for arg in _cmdline(pid)):
            status = read(Path(f"/proc/{pid}/status")) or ""
            caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
            return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _has_stubborn_child(init: RunningInit) -> bool:
    try:
        init.stubborn_pid()
    except AssertionError:
        return False
    return True
