"""OS templates: what a CT's private area is populated from.

- "minimal" is built in: assembled in seconds from the host's static busybox, never cached.
- Any other template is a tarball NAME.tar.{zst,xz,gz} in the template directory (vz.conf TEMPLATE), or in
  its cache/ subdirectory, where OpenVZ keeps its precreated templates (`$TEMPLATE/cache/NAME.tar.gz`); one
  at the top wins over one of the same name in cache/. `create_debian` makes one with debootstrap.
Every template vzpy builds runs the vzpy init (template_data/vzpy-init) as /sbin/init.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

from vzpy import fileio
from vzpy.errors import (
    BadTemplate,
    CommandFailed,
    CtFileError,
    InvalidValue,
    NoDiskSpace,
    PrivateExists,
    SystemFailure,
    TemplateNotFound,
    VzError,
)
from vzpy.host import mounts
from vzpy.proc import run, tail
from vzpy.runtime.ctfs import CtRoot
from vzpy.units import human_size

MINIMAL = "minimal"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Preference order when one name exists with several compressions.
TARBALL_FORMATS = {".tar.zst": "--zstd", ".tar.xz": "--xz", ".tar.gz": "--gzip"}
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = files("vzpy") / "template_data" / "vzpy-init"
# Paths in the CT that must lead to an executable for it to start.
REQUIRED = (("sbin/init", "sbin/vzpy-init"), ("bin/sh",))
# Applets the minimal template does not link: the vzpy init is /sbin/init; linuxrc is for initrds.
SKIPPED_APPLETS = frozenset({"sbin/init", "linuxrc"})
OPENVZ_CACHE = "cache"  # vzctl's precreated OS templates: $TEMPLATE/cache/NAME.tar.gz
TAR_KEEP = ("--numeric-owner", "--xattrs", "--xattrs-include=*")
TAR_TIMEOUT = 1800.0
DEBOOTSTRAP_TIMEOUT = 3600.0
DEBIAN_MIN_FREE = 512 << 20
PT_INTERP = 3

MINIMAL_DIRS = {
    "bin": 0o755, "sbin": 0o755, "etc": 0o755, "etc/vzpy": 0o755, "etc/vzpy/services": 0o755,
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "run": 0o755, "var": 0o755,
    "var/log": 0o755, "var/www": 0o755, "root": 0o700, "home": 0o755, "usr": 0o755,
    "usr/bin": 0o755, "usr/sbin": 0o755,
}  # fmt: skip


def _lines(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


MINIMAL_FILES = {
    "etc/passwd": _lines("root:x:0:0:root:/root:/bin/sh", "nobody:x:65534:65534:nobody:/nonexistent:/bin/false"),
    "etc/group": _lines("root:x:0:", "nogroup:x:65534:"),
    "etc/shadow": _lines("root:*:19000:0:99999:7:::", "nobody:*:19000:0:99999:7:::"),
    "etc/hosts": _lines("127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"),
    "etc/hostname": _lines("localhost"),
    "etc/os-release": _lines(
        'NAME="vzpy minimal"', "ID=vzpy-minimal", "VERSION_ID=1", 'PRETTY_NAME="vzpy minimal (busybox)"'
    ),
    "etc/profile": _lines(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "export PS1='\\u@\\h:\\w\\$ '"
    ),
}


class TemplateStore:
    """The built-in "minimal" template plus the tarballs in `cache_dir` (created when first written)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def names(self) -> list[str]:
        return sorted({MINIMAL, *self._tarballs()})

    def install(self, name: str, private: Path) -> None:
        """Populate the CT private area `private` (absent or empty) from template `name`, or leave it as found."""
        check_name(name)
        tarball = None if name == MINIMAL else self._tarball(name)
        with _populating(Path(private)) as root:
            if tarball is None:
                build_minimal(root)
            else:
                _extract(tarball, root, name)
            check_usable(root, name)

    def create_debian(
        self,
        name: str = "debian-12",
        suite: str = "bookworm",
        mirror: str = "http://deb.debian.org/debian",
        progress: Callable[[str], None] | None = None,
    ) -> Path:
        """debootstrap a minbase Debian, add the vzpy init, pack it to cache_dir/NAME.tar.zst atomically."""
        if check_name(name) == MINIMAL:
            raise InvalidValue(f"{MINIMAL!r} is the built-in template; choose another name")
        say: Callable[[str], None] = progress or (lambda _line: None)
        _require_root("creating a Debian template (debootstrap)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _require_free(self.cache_dir, DEBIAN_MIN_FREE)
        target = self.cache_dir / f"{name}.tar.zst"
        build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=self.cache_dir))
        try:
            rootfs = build / "rootfs"
            say(f"debootstrap --variant=minbase {suite} from {mirror} (takes a minute or two)")
            _debootstrap(suite, rootfs, mirror)
            say("installing the vzpy init")
            prepare_debian(rootfs)
            say(f"packing {target}")
            packed = build / target.name
            _pack(rootfs, packed)
            fileio.replace_durably(packed, target)
        finally:
            _remove_tree(build)
        say(f"template {name} ready: {target}")
        return target

    def _tarballs(self) -> dict[str, Path]:
        """Template name -> tarball, from the directory, then its cache/ (OpenVZ's); with several compressions
        of one name in a directory, the first in TARBALL_FORMATS."""
        found: dict[str, Path] = {}
        for directory in (self.cache_dir, self.cache_dir / OPENVZ_CACHE):
            for name, path in _tarballs_in(directory).items():
                found.setdefault(name, path)
        return found

    def _tarball(self, name: str) -> Path:
        tarball = self._tarballs().get(name)
        if tarball is None:
            raise TemplateNotFound(
                f"template {name!r} not found in {self.cache_dir} or {self.cache_dir / OPENVZ_CACHE}; "
                f"available: {', '.join(self.names())}; "
                "create one with `vzpy template create debian-12`"
            )
        return tarball


