"""Peers of bench/chkpnt: what an operator would use instead of vzpy chkpnt/restore, on the same workload.

Podman (Debian 12's podman 4.3 with runc, `make bench-peers`) checkpoints a container whose only process is
bench/memhog touching the same memory as the CT: `podman container checkpoint --export FILE` (a zstd tar of
CRIU's images, Podman's default) and `podman container restore --import FILE` are timed, as an operator runs
them. Podman runs with private state made per run under /var/tmp: a containers.conf and a storage.conf
(selected with CONTAINERS_CONF and CONTAINERS_STORAGE_CONF), an image store holding one image imported from a
tarball of the static memhog binary (no registry), runtime state and network config dir; all of it, the
containers and their cgroups (under vzpy-bench-podman) are removed when the run ends, also when it fails.
Containers get `--network none`. Outside that directory Podman 4.3's `import` only updates its blob-info
cache, /var/lib/containers/cache (digests of layers seen; no config).

Which CRIU: Podman itself checks CRIU's version by running `criu` from PATH, and runc runs the binary its
`--criu` option names (default `criu`, looked up on PATH; conmon passes the runtime flag on for restore). So
the private directory's bin/criu, a link to vzpy's CRIU, comes first on PATH, conmon's PATH says the same
(containers.conf conmon_env_vars), and every podman call adds `--runtime-flag criu=CRIU`. Neither the host's
container config nor /usr/sbin/criu is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install it with `make bench-peers` (Debian's podman and runc; scripts/install-bench-peers.sh)"
PODMAN_TIMEOUT = 600  # seconds for one podman command (a 1 GiB checkpoint takes a few)
IMAGE = "localhost/vzpy-bench-memhog:latest"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# One name for every run: a vzpy CT restored elsewhere on the host may bring back empty cgroups of this run
# after it ended (see _remove_cgroups), and the next run removes them.
CGROUP_PARENT = "vzpy-bench-podman"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PeerFailed(Exception):
    """A peer's command failed; the message says which and what it printed."""


@dataclass(frozen=True)
class PeerRound:
    checkpoint: float  # seconds
    restore: float  # seconds


def podman_missing() -> str | None:
    """Why Podman cannot run here (a one-line reason with the fix), or None when it can."""
    missing = [tool for tool in ("podman", "runc", "conmon") if shutil.which(tool, path=HOST_PATH) is None]
    if missing:
        return f"{', '.join(missing)} not installed: {INSTALL_HINT}"
    return None


def containers_conf(state: Path, conmon_path: str, ulimits: dict[str, int]) -> str:
    """The private containers.conf: runc, no network, state under `state`, CRIU found on conmon's PATH."""
    limits = ", ".join(f'"{name}={value}:{value}"' for name, value in ulimits.items())
    return (
        "[containers]\n"
        'netns = "none"\n'
        f"default_ulimits = [{limits}]\n"
        "[network]\n"
        'network_backend = "cni"\n'
        f'network_config_dir = "{state}/net"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{state}/events.log"\n'
        f'tmp_dir = "{state}/tmp"\n'
        f'static_dir = "{state}/storage/libpod"\n'
        f'volume_path = "{state}/volumes"\n'
        f'conmon_env_vars = ["PATH={conmon_path}"]\n'
    )


def storage_conf(state: Path) -> str:
    return f'[storage]\ndriver = "overlay"\ngraphroot = "{state}/storage"\nrunroot = "{state}/run"\n'


def container_ulimits() -> dict[str, int]:
    """Limits the container may set without CAP_SYS_RESOURCE, which this machine's root lacks.

    Podman's defaults for root (nofile and nproc 1048576) are above the hard limits here, and runc fails
    raising them ("error setting rlimit type 7: operation not permitted"); memhog needs few of either.
    """
    wanted = {"nofile": (resource.RLIMIT_NOFILE, 1024), "nproc": (resource.RLIMIT_NPROC, 4096)}
    return {name: _capped(resource.getrlimit(which)[0], cap) for name, (which, cap) in wanted.items()}


def _capped(soft: int, cap: int) -> int:
    return cap if soft == resource.RLIM_INFINITY else min(soft, cap)


def write_rootfs_tar(tar_path: Path, hog: Path) -> None:
    """The container's whole root filesystem: the static memhog binary at /usr/bin/memhog."""
    with tarfile.open(tar_path, "w") as tar:
        for directory in ("usr", "usr/bin", "tmp"):
            entry = tarfile.TarInfo(directory)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(entry)
        tar.add(hog, arcname="usr/bin/memhog")


