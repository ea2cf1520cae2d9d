"""Real CRIU through vzpy's RPC: dump, restore, page server, failures, and the host's feature report.

The dumped tree is a shell counting into a file, as pid 1 of its own PID, UTS, IPC and network namespaces
and a session leader there, with stdio on /dev/null (it stays in the host's mount namespace: a copy of the host's
mounts would include whatever other tests mount meanwhile, which CRIU may refuse to dump).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import require_real
from vzpy.criu import Criu, CriuBinary, CriuOptions, NetworkLock, derive_plan, detect_capabilities, require_criu
from vzpy.errors import ChkpntError, RestoreError

try:
    import pycriu  # noqa: F401 - vzpy's RPC speaks pycriu's messages
except ImportError:
    # In CI (VZPY_REQUIRE_REAL=1) a missing pycriu is a broken environment: fail, never skip.
    if require_real():
        raise
    pytest.skip("pycriu comes with `make setup`", allow_module_level=True)

WAIT = 10.0  # bound for every wait on a process or a counter
STUCK_CRIU_WAIT = 120.0  # far more than the dump's timeout plus the grace vzpy gives a killed CRIU
COUNTER_SCRIPT = 'i=0; while :; do i=$((i+1)); echo "$i" > {counter}; sleep 0.05; done'


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class CounterTree:
    holder: subprocess.Popen[bytes]  # `unshare`, waiting for the tree
    pid: int  # the tree's root (pid 1 of its namespace) as the host sees it
    counter: Path

    def value(self) -> int:
        text = self.counter.read_text().strip() if self.counter.exists() else ""
        return int(text) if text else 0

    def wait_for_progress(self) -> None:
        start = self.value()
        wait_until(lambda: self.value() > start, f"{self.counter} to increase past {start}")


def first_child(pid: int) -> int:
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children: list[str] = []

    def has_child() -> bool:
        children[:] = children_file.read_text().split()
        return bool(children)

    wait_until(has_child, f"unshare {pid} to start its child")
    return int(children[0])


@pytest.fixture(scope="module")
def usable_criu() -> CriuBinary:
    return require_criu()


@pytest.fixture
def criu(usable_criu: CriuBinary) -> Criu:
    return Criu(usable_criu, timeout=30)


@pytest.fixture
def counter_tree(tmp_path: Path) -> Iterator[CounterTree]:
    counter = tmp_path / "counter"
    # exec fresh: a shell keeps saved copies of fds, which would point outside the tree.
    script = f"exec </dev/null >/dev/null 2>&1; {COUNTER_SCRIPT.format(counter=counter)}"
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--uts", "--ipc", "--net", "--", "setsid", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        start_new_session=True,
    )
    tree = None
    try:
        tree = CounterTree(holder, first_child(holder.pid), counter)
        tree.wait_for_progress()
        yield tree
    finally:
        if tree is not None:
            with suppress(ProcessLookupError):
                os.kill(tree.pid, signal.SIGKILL)  # pid 1 of a namespace ignores SIGTERM
        holder.kill()
        holder.wait(WAIT)


@pytest.fixture
def restored() -> Iterator[list[int]]:
    """Pids of trees restored with rst_sibling (so our children): killed and reaped at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def missing_pid() -> int:
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def ns_pid(pid: int) -> int:
    """The pid inside the innermost pid namespace (NSpid's last field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


def images_dir(tmp_path: Path, name: str = "img") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


# --- dump and restore ---


@pytest.mark.root
def test_dump_then_restore_continues_the_tree(
    criu: Criu, counter_tree: CounterTree, tmp_path: Path, restored: list[int]
) -> None:
    images = images_dir(tmp_path)
    dump_events: list[str] = []
    criu.dump(CriuOptions(images_dir=images, pid=counter_tree.pid), notify=lambda s, p: dump_events.append(s))

    assert "pre-dump" in dump_events and "post-dump" in dump_events
    assert counter_tree.holder.wait(WAIT) is not None  # the dump killed the tree
    stopped_at = counter_tree.value()
    time.sleep(0.2)
    assert counter_tree.value() == stopped_at

    restore_events: list[tuple[str, int]] = []
    pid = criu.restore(
        CriuOptions(images_dir=images, rst_sibling=True), notify=lambda s, p: restore_events.append((s, p))
    )
    restored.append(pid)

    assert ("post-restore", pid) in restore_events
    assert {"setup-namespaces", "post-resume"} <= {script for script, _ in restore_events}
    wait_until(lambda: counter_tree.value() > stopped_at, "the restored counter to continue")
    assert ns_pid(pid) == 1  # still pid 1 of its own namespace
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # rst_sibling: our child, still running


@pytest.mark.root
@pytest.mark.requires_criu_feature("network_lock_nftables")
def test_network_is_locked_on_dump_and_unlocked_on_restore(
    criu: Criu, counter_tree: CounterTree, tmp_path: Path, restored: list[int]
) -> None:
    images = images_dir(tmp_path)
    net = {"network_lock": NetworkLock.NFTABLES, "tcp_established": True}
    dump_events: list[str] = []
    criu.dump(CriuOptions(images_dir=images, pid=counter_tree.pid, **net), notify=lambda s, p: dump_events.append(s))
    assert dump_events.index("network-lock") < dump_events.index("post-dump")
    assert "network-unlock" not in dump_events  # the lock stays until the restore

    events: list[str] = []
    pid = criu.restore(CriuOptions(images_dir=images, rst_sibling=True, **net), notify=lambda s, p: events.append(s))
    restored.append(pid)
    assert events.index("post-restore") < events.index("network-unlock") < events.index("post-resume")
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")


@pytest.mark.root
def test_leave_running_dump_keeps_the_tree_going(criu: Criu, counter_tree: CounterTree, tmp_path: Path) -> None:
    images = images_dir(tmp_path)
    criu.dump(CriuOptions(images_dir=images, pid=counter_tree.pid, leave_running=True))
    assert (images / "inventory.img").exists()
    counter_tree.wait_for_progress()


@pytest.mark.root
def test_page_server_receives_the_pages(
    criu: Criu, counter_tree: CounterTree, tmp_path: Path, restored: list[int]
) -> None:
    source, destination = images_dir(tmp_path, "src"), images_dir(tmp_path, "dst")
    with criu.page_server(CriuOptions(images_dir=destination, page_server=("127.0.0.1", 0))) as server:
        assert server.port > 0
        criu.dump(CriuOptions(images_dir=source, pid=counter_tree.pid, page_server=("127.0.0.1", server.port)))
        assert server.wait(WAIT) == 0

    assert list(destination.glob("pages-*.img")) and not list(source.glob("pages-*.img"))
    stopped_at = counter_tree.value()
    for image in source.glob("*.img"):
        if not (destination / image.name).exists():
            shutil.copy2(image, destination)
    restored.append(criu.restore(CriuOptions(images_dir=destination, rst_sibling=True)))
    wait_until(lambda: counter_tree.value() > stopped_at, "the counter restored from streamed pages")


def page_server_corks(port: int) -> list[int]:
    """TCP_CORK of each socket of this process connected to 127.0.0.1:port."""
    corks = []
    for connection in psutil.Process().net_connections(kind="tcp"):
        if connection.raddr and tuple(connection.raddr) == ("127.0.0.1", port) and connection.fd >= 0:
            with socket.socket(fileno=os.dup(connection.fd)) as sock:
                corks.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))
    return corks


@pytest.mark.root
def test_a_dump_sends_its_pages_through_our_connection_uncorked(
    criu: Criu, counter_tree: CounterTree, tmp_path: Path
) -> None:
    """CRIU corks its page-server socket and never uncorks it: its final close waited out the kernel's 200 ms
    cork limit. The dump now runs on a connection of ours that CRIU corks and we uncork before any page goes."""
    source, destination = images_dir(tmp_path, "src"), images_dir(tmp_path, "dst")
    corks: dict[str, list[int]] = {}
    with criu.page_server(CriuOptions(images_dir=destination, page_server=("127.0.0.1", 0))) as server:
        criu.dump(
            CriuOptions(images_dir=source, pid=counter_tree.pid, page_server=("127.0.0.1", server.port)),
            notify=lambda script, _pid: corks.setdefault(script, page_server_corks(server.port)),
        )
        assert server.wait(WAIT) == 0
    assert "Reusing ps socket" in (source / "dump.log").read_text()
    assert corks["network-lock"] == [0] and corks["post-dump"] == [0]
    assert list(destination.glob("pages-*.img"))


@contextmanager
def silent_page_server() -> Iterator[int]:
    """A port that accepts connections and never reads or answers: a page server behind a link gone silent."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[socket.socket] = []

        def accept() -> None:
            with suppress(OSError):
                accepted.append(listener.accept()[0])

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            yield listener.getsockname()[1]
        finally:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            acceptor.join(WAIT)
            for connection in accepted:
                connection.close()


