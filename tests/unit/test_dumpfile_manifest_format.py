"""The dump file's manifest as docs/dumpfile.md describes it: a JSON object with sorted keys, `created` and
`created_unix` naming the same moment (to the millisecond), and refusals that say what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from vzpy.dumpfile import format as dump_format
from vzpy.dumpfile.format import Manifest, name_problem

CPU = {"arch": "x86_64", "vendor": "GenuineIntel", "model_name": "Xeon", "family": "6", "model": "85", "flags": []}
SHA = "0" * 64


def manifest(**changes: Any) -> Manifest:
    return Manifest(**{"ctid": "101", "criu_version": "4.2.1", "ct_config": "", "cpu": CPU, **changes})


def test_the_manifest_json_has_sorted_keys_at_every_level() -> None:
    text = manifest(extra={"zeta": 1, "alpha": 2}).to_json()
    top = list(json.loads(text))
    assert top == sorted(top)
    assert text.index('"alpha"') < text.index('"zeta"')
    assert text.index('"arch"') < text.index('"vendor"')


def test_created_and_created_unix_name_the_same_moment_to_the_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    monkeypatch.setattr(dump_format, "_now", lambda: moment)
    made = manifest()
    assert made.created == "2026-01-02T03:04:05Z"
    assert made.created_unix == 1767323045.123


def test_a_given_creation_time_is_kept() -> None:
    made = manifest(created="2025-01-02T03:04:05Z", created_unix=1735787045.0)
    assert (made.created, made.created_unix) == ("2025-01-02T03:04:05Z", 1735787045.0)


def test_a_manifest_that_is_not_a_json_object_is_refused_saying_so() -> None:
    with pytest.raises(ValueError) as info:
        Manifest.from_json("[1, 2]")
    assert str(info.value) == "not a JSON object"


def test_a_compressed_member_in_a_dump_without_compression_is_refused_saying_so() -> None:
    data = json.loads(manifest().to_json())
    data["members"] = {"core-1.img": {"size": 100, "blake3": SHA, "offset": 8192, "stored_size": 50, "codec": "zstd"}}
    with pytest.raises(ValueError) as info:
        Manifest.from_json(json.dumps(data))
    assert str(info.value) == "a member is compressed but the dump's compression is none"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "x" * 256, 7, "é.img"])
def test_a_member_name_that_is_not_a_plain_file_name_is_refused_saying_what_is_allowed(name: object) -> None:
    assert name_problem(name) == "not a plain file name (letters, digits and _.@+:=- only)"


@pytest.mark.parametrize("name", ["pages-1.img", "tmpfs-dev-42.tar.gz.img", "a@b+c:d=e_f-g", "x" * 255])
def test_a_plain_member_name_has_no_problem(name: str) -> None:
    assert name_problem(name) is None
