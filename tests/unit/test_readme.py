"""The README's module map (its Development section) names every module under src/, and only those."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>[\w.]+(/|\.py))(\s|$)")


def module_map() -> set[str]:
    """Paths (relative to src/) of the entries of the first code block in `## Development`: one entry per line,
    `name/` for a package, nested entries indented by two more spaces than their package."""
    section = REPO.joinpath("README.md").read_text().split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    paths: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        entry = ENTRY.match(line)
        if not entry:
            continue
        depth = len(entry["indent"]) // 2
        parents = parents[:depth]
        path = "".join(parents) + entry["name"]
        if path.endswith("/"):
            parents.append(entry["name"])
        else:
            paths.add(path)
    return paths


def modules() -> set[str]:
    src = REPO / "src"
    return {
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def test_every_module_is_in_the_readme_and_every_entry_exists() -> None:
    listed, present = module_map(), modules()
    assert sorted(present - listed) == [], "modules missing from the README's module map"
    assert sorted(listed - present) == [], "README entries naming no module"