@pytest.mark.root
@pytest.mark.parametrize("deadline", ["timeout", "abort_after"])
def test_a_dump_stuck_on_a_silent_page_server_ends_at_its_deadline_with_the_tree_intact(
    usable_criu: CriuBinary, counter_tree: CounterTree, tmp_path: Path, deadline: str
) -> None:
    """CRIU waits for the page server's answer (or for room to send pages) with its parasite code in the task,
    where no notification comes to abort at: only a kill would end it, after the whole budget. At either
    deadline the connection is closed instead: CRIU fails at once, takes its code out, and the tree goes on."""
    with silent_page_server() as port:
        opts = CriuOptions(images_dir=images_dir(tmp_path), pid=counter_tree.pid, page_server=("127.0.0.1", port))
        criu = Criu(usable_criu, timeout=2.0 if deadline == "timeout" else 60.0)
        started = time.monotonic()
        with pytest.raises(ChkpntError) as caught:
            criu.dump(opts, abort_after=1.0 if deadline == "abort_after" else None)
        took = time.monotonic() - started
    assert counter_tree.holder.poll() is None, "the tree died with the dump"
    counter_tree.wait_for_progress()
    message = caught.value.message
    assert "page-server connection was closed" in message and "CRIU stopped cleanly" in message, message
    assert took < 30, f"the dump took {took:.1f}s to end"


