"""A finished migration's work dir on the destination goes aside at once and is removed in the background
(vzpy.migrate.session.remove_later): the source's resume reply does not wait for a big CT's pages to go."""

from __future__ import annotations

from pathlib import Path

from vzpy.migrate.session import TRASH_PREFIX, remove_later


def test_the_work_dir_goes_aside_at_once_and_is_removed_with_stale_ones(tmp_path: Path) -> None:
    workdir = tmp_path / "Migrate.101"
    (workdir / "images").mkdir(parents=True)
    (workdir / "images" / "pages-1.img").write_bytes(b"\0" * 4096)
    stale = tmp_path / f"{TRASH_PREFIX}Migrate.101.deadbeef"  # a killed agent's
    stale.mkdir()
    other_ct = tmp_path / f"{TRASH_PREFIX}Migrate.1010.deadbeef"
    other_ct.mkdir()
    thread = remove_later(workdir)
    assert not workdir.exists()  # a new prepare of the CT starts clean right away
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_ct.name]


def test_a_missing_work_dir_is_nothing_to_do(tmp_path: Path) -> None:
    assert remove_later(tmp_path / "Migrate.101") is None
