"""bench/peers.py's pure parts: which mounts it unmounts before removing its state, and the config it writes."""

from __future__ import annotations

import importlib.util
import sys
import tarfile
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers.py"


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers", PEERS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def mountinfo_line(point: str) -> str:
    return f"612 27 0:88 / {point} rw,relatime shared:300 - overlay overlay rw,lowerdir=/x"


def test_mounts_under_finds_the_state_dir_and_below_deepest_first(peers: ModuleType) -> None:
    top = Path("/var/tmp/vzpy-bench-podman-ab")
    text = "\n".join(
        mountinfo_line(p)
        for p in (
            "/",
            "/var/tmp/vzpy-bench-podman-ab/storage/overlay",
            "/var/tmp/vzpy-bench-podman-ab/storage/overlay/l1/merged",
            "/var/tmp/vzpy-bench-podman-abc",  # a sibling whose name starts the same: not ours
            "/var/tmp/vzpy-bench-podman-ab",
        )
    )
    assert peers.mounts_under(text, top) == [
        top / "storage/overlay/l1/merged",
        top / "storage/overlay",
        top,
    ]


def test_mounts_under_reads_octal_escapes(peers: ModuleType) -> None:
    top = Path("/var/tmp/state dir")
    text = mountinfo_line("/var/tmp/state\\040dir/shm") + "\n" + mountinfo_line("/var/tmp/state\\134x")
    assert peers.mounts_under(text, top) == [top / "shm"]


def test_mounts_under_skips_short_lines(peers: ModuleType) -> None:
    assert peers.mounts_under("\n12 1 0:1\n", Path("/")) == []


def test_containers_conf_is_toml_with_runc_no_network_and_private_state(peers: ModuleType) -> None:
    state = Path("/var/tmp/vzpy-bench-podman-xy")
    conf = tomllib.loads(peers.containers_conf(state, f"{state}/bin:/usr/bin", {"nofile": 1024, "nproc": 4096}))
    assert conf["containers"] == {"netns": "none", "default_ulimits": ["nofile=1024:1024", "nproc=4096:4096"]}
    assert conf["engine"]["runtime"] == "runc"
    assert conf["engine"]["conmon_env_vars"] == [f"PATH={state}/bin:/usr/bin"]
    assert conf["network"]["network_config_dir"] == f"{state}/net"
    for key in ("tmp_dir", "static_dir", "volume_path", "events_logfile_path"):
        assert conf["engine"][key].startswith(f"{state}/"), key


def test_storage_conf_keeps_images_and_containers_in_the_state_dir(peers: ModuleType) -> None:
    state = Path("/var/tmp/s")
    conf = tomllib.loads(peers.storage_conf(state))["storage"]
    assert (conf["graphroot"], conf["runroot"]) == ("/var/tmp/s/storage", "/var/tmp/s/run")


def test_rootfs_tar_holds_memhog_under_usr_bin(peers: ModuleType, tmp_path: Path) -> None:
    hog = tmp_path / "hog"
    hog.write_bytes(b"\x7fELF")
    hog.chmod(0o755)
    peers.write_rootfs_tar(tmp_path / "r.tar", hog)
    with tarfile.open(tmp_path / "r.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"usr", "usr/bin", "tmp", "usr/bin/memhog"}
        assert members["usr/bin/memhog"].mode & 0o111
        assert tar.extractfile("usr/bin/memhog").read() == b"\x7fELF"  # type: ignore[union-attr]


def test_capped_limits(peers: ModuleType) -> None:
    import resource

    assert peers._capped(resource.RLIM_INFINITY, 4096) == 4096
    assert peers._capped(20000, 1024) == 1024
    assert peers._capped(512, 1024) == 512
