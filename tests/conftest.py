"""Markers shared by every test.

- `@pytest.mark.root`: needs root, real namespaces and cgroups; skipped with the reason otherwise.
- `@pytest.mark.requires_criu_feature("name")`: skipped unless `criu check --feature name` passes here.

With VZPY_REQUIRE_REAL=1 (set by .ci/run) such a skip is a failure instead: CI has root and CRIU, so a
real test that would skip there means the environment is broken, not that the test passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VzRoot, criu_has_feature, require_real


def _skip_or_fail(reason: str, *, real: bool = True) -> None:
    if real and require_real():
        pytest.fail(f"VZPY_REQUIRE_REAL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        _skip_or_fail("needs root (namespaces, cgroups, CRIU)")
    for marker in item.iter_markers("requires_criu_feature"):
        name = marker.args[0]
        if not criu_has_feature(name):
            # A kernel lacking a feature is a fact of the host, not a broken CI: skip even in CI.
            pytest.skip(f"criu check --feature {name} fails on this host")


@pytest.fixture
def vzroot(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VzRoot]:
    root = VzRoot(tmp_path / "vz", request.node.name[:20].replace("[", "_").replace("]", "_"))
    try:
        yield root
    finally:
        root.cleanup()


@pytest.fixture
def running_ct(vzroot: VzRoot) -> Iterator[tuple[VzRoot, str, str]]:
    """CT 101 from the minimal template, with an httpd on port 80 serving its CTID, started."""
    ip = vzroot.new_ip()
    vzroot.run("create", "101", "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "ct101.test", check=True)
    www = vzroot.private("101") / "var" / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("hello from 101\n")
    vzroot.add_service("101", "httpd", "exec httpd -f -p 80 -h /var/www")
    vzroot.run("start", "101", check=True)
    yield vzroot, "101", ip