def mounts_under(mountinfo: str, top: Path) -> list[Path]:
    """Mount points at or below `top` in /proc/self/mountinfo text, deepest first (the order to unmount)."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = Path(_unescape_mountinfo(fields[4]))
        if point == top or top in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as 3-digit octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Podman:
    """Podman with private state; `with Podman(criu, hog) as podman: podman.round(mib, wait_rss)`."""

    def __init__(self, criu: str, hog: Path) -> None:
        self.criu = criu
        self.hog = hog
        self.state = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vzpy-bench-podman-"))
        self.cgroup_parent = CGROUP_PARENT
        bin_dir = self.state / "bin"
        self.path = f"{bin_dir}:{HOST_PATH}"
        self.env = {
            **os.environ,
            "PATH": self.path,
            "TMPDIR": str(self.state / "tmp"),
            "CONTAINERS_CONF": str(self.state / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.state / "storage.conf"),
        }

    def __enter__(self) -> Podman:
        try:
            self._set_up()
        except BaseException:
            self.clean_up()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.clean_up()

    def _set_up(self) -> None:
        for sub in ("bin", "tmp", "net", "volumes"):
            (self.state / sub).mkdir(mode=0o700)
        (self.state / "bin" / "criu").symlink_to(self.criu)
        (self.state / "containers.conf").write_text(containers_conf(self.state, self.path, container_ulimits()))
        (self.state / "storage.conf").write_text(storage_conf(self.state))
        rootfs = self.state / "memhog.tar"
        write_rootfs_tar(rootfs, self.hog)
        self._podman("import", str(rootfs), IMAGE)

    def round(self, mib: int, wait_rss: Callable[[int, int], None]) -> PeerRound:
        """Start memhog touching `mib` MiB, then time checkpoint --export and restore --import."""
        name = f"vzpy-bench-memhog-{mib}"
        archive = self.state / f"{name}.tar.zst"
        self._podman(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--cgroup-parent",
            f"/{self.cgroup_parent}",
            IMAGE,
            "/usr/bin/memhog",
            str(mib),
        )
        wait_rss(self._running_pid(name), mib)
        checkpoint = self._timed("container", "checkpoint", "--export", str(archive), name)
        self._podman("rm", name)  # as on another host: the import recreates the container
        restore = self._timed("container", "restore", "--import", str(archive))
        wait_rss(self._running_pid(name), mib)  # the restored container runs with its memory back
        self._podman("rm", "--force", name)
        archive.unlink()
        return PeerRound(checkpoint=checkpoint, restore=restore)

    def _running_pid(self, name: str) -> int:
        state = json.loads(self._podman("inspect", "--format", "{{json .State}}", name))
        if not state.get("Running") or not state.get("Pid"):
            raise PeerFailed(f"podman container {name} is not running: {state.get('Status')} {state.get('Error')}")
        return int(state["Pid"])

    def _timed(self, *args: str) -> float:
        started = time.monotonic()
        self._podman(*args)
        return time.monotonic() - started

    def _podman(self, *args: str) -> str:
        argv = ["podman", "--runtime-flag", f"criu={self.criu}", *args]
        try:
            result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=PODMAN_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise PeerFailed(f"{' '.join(argv)} did not finish in {PODMAN_TIMEOUT} s") from e
        if result.returncode != 0:
            raise PeerFailed(f"{' '.join(argv)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def clean_up(self) -> None:
        """Remove every container and image of this run, then its state, mounts and cgroups."""
        problems = []
        for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
            with contextlib.suppress(PeerFailed, FileNotFoundError):
                if (self.state / "storage.conf").exists():
                    self._podman(*args)
        problems += _wait_for_exit(self.state)
        for point in mounts_under(Path("/proc/self/mountinfo").read_text(), self.state):
            result = subprocess.run(["umount", str(point)], capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                problems.append(f"umount {point}: {result.stderr.strip()}")
        if not problems:
            shutil.rmtree(self.state, onerror=lambda _f, path, exc: problems.append(f"{path}: {exc[1]}"))
        problems += _remove_cgroups(self.cgroup_parent)
        if problems:
            print(f"bench: podman left behind (remove by hand): {'; '.join(problems)}")


def _wait_for_exit(state: Path, timeout: float = 30) -> list[str]:
    """Wait for this run's conmon and its exit command (`podman ... container cleanup`) to end, so nothing
    still uses the state directory or the cgroups: every such process names the directory on its command line."""
    deadline = time.monotonic() + timeout
    while left := _processes_naming(str(state)):
        if time.monotonic() > deadline:
            return [f"processes still running: {', '.join(map(str, left))}"]
        time.sleep(0.1)
    return []


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return [pid for pid in found if pid != os.getpid()]


def _remove_cgroups(name: str) -> list[str]:
    """rmdir the cgroup parent in every hierarchy, children first; what could not be removed.

    Empty cgroups may come back later: a vzpy CT sits in the root cgroup of blkio, cpuset, cpuacct and
    name=systemd, so CRIU dumps the host's whole tree there, and `--manage-cgroups=soft` at restore recreates
    what is missing. They hold no process and the next run removes them.
    """
    problems = []
    for top in CGROUP_ROOT.glob(f"*/{name}"):
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            problems += _rmdir(directory)
        problems += _rmdir(top)
    return problems


def _rmdir(directory: Path) -> list[str]:
    try:
        directory.rmdir()
    except FileNotFoundError:
        return []
    except OSError as e:
        return [f"cgroup {directory}: {e.strerror}"]
    return []
