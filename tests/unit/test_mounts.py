"""host.mounts: the mountinfo parser (escapes, optional fields, malformed lines) and the live table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpy.host import mounts
from vzpy.host.mounts import Mount, parse_mountinfo, unescape

MOUNTINFO = (
    b"22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
    b"35 22 0:30 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:15 master:3 - cgroup cgroup "
    b"rw,freezer\n"
    b"80 1 8:1 /vz/private/my\\040ct /vz/root/my\\040ct rw,relatime - ext4 /dev/sda1 rw\n"
    b"81 1 8:1 /a /odd\\011tab\\012nl\\134bs rw - ext4 /dev/sda1 rw\n"
    b"82 1 0:40 / /no-optional rw - tmpfs none rw,size=64k\n"
)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        (b"/vz/root/my\\040ct", "/vz/root/my ct"),
        (b"a\\011b", "a\tb"),
        (b"a\\012b", "a\nb"),
        (b"a\\134b", "a\\b"),
        (b"a\\134040", "a\\040"),  # an escaped backslash before digits stays a backslash
        (b"plain", "plain"),
        (b"\\999", "\\999"),  # not an escape the kernel writes
    ],
)
def test_unescape(field: bytes, text: str) -> None:
    assert unescape(field) == text


def test_undecodable_bytes_round_trip_like_os_paths() -> None:
    assert os.fsencode(unescape(b"/x\\377y")) == b"/x\xffy"


def test_parse_fields() -> None:
    table = parse_mountinfo(MOUNTINFO)
    assert [m.point for m in table] == [
        "/sys",
        "/sys/fs/cgroup/freezer",
        "/vz/root/my ct",
        "/odd\ttab\nnl\\bs",
        "/no-optional",
    ]
    freezer = table[1]
    assert freezer == Mount(
        mount_id=35,
        parent_id=22,
        root="/",
        point="/sys/fs/cgroup/freezer",
        options=frozenset({"rw", "nosuid", "nodev", "noexec", "relatime"}),
        fstype="cgroup",
        source="cgroup",
        super_options=frozenset({"rw", "freezer"}),
    )
    assert table[2].root == "/vz/private/my ct"
    assert table[4].fstype == "tmpfs"
    assert table[4].super_options == frozenset({"rw", "size=64k"})


def test_malformed_lines_are_skipped() -> None:
    data = b"garbage\n1 2 3\nx 1 0:1 / /a rw - ext4 d rw\n5 1 0:1 / /a rw - ext4\n" + MOUNTINFO
    assert len(parse_mountinfo(data)) == 5


def test_live_table_has_root_and_proc() -> None:
    points = {m.point for m in mounts.mounts()}
    assert "/" in points
    assert "/proc" in points
    assert mounts.is_mountpoint("/proc")
    assert not mounts.is_mountpoint("/proc/self")


def test_mounts_below(monkeypatch: pytest.MonkeyPatch) -> None:
    table = parse_mountinfo(MOUNTINFO)
    monkeypatch.setattr(mounts, "mounts", lambda pid="self": table)
    assert mounts.mounts_below("/sys") == ["/sys/fs/cgroup/freezer"]
    assert mounts.mounts_below("/sys/", including=True) == ["/sys", "/sys/fs/cgroup/freezer"]
    assert mounts.mounts_below("/vz/root/my") == []
    assert mounts.mounts_below(Path("/vz/root")) == ["/vz/root/my ct"]
    assert mounts.is_mountpoint(Path("/vz/root/my ct"))
    assert "/" not in mounts.mounts_below("/")
