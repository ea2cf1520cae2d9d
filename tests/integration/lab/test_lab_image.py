"""The lab image's bookkeeping, without building one: checksums catch a changed file, the recipe's digest
follows its inputs, and only vzpy's run-time dependencies for this platform go into the guest."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from vzpy_lab.vm.image import IMAGE_FILES, Image, sha256_file
from vzpy_lab.vm.recipe import PythonDist, Recipe, _requirement_name


def _fake_image(directory: Path) -> Image:
    directory.mkdir()
    for name in IMAGE_FILES:
        (directory / name).write_bytes(name.encode() * 1000)
    sums = {name: sha256_file(directory / name) for name in IMAGE_FILES}
    (directory / "manifest.json").write_text(json.dumps({"sha256": sums}))
    return Image(directory)


def test_verify_accepts_the_recorded_files_and_names_a_changed_one(tmp_path: Path) -> None:
    image = _fake_image(tmp_path / "img")
    assert image.verify() is None
    with open(image.initrd, "r+b") as f:
        f.seek(500)
        f.write(b"X")
    problem = image.verify()
    assert problem is not None and problem.startswith("initrd.img: sha256")


def test_verify_refuses_a_missing_file_or_manifest(tmp_path: Path) -> None:
    image = _fake_image(tmp_path / "img")
    image.kernel.unlink()
    assert (image.verify() or "").startswith("vmlinuz:")
    image.manifest.unlink()
    assert (image.verify() or "").startswith("no readable manifest")


def test_the_digest_follows_every_input() -> None:
    recipe = Recipe("ssh-ed25519 AAAAlab", "ssh-ed25519 AAAAhost", "c" * 64, (PythonDist("click", "8.1"),))
    assert recipe.digest() == Recipe(**recipe.__dict__).digest()
    changed = [
        replace(recipe, lab_public_key="ssh-ed25519 AAAAother"),
        replace(recipe, host_public_key="ssh-ed25519 AAAAother"),
        replace(recipe, criu="d" * 64),
        replace(recipe, python=(PythonDist("click", "8.2"),)),
    ]
    assert len({recipe.digest(), *(other.digest() for other in changed)}) == 1 + len(changed)


def test_only_run_time_requirements_for_this_platform_count() -> None:
    assert _requirement_name("click>=8.1") == "click"
    assert _requirement_name('pytest>=8; extra == "dev"') is None
    assert _requirement_name('win-inet-pton; sys_platform == "win32" and python_version < "3"') is None
