"""vzpy_lab's packaging rules, root-free: the launcher runs alone, vzpy never needs the lab, no path hacks."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from vzpy_lab.netns import host, launcher

REPO = Path(__file__).resolve().parents[2]
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.(insert|append|extend)\b|\[|\+=|=[^=])")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def python_files(*roots: str) -> list[Path]:
    """Every Python file below roots: *.py and the extensionless scripts with a python shebang."""
    files = []
    for root in roots:
        for path in sorted((REPO / root).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix not in ("", ".py"):
                continue
            if path.suffix == ".py" or b"python" in path.read_bytes().split(b"\n", 1)[0]:
                files.append(path)
    return files


def test_the_launcher_imports_only_the_standard_library() -> None:
    """host.py runs launcher.py by its path with -I -S: no site-packages, not even vzpy_lab itself."""
    modules = imported_modules(Path(launcher.__file__))
    assert {name for name in modules if name.split(".")[0] not in sys.stdlib_module_names} == set()


def test_the_launcher_runs_by_its_path_in_isolated_mode() -> None:
    result = subprocess.run([sys.executable, "-I", "-S", host.LAUNCHER], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"usage: {host.LAUNCHER} launch SPEC_JSON\n"


def test_vzpy_never_imports_the_lab() -> None:
    users = [path for path in python_files("src/vzpy") if any(m.startswith("vzpy_lab") for m in imported_modules(path))]
    assert users == []


def test_no_sys_path_edits_outside_tests() -> None:
    """The lab is an installed package: the demo, bench and vzpy import it like any other."""
    files = python_files("src", "scripts", "bench")
    assert any(path.name == "migrate" for path in files)  # the extensionless bench scripts are seen
    editing = [path for path in files if SYS_PATH_EDIT.search(path.read_text())]
    assert editing == []
