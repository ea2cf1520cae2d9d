"""Small system helpers of the lab: commands with deadlines, network namespaces and sockets in them,
process identity from /proc, files written atomically, trees removed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vzpy_lab.netns.launcher import CLONE_NEWNET, setns, umount_detach, unescape
from vzpy_lab.netns.layout import SETUP_TIMEOUT, HostSetupError, netns_path

NsId = tuple[int, int]
Step = tuple[str, Callable[[], object]]


def ns_id(path: str | Path) -> NsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pid + start = identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def run_checked(argv: Sequence[str], *, input: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise HostSetupError(f"{' '.join(argv)}: timed out after {SETUP_TIMEOUT:g}s") from e
    if result.returncode != 0:
        raise HostSetupError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def run_steps(steps: Iterable[Step]) -> list[str]:
    """Run every step even if earlier ones failed; return the failures."""
    errors = []
    for what, action in steps:
        try:
            action()
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {e}")
    return errors


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _mounts_under(path: Path) -> list[str]:
    prefix = f"{path}/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = unescape(line.split()[4])
        if point == str(path) or point.startswith(prefix):
            points.append(point)
    return points


def remove_tree(path: Path) -> None:
    """rm -rf, first detaching anything mounted below it here (there should be nothing)."""
    for point in reversed(_mounts_under(path)):
        umount_detach(point)
    if path.exists():
        shutil.rmtree(path)


# --- network namespaces ------------------------------------------------------------------------------


def ip_batch(netns: str, commands: Iterable[str]) -> None:
    run_checked(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")


def add_netns(name: str) -> None:
    run_checked(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    if netns_path(name).exists():
        run_checked(["ip", "netns", "delete", name])


def delete_link(netns: str, link: str) -> None:
    """Best effort: the link also goes away with its netns, just not synchronously."""
    if netns_path(netns).exists():
        subprocess.run(["ip", "-n", netns, "link", "del", link], capture_output=True, timeout=SETUP_TIMEOUT)


def netns_socket(netns: str | Path, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside a network namespace (a name under /run/netns, or an nsfs path).

    A dedicated thread joins the netns and creates the socket; a socket stays in the netns it was
    created in, so it can be used from any thread afterwards.
    """
    path = netns if isinstance(netns, Path) or "/" in str(netns) else netns_path(str(netns))
    box: dict[str, Any] = {}

    def create() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            box["sock"] = socket.socket(family, kind)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=create, name=f"setns-{Path(path).name}", daemon=True)
    thread.start()
    thread.join(SETUP_TIMEOUT)
    if "error" in box:
        raise box["error"]
    if "sock" not in box:
        raise TimeoutError(f"creating a socket in {path} timed out")
    sock: socket.socket = box["sock"]
    return sock


def connect_from(netns: str | Path, address: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = netns_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listening(pid: int, address: str, port: int) -> bool:
    """Whether PID's netns has a TCP socket listening on address:port (per /proc/PID/net/tcp)."""
    local = f"{int.from_bytes(socket.inet_aton(address), 'little'):08X}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(fields[1] == local and fields[3] == "0A" for fields in (line.split() for line in lines))
