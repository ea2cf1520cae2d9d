"""A criu_req carries exactly the fields its action needs and the caller set: an unset option leaves CRIU's
default, and an option of another action (a dump's pid, a restore's root) is never sent. Compared as the whole
set of fields present in the message, so a field sent by mistake is caught whatever its name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import require_real
from vzpy.criu.options import CgroupMode, CriuAction, CriuOptions, DirFds, NetworkLock, build_request

try:
    from pycriu import rpc_pb2  # noqa: F401 - build_request needs it
except ImportError:
    if require_real():  # CI has pycriu (make setup): missing, it is a broken environment, not a skip
        raise
    pytest.skip("pycriu comes with `make setup`", allow_module_level=True)

DIRS = DirFds(images=7, work=8)
EVERY_ACTION_FIELD = {"images_dir_fd", "work_dir_fd", "log_level", "log_file"}
EVERYTHING_SET: dict[str, Any] = {
    "pid": 42,
    "root": Path("/vz/root/101"),
    "leave_running": True,
    "tcp_established": True,
    "file_locks": True,
    "link_remap": True,
    "manage_cgroups": CgroupMode.SOFT,
    "cgroup_roots": {"": "/vzpy/101"},
    "freeze_cgroup": Path("/sys/fs/cgroup/freezer/vzpy/101"),
    "network_lock": NetworkLock.NFTABLES,
    "veths": {"eth0": "veth101.0"},
    "inherit_fd": {"pipe:[1]": 5},
    "notify_scripts": True,
    "track_mem": True,
    "parent_img": "../1",
    "page_server": ("10.0.0.2", 1234),
    "lazy_pages": True,
    "rst_sibling": True,
    "timeout": 30,
}
SHARED_TREE_FIELDS = {"notify_scripts", "file_locks"}
SHARED_TREE_FIELDS |= {"manage_cgroups_mode", "cg_root"}
DUMP_ONLY_FIELDS = {"pid", "freeze_cgroup", "track_mem", "parent_img", "timeout"}


def fields_sent(action: CriuAction, **options: Any) -> set[str]:
    req = build_request(action, CriuOptions(images_dir=Path("/images"), **options), DIRS)
    req.SerializeToString()  # every required proto2 field is set
    return {descriptor.name for descriptor, _ in req.opts.ListFields()}


@pytest.mark.parametrize(
    ("action", "options", "expected"),
    [
        (CriuAction.RESTORE, {}, EVERY_ACTION_FIELD),
        (CriuAction.DUMP, {"pid": 42}, EVERY_ACTION_FIELD | {"pid"}),
        (CriuAction.PRE_DUMP, {"pid": 42}, EVERY_ACTION_FIELD | {"pid"}),
        (CriuAction.PAGE_SERVER, {"page_server": ("0.0.0.0", 0)}, EVERY_ACTION_FIELD | {"ps"}),
        (CriuAction.CHECK, {}, {"images_dir_fd", "log_level"}),
    ],
)
def test_a_request_with_nothing_optional_set_carries_only_the_fields_its_action_needs(
    action: CriuAction, options: dict[str, Any], expected: set[str]
) -> None:
    assert fields_sent(action, **options) == expected


def test_a_restore_carries_only_restore_options_even_when_every_option_is_set() -> None:
    restore_fields = {"root", "rst_sibling", "veths", "inherit_fd"}
    network_fields = {"tcp_established", "network_lock", "lazy_pages"}
    expected = EVERY_ACTION_FIELD | SHARED_TREE_FIELDS | restore_fields | network_fields
    assert fields_sent(CriuAction.RESTORE, **EVERYTHING_SET) == expected


def test_a_dump_carries_only_dump_options_even_when_every_option_is_set() -> None:
    dump_fields = {"leave_running", "link_remap", "ps"}
    network_fields = {"tcp_established", "network_lock", "lazy_pages"}
    expected = EVERY_ACTION_FIELD | SHARED_TREE_FIELDS | DUMP_ONLY_FIELDS | dump_fields | network_fields
    assert fields_sent(CriuAction.DUMP, **EVERYTHING_SET) == expected


def test_a_pre_dump_leaves_the_network_and_the_running_state_alone_even_when_every_option_is_set() -> None:
    expected = EVERY_ACTION_FIELD | SHARED_TREE_FIELDS | DUMP_ONLY_FIELDS | {"ps"}
    assert fields_sent(CriuAction.PRE_DUMP, **EVERYTHING_SET) == expected


def test_a_page_server_without_an_address_is_refused_saying_what_it_needs() -> None:
    with pytest.raises(ValueError) as info:
        build_request(CriuAction.PAGE_SERVER, CriuOptions(images_dir=Path("/images")), DIRS)
    assert str(info.value) == "criu page-server needs page_server=(address, port)"