@pytest.mark.root
def test_stopping_an_unused_page_server(criu: Criu, tmp_path: Path) -> None:
    server = criu.page_server(CriuOptions(images_dir=images_dir(tmp_path), page_server=("127.0.0.1", 0)))
    server.stop()
    assert server.exit_code == -signal.SIGKILL
    assert not Path(f"/proc/{server.pid}").exists()


# --- failures ---


@pytest.mark.root
def test_dump_of_a_missing_pid_raises_chkpnt_error_with_the_log(criu: Criu, tmp_path: Path) -> None:
    images = images_dir(tmp_path)
    pid = missing_pid()
    with pytest.raises(ChkpntError) as caught:
        criu.dump(CriuOptions(images_dir=images, pid=pid))

    error = caught.value
    assert error.exit_code == 16
    assert error.message.startswith(f"criu dump of pid {pid} failed: ")
    assert "\n" not in error.message
    assert "Error (" in error.detail
    assert f"CRIU log: {images / 'dump.log'}" in error.detail
    assert (images / "dump.log").exists()


@pytest.mark.root
def test_restore_without_images_raises_restore_error(criu: Criu, tmp_path: Path) -> None:
    images = images_dir(tmp_path)
    with pytest.raises(RestoreError) as caught:
        criu.restore(CriuOptions(images_dir=images))
    assert caught.value.exit_code == 17
    assert "Error (" in caught.value.detail
    assert str(images / "restore.log") in caught.value.detail


@pytest.mark.root
def test_failing_notify_callback_aborts_the_dump(criu: Criu, counter_tree: CounterTree, tmp_path: Path) -> None:
    def refuse(script: str, pid: int) -> None:
        if script == "post-dump":
            raise RuntimeError("destination is not ready")

    with pytest.raises(ChkpntError, match="post-dump callback failed: destination is not ready") as caught:
        criu.dump(CriuOptions(images_dir=images_dir(tmp_path), pid=counter_tree.pid), notify=refuse)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "RPC client reported script error" in caught.value.detail
    counter_tree.wait_for_progress()  # CRIU resumed the tree


def test_swrk_dying_before_answering_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ChkpntError, match=r"criu swrk exited with code 1 before answering"):
        Criu("/bin/false").dump(CriuOptions(images_dir=tmp_path, pid=1))


def test_silent_criu_times_out_and_is_killed(tmp_path: Path) -> None:
    silent = tmp_path / "criu"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(silent.stat().st_mode | stat.S_IXUSR)
    started = time.monotonic()
    with pytest.raises(RestoreError, match=r"timed out after 0\.5s \(CRIU killed\)"):
        Criu(silent, timeout=0.5).restore(CriuOptions(images_dir=tmp_path))
    assert time.monotonic() - started < 5


