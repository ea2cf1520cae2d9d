"""Reading what a finished dump wrote: the few facts vzpy needs from CRIU's image files (through pycriu)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from vzpy.criu.binary import load_rpc
from vzpy.errors import ChkpntError

REMAPS = "remap-fpath.img"
FILE_IMAGES = ("files.img", "reg-files.img")  # CRIU >= 3.x keeps every file in files.img; older: reg-files.img


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
