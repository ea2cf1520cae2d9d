"""Reading what a finished dump wrote: the few facts vzpy needs from CRIU's image files (through pycriu)."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

from vzpy.criu.binary import load_rpc
from vzpy.errors import ChkpntError

REMAPS = "remap-fpath.img"
FILE_IMAGES = ("files.img", "reg-files.img")  # CRIU >= 3.x keeps every file in files.img; older: reg-files.img
_MEMORY_IMAGE = re.compile(r"pages-\d+\.img")


def is_memory_image(name: str) -> bool:
    """CRIU's raw memory pages (pages-N.img): a restore copies them into the tasks' memory and parses nothing."""
    return _MEMORY_IMAGE.fullmatch(name) is not None


_TASK_PAGEMAP = re.compile(r"pagemap-\d+\.img")  # a process's; shared memory's are pagemap-shmem-N.img


def task_pages_images(images_dir: Path) -> set[str]:
    """The pages images of processes' own memory, named by the head of each process's pagemap. A restore reads
    them only after its "post-setup-namespaces" notification, as the tasks map their memory; the pages of
    shared memory it may read before (SysV segments, as it restores the IPC namespace)."""
    names = set()
    for path in images_dir.iterdir():
        if _TASK_PAGEMAP.fullmatch(path.name):
            head = _entries(path)[:1]
            if head and "pages_id" in head[0]:
                names.add(f"pages-{int(head[0]['pages_id'])}.img")
    return names


def _images_module() -> ModuleType:
    load_rpc()  # says what is missing when pycriu is not importable
    from pycriu import images

    module: ModuleType = images  # pycriu has no type information (pyproject.toml: ignore_missing_imports)
    return module


def _entries(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            return list(_images_module().load(f)["entries"])
    except FileNotFoundError:
        return []
    except Exception as e:  # pycriu raises its own and protobuf's errors for a damaged image
        raise ChkpntError(f"cannot read CRIU image {path}: {e}") from e


def linked_remaps(images_dir: Path) -> list[str]:
    """The files CRIU linked (`--link-remap`) for open files whose name was unlinked while another link
    remains, as paths inside the dumped tree's root ("/tmp/link_remap.16"). The restore needs them."""
    wanted = {entry["remap_id"] for entry in _entries(images_dir / REMAPS) if entry.get("remap_type") == "LINKED"}
    if not wanted:
        return []
    names = []
    for image in FILE_IMAGES:
        for entry in _entries(images_dir / image):
            reg = entry.get("reg", entry)  # files.img wraps the regular-file entry; reg-files.img does not
            if reg.get("id") in wanted and isinstance(reg.get("name"), str):
                names.append(reg["name"])
    return sorted(set(names))


STATS_DUMP = "stats-dump"
STATS_KEYS = ("pages_written", "pages_skipped_parent", "pages_lazy", "pages_scanned", "frozen_time")


def dump_stats(work_dir: Path) -> dict[str, int] | None:
    """What CRIU's last dump or pre-dump counted (stats-dump, which CRIU writes into its work dir, not the
    images dir): pages written (or sent to the page server), skipped because the parent images have them,
    left for lazy-pages; None without the file."""
    if not (work_dir / STATS_DUMP).exists():
        return None
    entries = _entries(work_dir / STATS_DUMP)
    dump = entries[0].get("dump", {}) if entries else {}
    return {key: int(dump.get(key, 0)) for key in STATS_KEYS}


PE_LAZY = 1 << 1  # CRIU's pagemap.h: the page is left for lazy-pages
PE_PRESENT = 1 << 2  # ... its contents are in the images (or the parent's)


def _pagemap_flags(value: object) -> int:
    """A pagemap entry's flags: pycriu gives them as "PE_PRESENT | PE_LAZY" (or a number)."""
    if isinstance(value, int):
        return value
    names = {"PE_LAZY": PE_LAZY, "PE_PRESENT": PE_PRESENT}
    return sum(names.get(name.strip(), 0) for name in str(value or "").split("|"))


def pagemap_pages(images_dir: Path) -> tuple[int, int]:
    """The memory pages a dump in `images_dir` put into the images (or sent to a page server), and those it
    left for lazy-pages (post-copy), counted from its pagemaps. (CRIU's stats of a lazy dump come out zero.)"""
    written = lazy = 0
    for path in sorted(images_dir.glob("pagemap-*.img")):
        for entry in _entries(path):
            if "pages_id" in entry:
                continue  # the head entry
            pages = int(entry.get("nr_pages") or entry.get("compat_nr_pages") or 0)  # old CRIUs: compat only
            flags = _pagemap_flags(entry.get("flags"))
            if flags & PE_LAZY:
                lazy += pages
            elif flags & PE_PRESENT:
                written += pages
    return written, lazy
