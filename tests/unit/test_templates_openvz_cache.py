"""Templates where OpenVZ keeps its precreated ones: `$TEMPLATE/cache/NAME.tar.gz`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy.errors import TemplateNotFound
from vzpy.templates import TemplateStore


def test_names_include_openvz_cache(tmp_path: Path) -> None:
    template = tmp_path / "template"
    (template / "cache").mkdir(parents=True)
    (template / "cache" / "centos-7-x86_64.tar.gz").write_bytes(b"")
    (template / "debian-12.tar.zst").write_bytes(b"")
    assert TemplateStore(template).names() == ["centos-7-x86_64", "debian-12", "minimal"]
    assert TemplateStore(template)._tarball("centos-7-x86_64") == template / "cache" / "centos-7-x86_64.tar.gz"


def test_one_at_the_top_wins_over_the_cache(tmp_path: Path) -> None:
    template = tmp_path / "template"
    (template / "cache").mkdir(parents=True)
    (template / "cache" / "web.tar.gz").write_bytes(b"")
    (template / "web.tar.xz").write_bytes(b"")
    assert TemplateStore(template)._tarball("web") == template / "web.tar.xz"


def test_not_found_names_both_places(tmp_path: Path) -> None:
    template = tmp_path / "template"
    with pytest.raises(TemplateNotFound, match=f"not found in {template} or {template}/cache; available: minimal"):
        TemplateStore(template)._tarball("nope")