@pytest.fixture
def frozen_stopped_tree(counter_tree: CounterTree) -> Iterator[Path]:
    """The counter tree's root stopped (SIGSTOP) and then frozen, alone in a v1 freezer cgroup (its path)."""
    os.kill(counter_tree.pid, signal.SIGSTOP)
    children = Path(f"/proc/{counter_tree.pid}/task/{counter_tree.pid}/children")
    wait_until(lambda: all(_is_zombie(int(pid)) for pid in children.read_text().split()), "its last sleep to exit")
    freezer = Path(f"/sys/fs/cgroup/freezer/vzpy-test-rpc-{os.getpid()}")
    freezer.mkdir()
    try:
        (freezer / "cgroup.procs").write_text(str(counter_tree.pid))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", "the freezer")
        yield freezer
    finally:
        (freezer / "freezer.state").write_text("THAWED")
        os.kill(counter_tree.pid, signal.SIGKILL)
        wait_until(lambda: (freezer / "cgroup.procs").read_text().strip() == "", "the tree to leave the cgroup")
        freezer.rmdir()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.root
def test_a_criu_blocked_seizing_a_stopped_frozen_task_is_killed_at_its_deadline(
    usable_criu: CriuBinary, counter_tree: CounterTree, frozen_stopped_tree: Path, tmp_path: Path
) -> None:
    """Given the freezer of a task both stopped and frozen, CRIU blocks in the kernel's ptrace attach (until a
    thaw); its deadline still ends it, and the caller gets its error without waiting for the thaw."""
    outcome: list[BaseException] = []

    def dump() -> None:
        opts = CriuOptions(images_dir=images_dir(tmp_path), pid=counter_tree.pid, freeze_cgroup=frozen_stopped_tree)
        try:
            Criu(usable_criu, timeout=4.0).dump(opts)
        except BaseException as e:
            outcome.append(e)

    caller = threading.Thread(target=dump, daemon=True)
    caller.start()
    caller.join(STUCK_CRIU_WAIT)
    stuck = caller.is_alive()
    (frozen_stopped_tree / "freezer.state").write_text("THAWED")  # lets a CRIU stuck in the kernel go on
    caller.join(STUCK_CRIU_WAIT)
    assert not stuck, "the dump's caller still waits for a killed CRIU"
    assert len(outcome) == 1 and isinstance(outcome[0], ChkpntError), outcome
    assert "timed out after 4s" in outcome[0].message, outcome[0].message
    assert (frozen_stopped_tree / "cgroup.procs").read_text().split() == [str(counter_tree.pid)]


@pytest.mark.root
def test_a_task_of_the_freezer_cgroup_outside_the_tree_fails_the_dump(
    criu: Criu, counter_tree: CounterTree, tmp_path: Path
) -> None:
    """CRIU only warns about a task of the freezer cgroup that is not in the tree it dumps (one that joined
    after the pre-freeze check, say a `vzpy exec`'s command), and leaves it out: a kill after the dump would
    lose it. The dump fails instead, naming it; the tree is left as it was."""
    freezer = Path(f"/sys/fs/cgroup/freezer/vzpy-test-rpc-stray-{os.getpid()}")
    freezer.mkdir()
    stray = subprocess.Popen(["sleep", "600"])
    try:
        for pid in (counter_tree.pid, stray.pid):
            (freezer / "cgroup.procs").write_text(str(pid))
        opts = CriuOptions(
            images_dir=images_dir(tmp_path), pid=counter_tree.pid, freeze_cgroup=freezer, leave_running=True
        )
        with pytest.raises(ChkpntError, match=f"task {stray.pid} of {freezer} is outside the dumped tree"):
            criu.dump(opts)
        assert stray.poll() is None
        counter_tree.wait_for_progress()
    finally:
        stray.kill()
        stray.wait()
        (freezer / "freezer.state").write_text("THAWED")
        for pid in (freezer / "cgroup.procs").read_text().split():
            Path("/sys/fs/cgroup/freezer/cgroup.procs").write_text(pid)
        freezer.rmdir()


