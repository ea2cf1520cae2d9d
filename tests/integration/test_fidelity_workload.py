"""The state-fidelity workload (vzpy_lab/workload/fidelity.c) and its clients.

(a) it builds, runs on the host bound to 127.0.0.1, and VERIFY reports every item ok (repeatably);
(b) VERIFY does fail: external damage to one piece of state turns exactly the affected items FAIL;
(c) a real CRIU checkpoint/restore (and a live snapshot) of the workload in its own PID/UTS/IPC
    namespaces and a throwaway network namespace keeps every item ok and the echo connection alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vzpy_lab.workload import build
from vzpy_lab.workload.client import ITEMS, Connector, EchoStream, FidelityClient, default_connect, failures

CACHE_DIR = Path(os.environ.get("VZPY_WORKLOAD_CACHE", "/tmp/vzpy-workload-cache"))
CRIU_CANDIDATES = (os.environ.get("VZPY_CRIU", ""), "/opt/vzpy/criu/bin/criu", shutil.which("criu") or "")
CLONE_NEWNET = 0x40000000
CAP_SYS_RESOURCE = 24


@pytest.fixture(scope="session")
def fidelity_bin() -> Path:
    return build.build_fidelity(CACHE_DIR)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """The workload's file directory: short, since its unix socket path must fit in sun_path."""
    path = Path(tempfile.mkdtemp(prefix="fid-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def criu_binary() -> str | None:
    return next((c for c in CRIU_CANDIDATES if c and os.access(c, os.X_OK)), None)


def free_port_pair() -> int:
    """A port p on 127.0.0.1 with p+1 also free (control and echo)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of ports")


def is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    types = (int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") for i in range(phnum))
    return data[:4] == b"\x7fELF" and 3 not in types


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def remove_ipc(info: dict[str, str]) -> None:
    """The workload removes its SysV objects on SIGTERM; this catches a crash (host IPC namespace)."""
    for flag, key in (("-q", "msg_id"), ("-s", "sem_id"), ("-m", "shm_id")):
        if info.get(key, "-1") != "-1":
            subprocess.run(["ipcrm", flag, info[key]], capture_output=True, check=False)


# ------------------------------------------------------------------------------------------------------
# build


def test_build_is_static_and_cached(tmp_path: Path) -> None:
    first = build.build_fidelity(tmp_path)
    start = time.monotonic()
    again = build.build_fidelity(tmp_path)
    assert again == first
    assert time.monotonic() - start < 0.5
    assert is_static_elf(first)
    usage = subprocess.run([str(first)], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 2 and "usage: fidelity" in usage.stderr


def test_build_error_carries_compiler_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return undeclared_thing; }\n")
    monkeypatch.setattr(build, "SOURCE", broken)
    with pytest.raises(build.BuildError, match="undeclared_thing"):
        build.build_fidelity(tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------------
# (a) and (b): the workload on the host, bound to 127.0.0.1


@dataclass
class HostWorkload:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    client: FidelityClient
    info: dict[str, str] = field(default_factory=dict)
    held: list[socket.socket] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_path(self, key: str) -> Path:
        return Path(f"/proc/{self.pid}/fd/{self.info[key]}")


@pytest.fixture
def host_workload(fidelity_bin: Path, short_dir: Path) -> Iterator[HostWorkload]:
    port = free_port_pair()
    cmd = [str(fidelity_bin), "-a", "127.0.0.1", "-d", str(short_dir), str(port)]
    stderr = (short_dir / "stderr").open("wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    workload = HostWorkload(proc, port, short_dir, FidelityClient("127.0.0.1", port))
    try:
        workload.client.wait_ready()
        workload.info = workload.client.info()
        yield workload
    finally:
        stop_process(proc)
        stderr.close()
        for sock in workload.held:
            sock.close()
        remove_ipc(workload.info)


def assert_all_ok(result: dict[str, tuple[bool, str]]) -> None:
    assert set(result) == set(ITEMS)
    assert failures(result) == {}


@pytest.mark.root
def test_host_workload_verifies_ok_and_echoes(host_workload: HostWorkload) -> None:
    client = host_workload.client
    assert client.ping()
    info = host_workload.info
    assert int(info["pid"]) == host_workload.pid
    assert int(info["rss_kb"]) > 64 * 1024  # the 64 MiB pattern region is resident
    assert_all_ok(client.verify())
    assert_all_ok(client.verify())  # repeatable: consumed state was re-armed
    with EchoStream("127.0.0.1", host_workload.port + 1) as echo:
        for size in (1, 1000, 300_000):
            echo.exchange(size)
        assert echo.total == 301_001
    after = client.info()
    assert int(after["echo_bytes"]) == 301_001
    assert int(after["cpu_steps"]) > int(info["cpu_steps"])
    assert int(after["verifies"]) == 2


def break_msg_queue(w: HostWorkload) -> None:
    subprocess.run(["ipcrm", "-q", w.info["msg_id"]], check=True)


def break_semaphores(w: HostWorkload) -> None:
    subprocess.run(["ipcrm", "-s", w.info["sem_id"]], check=True)


def break_shm(w: HostWorkload) -> None:
    subprocess.run(["ipcrm", "-m", w.info["shm_id"]], check=True)


def break_pipe(w: HostWorkload) -> None:
    with w.fd_path("pipe_wfd").open("wb") as pipe:
        pipe.write(b"intruder")


def break_fifo(w: HostWorkload) -> None:
    with (w.dir / "fidelity.fifo").open("wb") as fifo:
        fifo.write(b"x")


def break_cwd(w: HostWorkload) -> None:
    (w.dir / "fidelity-cwd").rename(w.dir / "moved-cwd")


def break_append_file(w: HostWorkload) -> None:
    with (w.dir / "fidelity-append.dat").open("ab") as f:
        f.write(b"more\n")


def break_termios(w: HostWorkload) -> None:
    fd = os.open(w.info["pty"], os.O_RDWR | os.O_NOCTTY)
    try:
        attrs = termios.tcgetattr(fd)
        attrs[3] |= termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    finally:
        os.close(fd)


def break_rlimit(w: HostWorkload) -> None:
    _, hard = resource.prlimit(w.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(w.pid, resource.RLIMIT_NOFILE, (500, hard))


def break_unix_listener(w: HostWorkload) -> None:
    stray = socket.socket(socket.AF_UNIX)
    stray.connect(str(w.dir / "fidelity.sock"))
    w.held.append(stray)  # queued, not accepted, until VERIFY finds it


def break_anon_memory(w: HostWorkload) -> None:
    with open(f"/proc/{w.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(int(w.info["anon_addr"], 16) + 40 * 1024 * 1024)
        mem.write(b"\xde\xad\xbe\xef")


def queue_extra_rt_signal(w: HostWorkload) -> None:
    os.kill(w.pid, signal.SIGRTMIN + 1)  # a third instance queued behind the workload's two


def kill_cred_child(w: HostWorkload) -> None:
    os.kill(int(w.info["child_pid"]), signal.SIGKILL)


BREAKAGES: list[tuple[Callable[[HostWorkload], None], set[str], bool]] = [
    # (damage, items that must FAIL, whether the next VERIFY is ok again because the check re-armed)
    (break_msg_queue, {"sysv_msg"}, False),
    (break_semaphores, {"sysv_sem"}, False),
    (break_shm, {"sysv_shm"}, False),
    (break_pipe, {"pipes"}, True),
    (break_fifo, {"pipes"}, True),
    (break_cwd, {"cwd"}, False),
    (break_append_file, {"files"}, False),
    (break_termios, {"terminal"}, False),
    (break_rlimit, {"rlimits"}, False),
    (break_unix_listener, {"unix_sockets"}, True),
    (break_anon_memory, {"memory"}, False),
    (queue_extra_rt_signal, {"pending_signals"}, True),
    (kill_cred_child, {"credentials", "pids", "memory"}, False),
]


@pytest.mark.root
@pytest.mark.parametrize(("damage", "expected", "recovers"), BREAKAGES, ids=[b[0].__name__ for b in BREAKAGES])
def test_verify_catches_breakage(
    host_workload: HostWorkload, damage: Callable[[HostWorkload], None], expected: set[str], recovers: bool
) -> None:
    assert_all_ok(host_workload.client.verify())
    damage(host_workload)
    failed = failures(host_workload.client.verify())
    assert set(failed) == expected, failed
    again = failures(host_workload.client.verify())
    assert set(again) == (set() if recovers else expected), again


# ------------------------------------------------------------------------------------------------------
# (c): real checkpoint/restore with CRIU


def netns_connector(netns: Path) -> Connector:
    """Connect from inside netns: a short-lived thread joins it (setns is per thread) and opens the socket."""
    libc = ctypes.CDLL(None, use_errno=True)

    def connect(address: tuple[str, int], timeout: float) -> socket.socket:
        box: dict[str, object] = {}

        def run() -> None:
            try:
                with netns.open("rb") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({netns})")
                box["sock"] = default_connect(address, timeout)
            except Exception as exc:
                box["exc"] = exc

        thread = threading.Thread(target=run, name="netns-connect")
        thread.start()
        thread.join()
        if "exc" in box:
            raise box["exc"]  # type: ignore[misc]
        return box["sock"]  # type: ignore[return-value]

    return connect


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"vzpy-fid-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class CriuError(AssertionError):
    pass


@dataclass
class NsWorkload:
    """The workload under its own init in new PID/UTS/IPC namespaces inside netns; CRIU runs in netns too."""

    binary: Path
    netns: Path
    dir: Path
    images: Path
    port: int = 7000
    root_child: bool = True
    launcher: subprocess.Popen[bytes] | None = None
    init_pid: int = 0

    def __post_init__(self) -> None:
        connect = netns_connector(self.netns)
        self.client = FidelityClient("127.0.0.1", self.port, connect=connect)
        self.connect = connect

    def start(self) -> None:
        opts = "-i -r" if self.root_child else "-i"
        script = f"hostname fidelity-ct && exec {self.binary} {opts} -d {self.dir} {self.port}"
        cmd = ["nsenter", f"--net={self.netns}", "unshare", "--pid", "--fork", "--uts", "--ipc", "--"]
        self.launcher = subprocess.Popen(
            [*cmd, "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client.wait_ready()
        self.init_pid = self._init_pid()

    def _init_pid(self) -> int:
        """The topmost fidelity process under the launcher: the PID namespace's init."""
        assert self.launcher is not None
        todo = [self.launcher.pid]
        while todo:
            pid = todo.pop(0)
            if Path(f"/proc/{pid}/comm").read_text().startswith("fidelity"):
                return pid
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        raise AssertionError("the workload's init process was not found")

    def criu(self, action: str, *args: str, log: str) -> None:
        criu = criu_binary()
        assert criu, "no criu binary"
        cmd = ["nsenter", f"--net={self.netns}", criu, action, "-D", str(self.images), "-o", log, "-v4"]
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            errors = [ln for ln in (self.images / log).read_text().splitlines() if "Error" in ln]
            raise CriuError(f"criu {action} failed ({result.returncode}):\n" + "\n".join(errors[-15:]))

    def dump(self, *extra: str) -> None:
        # --link-remap: the workload holds an open file whose name was unlinked while another link remains
        self.criu("dump", "-t", str(self.init_pid), "--tcp-established", "--network-lock", "nftables",
                  "--link-remap", *extra, log="dump.log")  # fmt: skip

    def restore(self) -> None:
        pidfile = self.images / "restored.pid"
        pidfile.unlink(missing_ok=True)
        self.criu("restore", "--tcp-established", "-d", "--pidfile", str(pidfile), log="restore.log")
        self.init_pid = int(pidfile.read_text())

    def stop(self) -> None:
        if self.init_pid:
            terminate(self.init_pid)  # the init forwards SIGTERM; the workload cleans up
        if self.launcher is not None:
            stop_process(self.launcher)


def alive(pid: int) -> bool:
    """Running and not a zombie (a restored tree is reparented to PID 1, which reaps lazily here)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def terminate(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ns_workload(fidelity_bin: Path, netns: Path, short_dir: Path, tmp_path: Path) -> Iterator[NsWorkload]:
    images = tmp_path / "images"
    images.mkdir()
    workload = NsWorkload(fidelity_bin, netns, short_dir, images)
    try:
        yield workload
    finally:
        workload.stop()


def lacks_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE)
    return True


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.requires_criu_feature("network_lock_nftables")
def test_checkpoint_restore_keeps_every_item(ns_workload: NsWorkload) -> None:
    ns_workload.start()
    assert_all_ok(ns_workload.client.verify())
    with EchoStream("127.0.0.1", ns_workload.port + 1, connect=ns_workload.connect) as echo:
        echo.exchange(100_000)
        for cycle in range(2):  # the second cycle proves VERIFY re-armed what it consumed
            steps = int(ns_workload.client.info()["cpu_steps"])
            ns_workload.dump()
            assert ns_workload.launcher is not None
            ns_workload.launcher.wait(timeout=10)  # the dumped tree is gone
            ns_workload.restore()
            echo.exchange(100_000)
            assert_all_ok(ns_workload.client.verify())
            info = ns_workload.client.info()
            assert info["hostname"] == "fidelity-ct"
            assert int(info["cpu_steps"]) > steps, f"cycle {cycle}: the worker thread did not continue"
        assert echo.total == 300_000
        assert int(ns_workload.client.info()["echo_bytes"]) == 300_000


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.requires_criu_feature("network_lock_nftables")
def test_live_snapshot_keeps_every_item(ns_workload: NsWorkload) -> None:
    """`--suspend --dump --resume`: criu dump --leave-running; the workload must carry on untouched."""
    ns_workload.start()
    with EchoStream("127.0.0.1", ns_workload.port + 1, connect=ns_workload.connect) as echo:
        echo.exchange(50_000)
        ns_workload.dump("--leave-running")
        echo.exchange(50_000)
        assert_all_ok(ns_workload.client.verify())
        assert echo.total == 100_000


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.requires_criu_feature("network_lock_nftables")
def test_checkpoint_restore_of_unprivileged_child(ns_workload: NsWorkload) -> None:
    """The credentials child as uid 1234/gid 2345. CRIU reads each task's rlimits with prlimit(), which
    for a task with other uids needs CAP_SYS_RESOURCE; where root lacks it, the dump is refused."""
    ns_workload.root_child = False
    ns_workload.start()
    assert_all_ok(ns_workload.client.verify())
    try:
        ns_workload.dump()
    except CriuError as exc:
        if lacks_cap_sys_resource() and "Can't get rlimit" in str(exc):
            pytest.xfail(f"root lacks CAP_SYS_RESOURCE here, CRIU cannot dump a non-root task: {exc}")
        raise
    assert ns_workload.launcher is not None
    ns_workload.launcher.wait(timeout=10)
    ns_workload.restore()
    assert_all_ok(ns_workload.client.verify())
