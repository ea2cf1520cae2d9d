"""ssh keys of the test network: key pairs made with ssh-keygen, and the client's key set."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from vzpy_lab.netns.layout import SETUP_TIMEOUT, HostSetupError


@dataclass(frozen=True)
class ClientKey:
    """The client's ssh key, authorized on every host, and a known_hosts naming every host."""

    private_key: Path
    public_key: Path
    known_hosts: Path


def generate_keys(*paths: Path) -> None:
    """ed25519 key pairs (PATH and PATH.pub), generated in parallel."""
    procs = [
        subprocess.Popen(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vzpy-test-{path.name}", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for path in paths
    ]
    for path, proc in zip(paths, procs, strict=True):
        _, err = proc.communicate(timeout=SETUP_TIMEOUT)
        if proc.returncode != 0:
            raise HostSetupError(f"ssh-keygen {path} failed: {err.decode(errors='replace').strip()}")


def public_key(private_key: Path) -> str:
    """'ssh-ed25519 AAAA...' without the comment."""
    return " ".join(Path(f"{private_key}.pub").read_text().split()[:2])
