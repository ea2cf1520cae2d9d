"""The lab's guest image: built once from Debian packages (debootstrap), cached under CACHE_ROOT keyed by the
recipe's digest, and verified against its recorded checksums before every use.

    CACHE_ROOT/keys/        lab_key (root's key on every guest and the client's), guest_host_key, known_hosts
    CACHE_ROOT/debs/        debootstrap's .deb cache (makes rebuilds cheap)
    CACHE_ROOT/images/<digest>/  base.qcow2 (the root fs, read-only base of the VMs' overlays), vmlinuz,
                            initrd.img, manifest.json (recipe + sha256 of each file), build.log

`python -m vzpy_lab.vm.image` (scripts/lab-image.sh, `make lab-image`) builds it ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vzpy_lab.netns.keys import generate_keys, public_key
from vzpy_lab.netns.system import remove_tree, write_file
from vzpy_lab.vm.layout import (
    BUILD_TIMEOUT,
    CACHE_ROOT,
    GUEST_CRIU_PREFIX,
    GUEST_DISK,
    GUEST_PYTHON,
    GUEST_VENV,
    MIRROR,
    SUITE,
    LabError,
)
from vzpy_lab.vm.recipe import (
    HOST_CRIU_PREFIX,
    MASKED_UNITS,
    PACKAGES,
    VZCTL_NAMES,
    Recipe,
    known_hosts_text,
    vzpy_dependencies,
)

IMAGE_FILES = ("base.qcow2", "vmlinuz", "initrd.img")
Log = Callable[[str], None]


@dataclass(frozen=True)
class LabKeys:
    private_key: Path  # root's key on every guest, and the client's
    host_key: Path  # the guests' shared ssh host key
    known_hosts: Path  # every VM address with that host key, for the client

    @classmethod
    def at(cls, cache: Path) -> LabKeys:
        keys = cache / "keys"
        return cls(keys / "lab_key", keys / "guest_host_key", keys / "known_hosts")

    def ensure(self) -> None:
        self.private_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        missing = [key for key in (self.private_key, self.host_key) if not key.exists()]
        if missing:
            generate_keys(*missing)
        write_file(self.known_hosts, known_hosts_text(public_key(self.host_key)))


@dataclass(frozen=True)
class Image:
    directory: Path

    @property
    def base(self) -> Path:
        return self.directory / "base.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def verify(self) -> str | None:
        """None if every file matches its recorded sha256, else what is wrong."""
        try:
            recorded = json.loads(self.manifest.read_text())["sha256"]
        except (OSError, ValueError, KeyError) as e:
            return f"no readable manifest: {e}"
        for name in IMAGE_FILES:
            try:
                actual = sha256_file(self.directory / name)
            except OSError as e:
                return f"{name}: {e}"
            if actual != recorded.get(name):
                return f"{name}: sha256 {actual} is not the recorded {recorded.get(name)}"
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One builder at a time (other sessions wait for its image rather than building their own)."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_image(cache: Path = CACHE_ROOT, log: Log | None = None) -> tuple[Image, LabKeys]:
    """The image of the current recipe: the cached one if its checksums match, else a fresh build."""
    say = log or (lambda message: None)
    with cache_lock(cache):
        keys = LabKeys.at(cache)
        keys.ensure()
        recipe = Recipe.current(public_key(keys.private_key), public_key(keys.host_key))
        image = Image(cache / "images" / recipe.digest())
        if image.directory.exists():
            problem = image.verify()
            if problem is None:
                say(f"lab image {image.directory} verified")
                return image, keys
            say(f"lab image {image.directory} fails verification ({problem}); rebuilding")
            remove_tree(image.directory)
        started = time.monotonic()
        _build(image, recipe, keys, cache, say)
        say(f"lab image {image.directory} built in {time.monotonic() - started:.0f}s")
        for old in _prune_images(cache, keep=image.directory):
            say(f"lab image {old} removed (an older recipe, no VM uses it)")
        return image, keys


def _images_in_use() -> set[str]:
    """Image directories named on a running process's command line (qemu -kernel/-initrd)."""
    used = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            for arg in cmdline.read_bytes().split(b"\0"):
                if b"/images/" in arg:
                    used.add(os.fsdecode(arg))
    return used


def _prune_images(cache: Path, keep: Path) -> list[Path]:
    """Remove the images of other recipes that no running VM boots from (each is ~0.7 GiB)."""
    used = _images_in_use()
    removed = []
    for directory in sorted((cache / "images").iterdir()):
        if directory == keep or any(arg.startswith(f"{directory}/") for arg in used):
            continue
        remove_tree(directory)
        removed.append(directory)
    return removed


