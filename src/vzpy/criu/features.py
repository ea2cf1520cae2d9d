"""What this host can do with CRIU, and which migration path vzpy takes because of it.

CRIU's feature bits depend only on the kernel and the CRIU build, so they are cached in a file keyed by
both (`vzpy check` stays fast). Lazy pages are not trusted from the bits: uffd can be "supported" while
a lazy dump fails (here: `page-pipe: tee: ... Operation not permitted`), so post-copy counts as available
only after a real round trip (lazy dump, lazy-pages daemon, lazy restore) of a throwaway process worked.
Tools and cgroup mounts can change at any time and are looked at live.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vzpy import fileio, proc
from vzpy.criu.binary import CriuBinary, kernel_release
from vzpy.criu.options import NetworkLock
from vzpy.criu.rpc import Criu, first_error, read_log
from vzpy.errors import VzError
from vzpy.host import mounts

CRIU_FEATURES = (
    "mem_dirty_track",
    "uffd",
    "uffd-noncoop",
    "network_lock_nftables",
    "tcp_half_closed",
    "pidfd_store",
    "timens",
)
CACHE_FILE = "criu-features.json"
KERNDAT_CACHE = Path("/run/criu.kdat")  # where CRIU run as root caches its kernel probe (KDAT_RUNDIR)
DEFAULT_CACHE_DIR = Path("/var/cache/vzpy")
FACT_KEYS = {"features", "page_server", "lazy_pages", "lazy_pages_note", "lazy_probe_seconds"}
CACHE_FORMAT = 1
PROBE_TIMEOUT = 60.0  # a loaded, emulated VM takes 5-20 s
PROBE_ADDRESS = "127.0.0.1"
NO_LOG_ERROR = "no error in the logs"
NOT_STARTED = "probe could not start a throwaway process"
PROBE_PROGRAM = """
import time
memory = bytearray(4 << 20)
memory[::4096] = b"x" * len(memory[::4096])
time.sleep(60)
"""

FEATURE_NOTES = {
    "mem_dirty_track": "soft-dirty memory tracking: pre-copy (iterative pre-dump)",
    "uffd": "userfaultfd: lazy pages (post-copy)",
    "uffd-noncoop": "non-cooperative userfaultfd: lazy pages of forking/remapping tasks",
    "network_lock_nftables": "CRIU can lock the CT's network with nftables",
    "tcp_half_closed": "half-closed TCP connections can be dumped",
    "pidfd_store": "pidfd store: pid reuse between pre-dumps is detected",
    "timens": "time namespaces: CT clocks stay monotonic across a migration",
}


@dataclass
class HostCapabilities:
    kernel: str
    criu_path: str
    criu_version: str
    # `criu check --feature NAME` for CRIU_FEATURES. (Plain `criu check`, which covers TCP repair, has
    # already passed: require_criu() refuses a CRIU that fails it.)
    features: dict[str, bool]
    # The binary has the page-server command.
    page_server: bool
    # A real lazy-pages round trip worked; None when not probed (no userfaultfd, or probing skipped).
    lazy_pages: bool | None
    lazy_pages_note: str
    lazy_probe_seconds: float | None
    # Cgroup freezer: ("v1", mountpoint) or ("v2", mountpoint); None when neither is usable.
    freezer: tuple[str, str] | None
    # iptables-restore and ip6tables-restore, which CRIU runs for its iptables network lock.
    iptables: bool
    # Filesystem type of /run, where CRIU (as root) caches its kernel probe (see kerndat_cached).
    run_fstype: str = "tmpfs"
    # The CRIU facts came from the cache file rather than from running CRIU now.
    cached: bool = False

    def has(self, feature: str) -> bool:
        return self.features.get(feature, False)

    def migration_facts(self) -> dict[str, Any]:
        """What decides a migration's path on this host (vzpy.migrate.paths), as sent in the agent's hello."""
        return {
            "kernel": self.kernel,
            "criu_version": self.criu_version,
            "mem_dirty_track": self.has("mem_dirty_track"),
            "page_server": self.page_server,
            "lazy_pages": self.lazy_pages,
            "lazy_pages_note": self.lazy_pages_note,
        }

    @property
    def tcp_repair(self) -> bool:
        return True  # part of `criu check`, which a CriuBinary has passed

    @property
    def network_lock(self) -> NetworkLock | None:
        if self.has("network_lock_nftables"):
            return NetworkLock.NFTABLES
        if self.iptables:
            return NetworkLock.IPTABLES
        return None


@dataclass(frozen=True)
class MigrationPlan:
    # "pre-copy" (pre-dump iterations while the CT runs) or "stop-and-copy".
    memory: str
    # Pages go straight to the destination's page server instead of into image files first.
    page_server: bool
    # Post-copy (lazy pages) works here; vzpy never picks it by default.
    postcopy_available: bool
    network_lock: NetworkLock | None
    # Freeze the CT with its freezer cgroup (else CRIU freezes task by task with ptrace).
    freeze_cgroup: bool
    # Established TCP connections can be migrated (TCP repair + a network lock).
    tcp_established: bool
    sentences: list[str] = field(default_factory=list)


class FeatureRow(NamedTuple):
    feature: str
    ok: bool
    note: str


@dataclass(frozen=True)
class CapabilityReport:
    capabilities: HostCapabilities
    plan: MigrationPlan
    rows: list[FeatureRow]

    @property
    def sentences(self) -> list[str]:
        return self.plan.sentences

    def as_dict(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "kernel": caps.kernel,
            "criu": {"path": caps.criu_path, "version": caps.criu_version},
            "cached": caps.cached,
            "lazy_probe_seconds": caps.lazy_probe_seconds,
            "features": {row.feature: {"ok": row.ok, "note": row.note} for row in self.rows},
            "plan": {
                **{key: value for key, value in asdict(self.plan).items() if key != "sentences"},
                "network_lock": str(self.plan.network_lock) if self.plan.network_lock else None,
            },
            "messages": self.sentences,
        }


# --- detection ----------------------------------------------------------------------------------


def detect_capabilities(
    binary: CriuBinary, cache_dir: Path | None = None, *, probe_lazy: bool = True, refresh: bool = False
) -> HostCapabilities:
    """The host's capabilities; CRIU facts from `cache_dir`'s cache when it matches this kernel+CRIU."""
    key = _cache_key(binary)
    facts = None if refresh or cache_dir is None else _load_cache(cache_dir, key)
    if facts is not None and probe_lazy and facts["lazy_pages"] is None:
        facts = None  # cached by a run that skipped the probe
    cached = facts is not None
    if facts is None:
        facts = _criu_facts(binary, probe_lazy=probe_lazy)
        if cache_dir is not None and not _inconclusive(facts):
            _save_cache(cache_dir, key, facts)
    return HostCapabilities(
        kernel=key["kernel"],
        criu_path=str(binary.path),
        criu_version=str(binary.version),
        features=facts["features"],
        page_server=facts["page_server"],
        lazy_pages=facts["lazy_pages"],
        lazy_pages_note=facts["lazy_pages_note"],
        lazy_probe_seconds=facts["lazy_probe_seconds"],
        freezer=find_freezer(),
        iptables=all(shutil.which(tool) for tool in ("iptables-restore", "ip6tables-restore")),
        run_fstype=mounts.fstype_at(KERNDAT_CACHE.parent),
        cached=cached,
    )


def _criu_facts(binary: CriuBinary, *, probe_lazy: bool) -> dict[str, Any]:
    criu = Criu(binary)
    features = {name: criu.check_feature(name) for name in CRIU_FEATURES}
    help_text = proc.run([binary.path, "--help"], check=False, timeout=30)
    facts: dict[str, Any] = {
        "features": features,
        "page_server": "page-server" in help_text.stdout + help_text.stderr,
        "lazy_pages": None,
        "lazy_pages_note": "",
        "lazy_probe_seconds": None,
    }
    if not (features["uffd"] and features["uffd-noncoop"]):
        facts["lazy_pages"] = False
        facts["lazy_pages_note"] = "kernel lacks userfaultfd (uffd, uffd-noncoop)"
    elif probe_lazy:
        started = time.monotonic()
        works, note = probe_lazy_pages(binary.path)
        facts.update(lazy_pages=works, lazy_pages_note=note)
        facts["lazy_probe_seconds"] = round(time.monotonic() - started, 3)
    else:
        facts["lazy_pages_note"] = "not probed"
    return facts


def _inconclusive(facts: dict[str, Any]) -> bool:
    """A lazy-pages probe that failed without CRIU naming an error (it ran out of time, or could not start):
    not a fact of this kernel and CRIU, so not kept for the next run."""
    note = str(facts.get("lazy_pages_note") or "")
    return facts.get("lazy_pages") is False and (note.endswith(NO_LOG_ERROR) or note.startswith(NOT_STARTED))


def _cache_key(binary: CriuBinary) -> dict[str, Any]:
    try:
        mtime = binary.path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return {
        "format": CACHE_FORMAT,
        "kernel": kernel_release(),
        "criu_path": str(binary.path),
        "criu_version": str(binary.version),
        "criu_mtime_ns": mtime,
    }


def _load_cache(cache_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads((cache_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("facts"), dict):
        return None
    facts: dict[str, Any] = data["facts"]
    if set(facts) != FACT_KEYS or set(facts["features"]) != set(CRIU_FEATURES):
        return None
    return facts


def _save_cache(cache_dir: Path, key: dict[str, Any], facts: dict[str, Any]) -> None:
    """Best effort: an unwritable cache dir only means the next run probes again."""
    with suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"key": key, "facts": facts}, indent=2) + "\n"
        fileio.write_atomic(cache_dir / CACHE_FILE, record, mode=0o644, durable=False)


def find_freezer(table: Sequence[mounts.Mount] | None = None) -> tuple[str, str] | None:
    """The cgroup freezer: a v1 hierarchy with the freezer controller, else cgroup2 (cgroup.freeze)."""
    if table is None:
        try:
            table = mounts.mounts()
        except OSError:
            return None
    v2 = None
    for mount in table:
        if mount.fstype == "cgroup" and "freezer" in mount.super_options | mount.options:
            return ("v1", mount.point)
        if mount.fstype == "cgroup2" and v2 is None:
            v2 = ("v2", mount.point)
    # cgroup.freeze exists in every non-root cgroup of a kernel with the v2 freezer (>= 5.2).
    if v2 and any(Path(v2[1]).glob("*/cgroup.freeze")):
        return v2
    return None


def kerndat_cached(caps: HostCapabilities) -> bool:
    """Whether CRIU can keep its kernel probe in /run/criu.kdat: it writes it only onto a tmpfs (the file must
    go at reboot). Without it every CRIU run probes the kernel afresh (25 ms here, 0.7 ms from the cache),
    once in each dump and each restore, inside the CT's frozen time."""
    return caps.run_fstype == "tmpfs"


