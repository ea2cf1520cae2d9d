"""Fixtures of the VM lab (vzpy_lab.vm): QEMU guests with Debian 12's stock kernel, for what this machine's
kernel cannot do. See /work/helpers/lab-api.md.

- `lab` (session): two VMs booted once per test session (image built or verified first); a lab that cannot
  be built or booted is an error of every test using it, never a skip.
- `vm1`, `vm2`: lab.vms[0] and lab.vms[1].

Tests using them need `@pytest.mark.root` (tests/conftest.py fails instead of skipping with
VZPY_REQUIRE_REAL=1).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from vzpy_lab.vm.lab import Lab, LabVM


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("the VM lab needs root (netns, tap devices, debootstrap)")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def say(message: str) -> None:
        if reporter is not None:
            reporter.write_line(message)
        if message.startswith("reaped"):
            warnings.warn(message, stacklevel=1)

    with Lab(n=2, log=say) as started:
        yield started


@pytest.fixture
def vm1(lab: Lab) -> LabVM:
    return lab.vms[0]


@pytest.fixture
def vm2(lab: Lab) -> LabVM:
    return lab.vms[1]