@pytest.mark.root
def test_a_dump_past_abort_after_stops_cleanly_and_leaves_the_tree_running(
    usable_criu: CriuBinary, counter_tree: CounterTree, tmp_path: Path
) -> None:
    """abort_after runs out while CRIU holds the tree (here: during the network-lock notification); CRIU is told
    to abort there, not killed (a SIGKILL while its parasite code runs in a task kills that task)."""
    seen: list[str] = []

    def slow_network_lock(script: str, _pid: int) -> None:
        seen.append(script)
        if script == "network-lock":
            time.sleep(1.0)

    opts = CriuOptions(images_dir=images_dir(tmp_path), pid=counter_tree.pid, leave_running=True)
    with pytest.raises(ChkpntError, match=r"ran past its 0\.5s and was aborted at network-lock") as caught:
        Criu(usable_criu, timeout=30).dump(opts, notify=slow_network_lock, abort_after=0.5)
    assert "timed out" not in caught.value.message and "post-dump" not in seen
    counter_tree.wait_for_progress()  # released intact


# --- asking CRIU about itself ---


@pytest.mark.root
def test_version_over_rpc_matches_the_cli(criu: Criu, usable_criu: CriuBinary) -> None:
    assert criu.version() == usable_criu.version


@pytest.mark.root
def test_check_and_feature_check(criu: Criu) -> None:
    criu.check()
    features = criu.feature_check()
    assert set(features) == {"mem_track", "lazy_pages", "pidfd_store"}
    assert features["mem_track"] == criu.check_feature("mem_dirty_track")
    with pytest.raises(ValueError, match="no feature"):
        criu.check_feature("no_such_feature")


@pytest.mark.root
def test_feature_report_agrees_with_criu_check(usable_criu: CriuBinary, tmp_path: Path) -> None:
    check = [usable_criu.path, "check", "--feature", "mem_dirty_track"]
    tracks_memory = subprocess.run(check, capture_output=True, timeout=WAIT).returncode == 0

    caps = detect_capabilities(usable_criu, tmp_path / "cache")
    plan = derive_plan(caps)

    assert caps.has("mem_dirty_track") is tracks_memory
    if tracks_memory:
        assert plan.memory == "pre-copy"
    else:
        assert plan.memory == "stop-and-copy"
        assert (
            "pre-copy migration unavailable: kernel lacks soft-dirty tracking (mem_dirty_track); "
            "using stop-and-copy with page-server streaming"
        ) in plan.sentences
    if caps.has("uffd") and caps.has("uffd-noncoop"):
        assert caps.lazy_pages is not None and caps.lazy_pages_note  # probed, with what happened
    assert plan.postcopy_available is (caps.lazy_pages is True)


@pytest.mark.root
def test_feature_cache_makes_the_second_detection_fast(usable_criu: CriuBinary, tmp_path: Path) -> None:
    first = detect_capabilities(usable_criu, tmp_path)
    started = time.monotonic()
    second = detect_capabilities(usable_criu, tmp_path)
    assert time.monotonic() - started < 0.1
    assert not first.cached and second.cached
    assert (second.features, second.lazy_pages) == (first.features, first.lazy_pages)
    unprobed = detect_capabilities(usable_criu, tmp_path, probe_lazy=False, refresh=True)
    assert not unprobed.cached
    if unprobed.has("uffd") and unprobed.has("uffd-noncoop"):
        # A cache written without the probe does not answer a caller who wants it.
        assert unprobed.lazy_pages is None
        assert not detect_capabilities(usable_criu, tmp_path).cached


@pytest.mark.root
@pytest.mark.requires_criu_feature("mem_dirty_track")
def test_pre_dump_then_dump(criu: Criu, counter_tree: CounterTree, tmp_path: Path) -> None:
    first, final = images_dir(tmp_path, "1"), images_dir(tmp_path, "2")
    criu.pre_dump(CriuOptions(images_dir=first, pid=counter_tree.pid, track_mem=True))
    counter_tree.wait_for_progress()
    criu.dump(CriuOptions(images_dir=final, pid=counter_tree.pid, track_mem=True, parent_img="../1"))
    assert (final / "inventory.img").exists()


@pytest.mark.root
def test_pre_dump_without_dirty_tracking_fails_cleanly(criu: Criu, counter_tree: CounterTree, tmp_path: Path) -> None:
    if criu.check_feature("mem_dirty_track"):
        pytest.skip("this kernel tracks dirty memory: see test_pre_dump_then_dump")
    with pytest.raises(ChkpntError, match=f"criu pre-dump of pid {counter_tree.pid} failed"):
        criu.pre_dump(CriuOptions(images_dir=images_dir(tmp_path), pid=counter_tree.pid, track_mem=True))
    counter_tree.wait_for_progress()
