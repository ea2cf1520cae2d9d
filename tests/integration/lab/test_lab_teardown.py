"""A lab whose owner is killed leaves nothing running: its qemu dies with the owner (PR_SET_PDEATHSIG) and
reap_stale_labs() removes its netns and overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpy_lab.netns.layout import netns_path
from vzpy_lab.netns.system import gone_or_zombie
from vzpy_lab.vm.lab import reap_stale_labs

pytestmark = [pytest.mark.root, pytest.mark.slow]
SRC = Path(__file__).resolve().parents[3] / "src"
OWNER = """
import sys
from pathlib import Path
from vzpy_lab.vm.lab import Lab
Lab(n=1, state_root=Path(sys.argv[1])).start()
"""


def _wait_for(what: str, condition, owner: subprocess.Popen[bytes] | None = None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if owner is not None and owner.poll() is not None:
            raise AssertionError(f"the lab's owner exited ({owner.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:g}s")
        time.sleep(0.2)


def _qemu_started(state: Path) -> bool:
    return any(pid.stat().st_size and pid.with_name("serial.log").exists() for pid in state.glob("*/vm1/qemu.pid"))


def test_killing_the_owner_kills_its_vms_and_the_reaper_removes_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "labs"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(state)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for("qemu with its serial log", lambda: _qemu_started(state), owner)
    finally:
        owner.kill()
        owner.wait()
    lab_dir = next(state.glob("*/vm1/qemu.pid")).parent.parent
    qemu = int((lab_dir / "vm1" / "qemu.pid").read_text())
    netns = json.loads((lab_dir / "owner.json").read_text())["netns"]
    _wait_for("end of qemu after its owner was killed", lambda: gone_or_zombie(qemu), timeout=30)

    messages = reap_stale_labs(state)
    assert messages == [f"reaped stale lab {lab_dir.name}"]
    assert not netns_path(netns).exists()
    assert not (lab_dir / "vm1" / "overlay.qcow2").exists()
    assert (lab_dir / "vm1" / "serial.log").exists(), "the serial log stays for a post-mortem"
    assert reap_stale_labs(state) == [], "a reaped lab is not reaped twice"
