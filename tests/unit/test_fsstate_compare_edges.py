"""Edges of comparing a CT's files with their fingerprint: the first entries of both lists, how an mtime is
shown (to the nanosecond, whole seconds exact), added/removed entries of a kind vzpy does not name, the default
limits of compare and verify, and what verify's refusal carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpy.errors import RestoreError
from vzpy.fsstate import Difference, Entry, compare, describe_differences, fingerprint, verify
from vzpy.fsstate.diff import differences

ROOT = Entry("", "d", 0o755, 0, 0)


def test_a_change_of_the_first_entry_of_both_lists_is_found() -> None:
    found = list(differences([ROOT], [ROOT._replace(mode=0o700)]))
    assert [(d.path, d.kind, d.what) for d in found] == [("/", "changed", ("mode",))]


def test_entries_only_at_the_start_of_one_side_are_found() -> None:
    old = [Entry("a", "f", 0o644, 0, 0), Entry("b", "f", 0o644, 0, 0)]
    new = [Entry("b", "f", 0o644, 0, 0)]
    assert [str(d) for d in differences(old, new)] == ["/a removed"]
    assert [str(d) for d in differences(new, old)] == ["/a added"]


@pytest.mark.parametrize(
    ("mtime_ns", "shown"),
    [
        (1_600_000_000_999_999_999, "2020-09-13 12:26:40.999999999Z"),  # a float would round up a second
        (1_600_000_001_000_000_001, "2020-09-13 12:26:41.000000001Z"),
        (0, "1970-01-01 00:00:00.000000000Z"),
    ],
)
def test_an_mtime_is_shown_to_the_nanosecond_in_utc(mtime_ns: int, shown: str) -> None:
    old = Entry("f", "f", 0o644, 0, 0, size=1, mtime_ns=mtime_ns)
    new = old._replace(mtime_ns=mtime_ns + 10**9)
    difference = Difference("/f", "changed", ("mtime",), old, new)
    assert difference.detail().startswith(f"/f changed: mtime {shown} -> ")


def test_an_added_or_removed_entry_of_an_unnamed_kind_shows_its_letter() -> None:
    odd = Entry("s", "z", 0, 0, 0)
    assert Difference("/s", "added", new=odd).detail() == "/s added (z)"
    assert Difference("/s", "removed", old=odd).detail() == "/s removed (z)"
    assert Difference("/s", "removed").detail() == "/s removed (?)"


def test_differences_of_a_plain_list_are_counted_by_its_length() -> None:
    found = [Difference(f"/tmp/{name}", "added", new=Entry(f"tmp/{name}", "f", 0, 0, 0)) for name in "abcd"]
    message, detail = describe_differences("101", found)
    assert "/tmp/a added, /tmp/b added, /tmp/c added, ... (4 differences)" in message
    assert detail.splitlines() == [f"/tmp/{name} added (file)" for name in "abcd"]


def test_compare_reports_the_first_ten_by_default(tmp_path: Path) -> None:
    root = tmp_path / "private"
    (root / "tmp").mkdir(parents=True)
    recorded = fingerprint(root)
    for i in range(12):
        (root / f"tmp/f{i:02d}").write_text("x")
    found = compare(recorded, root)
    assert (len(found), found.total) == (10, 12)
    with pytest.raises(RestoreError) as info:
        verify(recorded, root, "101")
    lines = info.value.detail.splitlines()
    assert lines[:10] == [f"/tmp/f{i:02d} added (file)" for i in range(10)]
    assert lines[10:] == ["... and 2 more"]


def test_verify_refuses_naming_the_ct_the_limit_and_the_differences(tmp_path: Path) -> None:
    root = tmp_path / "private"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    recorded = fingerprint(root)
    (root / "etc/passwd").unlink()
    for name in ("group", "hosts", "shadow"):
        (root / "etc" / name).write_text("")
    with pytest.raises(RestoreError) as info:
        verify(recorded, root, "web-7", limit=2)
    assert info.value.message == (
        "filesystem of CT web-7 differs from the checkpoint: /etc/group added, /etc/hosts added, ... "
        "(4 differences); copy the CT's files as they were at checkpoint (e.g. rsync) or use --skip-fs-check"
    )
    assert info.value.detail == "/etc/group added (file)\n/etc/hosts added (file)\n... and 2 more"


def test_verify_ignores_what_it_is_told_to_exclude(tmp_path: Path) -> None:
    root = tmp_path / "private"
    (root / "run").mkdir(parents=True)
    recorded = fingerprint(root)
    (root / "run/app.pid").write_text("42")
    verify(recorded, root, "101", exclude=["/run/*"])
    with pytest.raises(RestoreError):
        verify(recorded, root, "101")