# --- the lazy-pages probe -----------------------------------------------------------------------


def probe_lazy_pages(binary: Path, *, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Post-copy for real: lazy dump of a throwaway process, lazy-pages daemon, lazy restore."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="vzpy-lazy-probe-") as tmp, ExitStack() as cleanup:
        images = Path(tmp)
        try:
            pid = cleanup.enter_context(_throwaway_tree(deadline))
        except (OSError, VzError) as e:
            return False, f"{NOT_STARTED}: {e}"
        port = str(_free_port())
        where = ["--address", PROBE_ADDRESS, "--port", port]
        dump_args = ["dump", "-t", str(pid), "--lazy-pages", *where]
        dump = cleanup.enter_context(_start_ready(binary, dump_args, images, "dump", deadline))
        if dump.poll() is None:
            lazy_args = ["lazy-pages", "--page-server", *where]
            lazy = cleanup.enter_context(_start_ready(binary, lazy_args, images, "lazy", deadline))
            restore = [str(binary), "restore", "-D", str(images), "--lazy-pages", "-d", "--pidfile", "restored.pid"]
            with proc.spawn([*restore, "-o", "restore.log"], timeout=_left(deadline)) as restoring:
                restoring.wait()
            cleanup.callback(_kill_restored, images / "restored.pid")
            exits = [dump.wait(), lazy.wait()]
            if exits == [0, 0] and _restored_alive(images / "restored.pid"):
                return True, "lazy dump + lazy-pages + lazy restore round trip worked"
        reason = _first_log_error(images, ("dump.log", "lazy.log", "restore.log"))
        return False, f"a lazy-pages round trip failed here: {reason or NO_LOG_ERROR}"


@contextmanager
def _throwaway_tree(deadline: float) -> Iterator[int]:
    """A process with a few MiB of touched memory (lazy transfers of only a handful of pages fail in
    ways a real CT never sees), as pid 1 of its own pid namespace and session: restorable while the
    original still lives (the lazy dump kills it only once all pages are transferred)."""
    argv = ["unshare", "--pid", "--fork", "--", "setsid", sys.executable, "-c", PROBE_PROGRAM]
    with proc.spawn(argv, timeout=_left(deadline), what="the probe's throwaway process", new_session=True) as holder:
        child = None
        try:
            child = _first_child(holder.pid, deadline)
            yield child
        finally:
            # pid 1 of a pid namespace ignores SIGTERM: SIGKILL it; leaving the block kills and reaps unshare.
            if child is not None:
                with suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


def _first_child(pid: int, deadline: float) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        text = children.read_text().split()
        if text:
            return int(text[0])
        time.sleep(0.01)
    raise OSError("unshare did not start its child in time")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((PROBE_ADDRESS, 0))
        return int(s.getsockname()[1])


def _start_ready(binary: Path, args: Sequence[str], images: Path, name: str, deadline: float) -> proc.Child:
    """Start a CRIU command and wait until it reports ready on --status-fd (or exits)."""
    ready_r, ready_w = os.pipe()
    try:
        command: list[str | Path] = [binary, *args, "-D", images, "-o", f"{name}.log", "--status-fd", str(ready_w)]
        child = proc.spawn(command, timeout=_left(deadline), what=f"criu {args[0]}", pass_fds=(ready_w,))
        os.close(ready_w)
        ready_w = -1
        select.select([ready_r], [], [], _left(deadline))
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return child


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _restored_alive(pidfile: Path) -> bool:
    try:
        return Path(f"/proc/{int(pidfile.read_text())}").exists()
    except (OSError, ValueError):
        return False


def _kill_restored(pidfile: Path) -> None:
    with suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _first_log_error(images: Path, names: Sequence[str]) -> str | None:
    for name in names:
        message = first_error(read_log(images / name))
        if message:
            return f"{name}: {message}"
    return None


# --- the plan and the report --------------------------------------------------------------------


def derive_plan(caps: HostCapabilities) -> MigrationPlan:
    """The path vzpy takes on this host, with one sentence per decision that says why."""
    sentences: list[str] = []
    precopy = caps.has("mem_dirty_track")
    streaming = "page-server streaming" if caps.page_server else "image files copied after the dump"
    if precopy:
        sentences.append("pre-copy migration available: memory is copied while the CT runs (mem_dirty_track)")
    else:
        sentences.append(
            "pre-copy migration unavailable: kernel lacks soft-dirty tracking (mem_dirty_track); "
            f"using stop-and-copy with {streaming}"
        )
    sentences.append(_postcopy_sentence(caps))
    lock = caps.network_lock
    sentences.append(_network_lock_sentence(caps, lock))
    sentences.append(_freezer_sentence(caps))
    return MigrationPlan(
        memory="pre-copy" if precopy else "stop-and-copy",
        page_server=caps.page_server,
        postcopy_available=caps.lazy_pages is True,
        network_lock=lock,
        freeze_cgroup=caps.freezer is not None,
        tcp_established=caps.tcp_repair and lock is not None,
        sentences=sentences,
    )


def _postcopy_sentence(caps: HostCapabilities) -> str:
    if caps.lazy_pages is True:
        return "post-copy migration available: a lazy-pages round trip worked here"
    if caps.lazy_pages is None:
        return "post-copy migration not verified: lazy pages were not probed; vzpy will not use it"
    return f"post-copy migration unavailable: {caps.lazy_pages_note}"


def _network_lock_sentence(caps: HostCapabilities, lock: NetworkLock | None) -> str:
    if lock is NetworkLock.NFTABLES:
        return "network lock: nftables (network_lock_nftables)"
    if lock is NetworkLock.IPTABLES:
        return "network lock: iptables (CRIU cannot lock with nftables here)"
    return (
        "network lock unavailable: neither nftables (network_lock_nftables) nor iptables-restore; "
        "established TCP connections cannot be migrated"
    )


def _freezer_sentence(caps: HostCapabilities) -> str:
    if caps.freezer is None:
        return "no cgroup freezer: CRIU freezes tasks one by one with ptrace"
    version, mountpoint = caps.freezer
    return f"CT frozen with the cgroup {version} freezer ({mountpoint})"


def feature_rows(caps: HostCapabilities) -> list[FeatureRow]:
    rows = [FeatureRow(name, caps.has(name), FEATURE_NOTES[name]) for name in CRIU_FEATURES]
    lazy_note = caps.lazy_pages_note or "lazy-pages round trip"
    rows.append(FeatureRow("lazy_pages", caps.lazy_pages is True, lazy_note))
    rows.append(FeatureRow("tcp_repair", caps.tcp_repair, "`criu check` passed (it covers TCP repair)"))
    rows.append(FeatureRow("page_server", caps.page_server, "criu page-server: pages streamed over TCP"))
    freezer = f"cgroup {caps.freezer[0]} freezer at {caps.freezer[1]}" if caps.freezer else "no cgroup freezer"
    rows.append(FeatureRow("cgroup_freezer", caps.freezer is not None, freezer))
    rows.append(FeatureRow("iptables", caps.iptables, "iptables-restore for CRIU's iptables network lock"))
    rows.append(FeatureRow("kerndat_cache", kerndat_cached(caps), _kerndat_note(caps)))
    return rows


def _kerndat_note(caps: HostCapabilities) -> str:
    if kerndat_cached(caps):
        return f"CRIU caches its kernel probe in {KERNDAT_CACHE} (tmpfs)"
    fstype = caps.run_fstype or "unknown"
    return (
        f"{KERNDAT_CACHE.parent} is not a tmpfs ({fstype}): CRIU probes the kernel afresh in every dump and "
        f"restore (~25 ms each, with the CT frozen); mount a tmpfs on {KERNDAT_CACHE.parent}"
    )


def report(caps: HostCapabilities) -> CapabilityReport:
    return CapabilityReport(capabilities=caps, plan=derive_plan(caps), rows=feature_rows(caps))