def _tarballs_in(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    found: dict[str, Path] = {}
    tarballs = sorted(path for path in directory.iterdir() if path.is_file())
    for suffix in TARBALL_FORMATS:
        for path in tarballs:
            name = path.name.removesuffix(suffix)
            if name != path.name and NAME_RE.match(name):
                found.setdefault(name, path)
    return found


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidValue(f"invalid template name {name!r}: use letters, digits, '.', '_', '+', '-'")
    return name


def init_script() -> bytes:
    return INIT_SCRIPT.read_bytes()


def resolve_in(root: Path, path: str) -> Path | None:
    """Host path of `path` as seen from inside `root` (absolute links restart at root); None if absent."""
    with CtRoot(root) as ct_root:
        return ct_root.resolve(path)


def check_usable(root: Path, name: str) -> None:
    """A CT needs an init and a shell: raise BadTemplate unless `root` has both."""
    with CtRoot(root) as ct_root:
        for choices in REQUIRED:
            if not any(_is_executable(ct_root.stat(path)) for path in choices):
                wanted = " or ".join(f"/{path}" for path in choices)
                raise BadTemplate(f"template {name!r} is not a usable container: no executable {wanted}")


def _is_executable(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 != 0


@contextmanager
def _populating(private: Path) -> Iterator[Path]:
    """Yield `private` to fill in; on any failure remove what was written (and the dir, if made here)."""
    if private.is_symlink():
        raise PrivateExists(f"private area {private} is a symlink; remove it (vzpy populates only real directories)")
    created = not private.exists()
    if not created and (not private.is_dir() or any(private.iterdir())):
        raise PrivateExists(f"private area {private} already exists and is not empty")
    private.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        yield private
    except BaseException:
        if created:
            _remove_tree(private)
        else:
            for entry in private.iterdir():
                _remove_tree(entry)
        raise


def _remove_tree(path: Path) -> None:
    """Remove `path`, first unmounting anything mounted below it (a failed debootstrap can leave /proc)."""
    _unmount_below(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _unmount_below(path: Path) -> None:
    for mountpoint in sorted(mounts.mounts_below(path.resolve()), reverse=True):
        run(["umount", "--lazy", mountpoint], what=f"unmounting {mountpoint}")


def _extract(tarball: Path, root: Path, name: str) -> None:
    compression = next(flag for suffix, flag in TARBALL_FORMATS.items() if tarball.name.endswith(suffix))
    argv: list[str | Path] = ["tar", "--extract", compression, "--file", tarball, "--directory", root]
    what = f"extracting template {name!r}"
    _run_tar([*argv, "--preserve-permissions", "--same-owner", *TAR_KEEP], what, BadTemplate)


def _pack(rootfs: Path, tarball: Path) -> None:
    argv: list[str | Path] = ["tar", "--create", "--zstd", "--file", tarball, "--directory", rootfs]
    _run_tar([*argv, "--one-file-system", *TAR_KEEP, "."], f"packing {tarball.name}", CommandFailed)


def _run_tar(argv: list[str | Path], what: str, error: type[VzError]) -> None:
    try:
        run(argv, timeout=TAR_TIMEOUT, error=error, what=what)
    except error as e:
        if "No space left on device" in e.detail:
            raise NoDiskSpace(f"{what}: no space left on device", detail=e.detail) from e
        raise


def build_minimal(root: Path) -> None:
    """Assemble the minimal template into the existing empty dir `root`."""
    busybox = _static_busybox()
    try:
        _make_dirs(root)
        shutil.copy2(busybox, root / "bin/busybox")
        _link_applets(root, busybox)
        for path, text in MINIMAL_FILES.items():
            (root / path).write_text(text)
        os.chmod(root / "etc/shadow", 0o640)
        install_init(root)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoDiskSpace(f"building the minimal template in {root}: no space left on device") from e
        raise


def _static_busybox() -> Path:
    if not BUSYBOX.is_file():
        raise SystemFailure(f"{BUSYBOX} is missing: the minimal template needs busybox-static; run `make setup`")
    if not _is_static(BUSYBOX):
        raise SystemFailure(
            f"{BUSYBOX} is dynamically linked and cannot run inside a CT: "
            "install busybox-static instead of busybox (run `make setup`)"
        )
    return BUSYBOX


def _is_static(elf: Path) -> bool:
    """True unless the ELF file asks for a dynamic loader (has a PT_INTERP program header)."""
    data = elf.read_bytes()
    if data[:4] != b"\x7fELF":
        return False
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # ELFCLASS64
        (phoff,) = struct.unpack_from(f"{order}Q", data, 32)
        phentsize, phnum = struct.unpack_from(f"{order}HH", data, 54)
    else:
        (phoff,) = struct.unpack_from(f"{order}I", data, 28)
        phentsize, phnum = struct.unpack_from(f"{order}HH", data, 42)
    types = {struct.unpack_from(f"{order}I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    return PT_INTERP not in types


def _make_dirs(root: Path) -> None:
    os.chmod(root, 0o755)
    for path, mode in MINIMAL_DIRS.items():
        (root / path).mkdir()
        os.chmod(root / path, mode)


def _link_applets(root: Path, busybox: Path) -> None:
    listing = run([busybox, "--list-full"], what="busybox --list-full").stdout.split()
    for applet in listing:
        if applet in SKIPPED_APPLETS or applet == "bin/busybox":
            continue
        link = root / applet
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath("bin/busybox", os.path.dirname(applet) or "."))


def install_init(root: Path) -> None:
    """Put the vzpy init at /sbin/vzpy-init and, if the tree has no init, link /sbin/init to it.

    Paths resolve inside `root` (a template's /sbin may be a link to usr/sbin) and never out of it.
    """
    try:
        with CtRoot(root) as ct_root:
            ct_root.mkdir("/sbin")
            ct_root.write_atomic("/sbin/vzpy-init", init_script(), mode=0o755)
            ct_root.symlink("vzpy-init", "/sbin/init")
    except CtFileError as e:
        raise BadTemplate(f"cannot install the vzpy init: {e.message}") from e


def prepare_debian(rootfs: Path) -> None:
    """Make a debootstrapped tree a vzpy template: the init, a services dir, a neutral hostname, no .debs."""
    os.chmod(rootfs, 0o755)
    install_init(rootfs)
    with CtRoot(rootfs) as ct_root:
        for directory in ("/etc/vzpy", "/etc/vzpy/services"):
            ct_root.mkdir(directory)
        ct_root.write_atomic("/etc/hostname", b"localhost\n")
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _debootstrap(suite: str, rootfs: Path, mirror: str) -> None:
    argv: list[str | Path] = ["debootstrap", "--variant=minbase", suite, rootfs, mirror]
    try:
        run(argv, timeout=DEBOOTSTRAP_TIMEOUT, what=f"debootstrap {suite}")
    except VzError as e:
        log = rootfs / "debootstrap/debootstrap.log"
        detail = tail(log.read_text(errors="replace")) if log.is_file() else e.detail
        if "No space left on device" in detail:
            raise NoDiskSpace(f"debootstrap {suite}: no space left on device", detail=detail) from e
        raise type(e)(e.message, detail=detail) from e


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SystemFailure(f"{what} needs root")


def _require_free(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise NoDiskSpace(f"{path} has {human_size(free)} free; {human_size(needed)} needed")