# --- building ---------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, work: Path, log_path: Path, say: Log) -> None:
        self.work = work
        self.root = work / "root"
        self.log_path = log_path
        self.say = say
        self.deadline = time.monotonic() + BUILD_TIMEOUT

    def run(self, argv: Sequence[str], what: str) -> None:
        self.say(f"lab image: {what}")
        remaining = max(1.0, self.deadline - time.monotonic())
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
            try:
                result = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=remaining, env=env
                )
            except subprocess.TimeoutExpired as e:
                raise LabError(f"lab image: {what} timed out; see {self.log_path}") from e
        if result.returncode != 0:
            tail = "".join(self.log_path.read_text(errors="replace").splitlines(True)[-15:])
            raise LabError(f"lab image: {what} failed ({result.returncode}); see {self.log_path}:\n{tail}")

    def chroot(self, argv: Sequence[str], what: str) -> None:
        self.run(["chroot", str(self.root), *argv], what)

    def guest(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def _build(image: Image, recipe: Recipe, keys: LabKeys, cache: Path, say: Log) -> None:
    work = cache / "build" / image.directory.name
    _unmount_below(work)
    remove_tree(work)
    work.mkdir(parents=True)
    (cache / "debs").mkdir(exist_ok=True)
    builder = _Builder(work, work / "build.log", say)
    try:
        _debootstrap(builder, cache / "debs")
        _configure(builder, recipe, keys)
        _make_image_files(builder)
        _record(builder, recipe)
    finally:
        _unmount_below(builder.root)
    remove_tree(builder.root)
    image.directory.parent.mkdir(exist_ok=True)
    os.replace(work, image.directory)
    problem = image.verify()
    if problem:
        raise LabError(f"lab image {image.directory} fails verification right after its build: {problem}")


def _debootstrap(builder: _Builder, debs: Path) -> None:
    builder.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            f"--cache-dir={debs}",
            "--components=main",
            SUITE,
            str(builder.root),
            MIRROR,
        ],
        f"debootstrap {SUITE} ({len(PACKAGES)} packages and their dependencies; minutes)",
    )


def _configure(builder: _Builder, recipe: Recipe, keys: LabKeys) -> None:
    builder.say("lab image: configuring the guest")
    root = builder.root
    for old in root.glob("etc/ssh/ssh_host_*"):
        old.unlink()
    builder.chroot(["python3", "-m", "venv", "--without-pip", GUEST_VENV], "guest virtualenv")
    for path, (text, mode) in recipe.guest_files().items():
        target = builder.guest(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file(target, text, mode)
    os.chmod(builder.guest("/root/.ssh"), 0o700)
    shutil.copyfile(keys.host_key, builder.guest("/etc/ssh/ssh_host_ed25519_key"))
    os.chmod(builder.guest("/etc/ssh/ssh_host_ed25519_key"), 0o600)
    shutil.copyfile(keys.private_key, builder.guest("/root/.ssh/id_ed25519"))
    os.chmod(builder.guest("/root/.ssh/id_ed25519"), 0o600)
    units = builder.guest("/etc/systemd/system")
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "vzpy-lab-net.service").unlink(missing_ok=True)
    (wants / "vzpy-lab-net.service").symlink_to("/etc/systemd/system/vzpy-lab-net.service")
    for name in VZCTL_NAMES:  # vzpy answers to vzctl's names too (argv[0]), as scripts/setup.sh links them
        link = builder.guest(f"/usr/local/sbin/{name}")
        link.unlink(missing_ok=True)
        link.symlink_to("vzpy")
    for sub in ("private", "root", "dump", "template", "lock"):
        builder.guest(f"/vz/{sub}").mkdir(parents=True, exist_ok=True)
    builder.guest("/etc/vz/conf").mkdir(parents=True, exist_ok=True)
    _copy_python_dependencies(builder)
    say_criu = f"CRIU from {HOST_CRIU_PREFIX} at {GUEST_CRIU_PREFIX}"
    builder.say(f"lab image: {say_criu}")
    shutil.copytree(HOST_CRIU_PREFIX, builder.guest(GUEST_CRIU_PREFIX), symlinks=True)
    write_file(builder.guest("/etc/machine-id"), "")
    builder.chroot(["apt-get", "clean"], "apt-get clean")
    for lists in builder.guest("/var/lib/apt/lists").glob("*_*"):
        lists.unlink()


def _copy_python_dependencies(builder: _Builder) -> None:
    """vzpy's dependencies as installed in this venv, file by file (their RECORDs): the guest's python is the
    same 3.11, and no package index is reachable from the lab."""
    site = builder.guest(f"{GUEST_VENV}/lib/{GUEST_PYTHON}/site-packages")
    names = []
    for dist in vzpy_dependencies():
        names.append(f"{dist.metadata['Name']}=={dist.version}")
        for file in dist.files or ():
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            source = Path(str(dist.locate_file(file)))
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    builder.say(f"lab image: python dependencies {' '.join(names)}")


def _make_image_files(builder: _Builder) -> None:
    kernels = sorted(builder.root.glob("boot/vmlinuz-*"))
    initrds = sorted(builder.root.glob("boot/initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise LabError(f"lab image: want one kernel and one initrd in /boot, found {kernels} {initrds}")
    shutil.copyfile(kernels[0], builder.work / "vmlinuz")
    shutil.copyfile(initrds[0], builder.work / "initrd.img")
    _unmount_below(builder.root)
    raw = builder.work / "base.raw"
    builder.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vzpy-lab", "-d", str(builder.root), str(raw), GUEST_DISK],
        "root file system (mke2fs -d)",
    )
    builder.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(builder.work / "base.qcow2")], "qcow2 base")
    raw.unlink()
    for name in IMAGE_FILES:
        os.chmod(builder.work / name, 0o444)


def _record(builder: _Builder, recipe: Recipe) -> None:
    manifest = {
        "recipe": recipe.description(),
        "kernel": sorted(p.name for p in builder.root.glob("boot/vmlinuz-*")),
        "sha256": {name: sha256_file(builder.work / name) for name in IMAGE_FILES},
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_file(builder.work / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))


def _unmount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys in the tree and may leave them when it fails."""
    prefix = f"{path}/"
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)


def main(argv: Sequence[str] = ()) -> int:
    if os.geteuid() != 0:
        print("lab image: run as root (debootstrap, chroot)", file=sys.stderr)
        return 12
    try:
        image, _ = ensure_image(log=lambda message: print(message, flush=True))
    except LabError as e:
        print(e, file=sys.stderr)
        return 1
    print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
