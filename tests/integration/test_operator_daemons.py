"""Daemons started the operator's way, with `vzpy exec` (busybox's setsid, `&`, su to a non-root user, a
command left running or stopped with ^Z), survive chkpnt/restore through a dump file with their memory: the
daemon holds a random pattern the test wrote and answers its CRC-32 on SIGUSR1. Real CTs, real CRIU."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from helpers import VZPY, VzRoot, read_pty
from vzpy import dumpable

pytestmark = pytest.mark.root
CTID = "173"
PATTERN_BYTES = 8 << 20
NOBODY = 65534
T = TypeVar("T")

# Copies a file into anonymous memory, then writes "pid ppid size crc32" of that memory to ANSWER at start and
# on every SIGUSR1 (through ANSWER.tmp and a rename, so a reader never sees half of it).
MEMD_C = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile sig_atomic_t asked = 1;
static void on_usr1(int sig) { (void)sig; asked = 1; }

static unsigned long crc32(const unsigned char *p, size_t n) {
    unsigned long c = 0xfffffffful;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320ul ^ (c >> 1) : c >> 1;
    }
    return c ^ 0xfffffffful;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) return 1;
    size_t size = (size_t)st.st_size;
    unsigned char *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t done = 0; done < size;) {
        ssize_t got = read(fd, memory + done, size - done);
        if (got <= 0) return 1;
        done += (size_t)got;
    }
    close(fd);
    signal(SIGUSR1, on_usr1);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
    for (;;) {
        if (!asked) { pause(); continue; }
        asked = 0;
        FILE *out = fopen(tmp, "w");
        if (!out) continue;
        fprintf(out, "%d %d %lu %lu\n", (int)getpid(), (int)getppid(), (unsigned long)size, crc32(memory, size));
        fclose(out);
        rename(tmp, argv[2]);
    }
}
"""


@pytest.fixture(scope="module")
def memd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memd")
    (out / "memd.c").write_text(MEMD_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out / "memd"), str(out / "memd.c")], check=True)
    return out / "memd"


@pytest.fixture
def ct(vzroot: VzRoot, memd: Path) -> Iterator[VzRoot]:
    """CT 173 running, with /usr/bin/memd and /tmp/pattern (random bytes)."""
    vzroot.run("create", CTID, "--ostemplate", "minimal", "--ipadd", vzroot.new_ip(), check=True)
    target = vzroot.private(CTID) / "usr" / "bin" / "memd"
    target.write_bytes(memd.read_bytes())
    target.chmod(0o755)
    pattern = vzroot.private(CTID) / "tmp" / "pattern"
    pattern.write_bytes(os.urandom(PATTERN_BYTES))
    pattern.chmod(0o644)
    vzroot.run("start", CTID, check=True)
    yield vzroot


def expected_crc(vz: VzRoot) -> int:
    return zlib.crc32((vz.private(CTID) / "tmp" / "pattern").read_bytes())


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """probe()'s first truthy answer (a deadline for what the CT does, not a timed assert)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        time.sleep(0.05)


def read_answer(vz: VzRoot, name: str) -> tuple[int, int, int, int] | None:
    """memd's answer, read with `vzpy exec CTID cat` as an operator would: (pid, ppid, size, crc) in the CT."""
    result = vz.run("exec", CTID, "cat", f"/tmp/{name}", stdin=subprocess.DEVNULL)
    words = result.stdout.split()
    if result.returncode != 0 or len(words) != 4:
        return None
    pid, ppid, size, crc = map(int, words)
    return pid, ppid, size, crc


def ask(vz: VzRoot, pid_in_ct: int, name: str) -> tuple[int, int, int, int]:
    """Make the daemon check its memory again (SIGUSR1 sent from inside the CT) and return its fresh answer."""
    vz.run("exec", CTID, "rm", "-f", f"/tmp/{name}", stdin=subprocess.DEVNULL, check=True)
    vz.run("exec", CTID, "kill", "-USR1", str(pid_in_ct), stdin=subprocess.DEVNULL, check=True)
    return eventually(lambda: read_answer(vz, name), f"an answer in /tmp/{name}")


def ct_tasks(vz: VzRoot) -> list[int]:
    procs = Path(f"/sys/fs/cgroup/freezer/{vz.cgroup_parent}/{CTID}/cgroup.procs")
    return [int(pid) for pid in procs.read_text().split()]


def host_pid(vz: VzRoot, pid_in_ct: int) -> int:
    """The host pid of the CT's task `pid_in_ct` (from the NSpid lines of the CT's cgroup members)."""
    for pid in ct_tasks(vz):
        with contextlib.suppress(OSError):
            if status_field(pid, "NSpid").split()[-1] == str(pid_in_ct):
                return pid
    raise AssertionError(f"no task with pid {pid_in_ct} in CT {CTID}")


def status_field(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} for pid {pid}")


def assert_a_child_of_the_cts_init(vz: VzRoot, pid_in_ct: int) -> None:
    """Still parented by the CT's init, in its PID and time namespaces (nothing re-parented it to the host)."""
    init, pid = vz.state(CTID)["init_pid"], host_pid(vz, pid_in_ct)
    assert int(status_field(pid, "PPid")) == init
    for ns in ("pid", "time"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{init}/ns/{ns}"), ns


def chkpnt_and_restore(vz: VzRoot, dump: Path) -> None:
    vz.run("chkpnt", CTID, "--dumpfile", str(dump), check=True)
    assert "down" in vz.run("status", CTID, check=True).stdout
    vz.run("restore", CTID, "--dumpfile", str(dump), check=True)
    assert "running" in vz.run("status", CTID, check=True).stdout


def start_detached(vz: VzRoot, answer: str) -> tuple[int, int, int, int]:
    """memd detached the usual way: a line for the CT's shell with setsid, stdio on /dev/null, and `&`."""
    line = f"setsid memd /tmp/pattern /tmp/{answer} </dev/null >/dev/null 2>&1 &"
    vz.run("exec", CTID, line, stdin=subprocess.DEVNULL, check=True)
    return eventually(lambda: read_answer(vz, answer), "the detached daemon's first answer")


def test_a_daemon_detached_with_vzpy_exec_keeps_its_memory_through_a_dump_file(ct: VzRoot, tmp_path: Path) -> None:
    vz = ct
    pid, ppid, size, crc = start_detached(vz, "answer")
    assert (ppid, size, crc) == (1, PATTERN_BYTES, expected_crc(vz)), "the shell's child went to the CT's init"

    chkpnt_and_restore(vz, tmp_path / "Dump")

    assert ask(vz, pid, "answer") == (pid, 1, PATTERN_BYTES, expected_crc(vz))
    assert_a_child_of_the_cts_init(vz, pid)


def test_a_daemon_started_after_a_restore_survives_the_next_one(ct: VzRoot, tmp_path: Path) -> None:
    """A restored CT runs in the time namespace CRIU made for it: `vzpy exec` must start commands there, or the
    next restore fails ("Can't restore sub-task in NS")."""
    vz = ct
    chkpnt_and_restore(vz, tmp_path / "Dump.1")
    # argv form: busybox setsid forks (the command leads its session already), the daemon keeps exec's pipes
    vz.run("exec", CTID, "setsid", "memd", "/tmp/pattern", "/tmp/late", stdin=subprocess.DEVNULL, check=True)
    pid = eventually(lambda: read_answer(vz, "late"), "the daemon's first answer")[0]

    chkpnt_and_restore(vz, tmp_path / "Dump.2")

    assert ask(vz, pid, "late") == (pid, 1, PATTERN_BYTES, expected_crc(vz))
    assert_a_child_of_the_cts_init(vz, pid)


def test_a_daemon_of_a_non_root_user(ct: VzRoot, tmp_path: Path) -> None:
    """Started with su as nobody. CRIU reads every task's rlimits, which needs CAP_SYS_RESOURCE for a task of
    another uid: where root lacks it (this kind of machine), chkpnt refuses at once in one line, before anything
    is frozen, and the CT runs on untouched; where root has it, the daemon comes back as itself."""
    vz = ct
    line = "su -s /bin/sh nobody -c 'setsid memd /tmp/pattern /tmp/nobody </dev/null >/dev/null 2>&1 &'"
    vz.run("exec", CTID, line, stdin=subprocess.DEVNULL, check=True)
    pid = eventually(lambda: read_answer(vz, "nobody"), "nobody's daemon's first answer")[0]
    assert status_field(host_pid(vz, pid), "Uid").split()[0] == str(NOBODY)
    dump = tmp_path / "Dump"

    if dumpable.has_capability(dumpable.CAP_SYS_RESOURCE):
        chkpnt_and_restore(vz, dump)
    else:
        refused = vz.run("chkpnt", CTID, "--dumpfile", str(dump))
        assert refused.returncode == 16, refused.stderr
        [message] = refused.stderr.splitlines()
        assert message.startswith(f"vzpy: error: CT {CTID} cannot be checkpointed: pid "), message
        assert f"(memd, pid {pid} in the CT) runs as uid {NOBODY}" in message
        assert "CAP_SYS_RESOURCE" in message and "Can't get rlimit" in message
        assert not dump.exists()
        assert "running" in vz.run("status", CTID, check=True).stdout

    assert ask(vz, pid, "nobody") == (pid, 1, PATTERN_BYTES, expected_crc(vz))
    assert_a_child_of_the_cts_init(vz, pid)


def zombies_of(vz: VzRoot, parent_comm: str) -> list[tuple[int, int]]:
    """(parent, zombie) host pids: the unreaped children of the CT's tasks named parent_comm."""
    found = []
    for parent in ct_tasks(vz):
        with contextlib.suppress(OSError):
            if status_field(parent, "Name") != parent_comm:
                continue
            for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
                if status_field(int(child), "State").startswith("Z"):
                    found.append((parent, int(child)))
    return found


def test_a_zombie_left_by_a_detached_vzpy_exec_command(ct: VzRoot, tmp_path: Path) -> None:
    vz = ct
    # the shell's child exits at once; the shell then becomes sleep, which never reaps it
    line = "setsid sh -c 'sleep 0 & exec sleep 1001' </dev/null >/dev/null 2>&1 &"
    vz.run("exec", CTID, line, stdin=subprocess.DEVNULL, check=True)
    [(parent, _)] = eventually(lambda: zombies_of(vz, "sleep"), "the zombie")
    assert int(status_field(parent, "PPid")) == vz.state(CTID)["init_pid"]

    chkpnt_and_restore(vz, tmp_path / "Dump")

    [(parent, _)] = eventually(lambda: zombies_of(vz, "sleep"), "the zombie after the restore")
    assert int(status_field(parent, "PPid")) == vz.state(CTID)["init_pid"]


@contextlib.contextmanager
def running_exec(vz: VzRoot, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """`vzpy exec CTID argv...` left running on the host (`&`, or a terminal's ^Z then bg). In a process group
    of its own under this one, as a shell's job is: a group whose parents are all outside the session (pytest
    started by setsid, by a CI runner) is orphaned, and the kernel discards a ^Z (SIGTSTP) sent to it."""
    command = subprocess.Popen(
        [VZPY, "exec", CTID, *argv],
        env=vz.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        process_group=0,
    )
    try:
        yield command
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


def test_a_command_of_a_vzpy_exec_still_running_is_refused_not_lost(ct: VzRoot, tmp_path: Path) -> None:
    """The command's parent is vzpy's helper on the host, so it is outside the init's tree, the only one CRIU
    dumps: chkpnt must refuse, not kill it with the CT and restore the CT without it."""
    vz = ct
    dump = tmp_path / "Dump"
    with running_exec(vz, "--", "sh", "-c", "sleep 0 & exec memd /tmp/pattern /tmp/fg") as command:
        pid = eventually(lambda: read_answer(vz, "fg"), "the command's first answer")[0]
        assert eventually(lambda: zombies_of(vz, "memd"), "the command's zombie")
        os.kill(command.pid, signal.SIGTSTP)  # ^Z: vzpy stops; the command in the CT runs on
        eventually(lambda: status_field(command.pid, "State").startswith("T"), "vzpy stopped")

        refused = vz.run("chkpnt", CTID, "--dumpfile", str(dump))
        assert refused.returncode == 16, refused.stderr
        [message] = refused.stderr.splitlines()
        assert f"(memd, pid {pid} in the CT) was started by a `vzpy exec`" in message, message
        assert not dump.exists()
        assert "running" in vz.run("status", CTID, check=True).stdout
        assert ask(vz, pid, "fg") == (pid, 0, PATTERN_BYTES, expected_crc(vz))  # ppid 0: outside the CT

        os.kill(command.pid, signal.SIGCONT)  # fg
        command.terminate()  # forwarded to the command
        assert command.wait(timeout=30) == 128 + signal.SIGTERM

    chkpnt_and_restore(vz, dump)  # nothing outside the tree any more


def test_a_short_vzpy_exec_still_running_when_chkpnt_starts_is_waited_for(ct: VzRoot, tmp_path: Path) -> None:
    """A cron job's `vzpy exec` that ends within chkpnt's grace (dumpable.EXEC_GRACE) is let end; chkpnt goes on."""
    vz = ct
    with subprocess.Popen([VZPY, "exec", CTID, "sleep", "1.2"], env=vz.env, stdin=subprocess.DEVNULL) as command:
        eventually(lambda: exec_command_running(vz, "sleep"), "the exec's sleep in the CT")
        chkpnt_and_restore(vz, tmp_path / "Dump")
        assert command.wait(timeout=30) == 0


def exec_command_running(vz: VzRoot, comm: str) -> bool:
    """A task `comm` of the CT whose parent is outside the CT: a command of a `vzpy exec` still running."""
    tasks = ct_tasks(vz)
    for pid in tasks:
        with contextlib.suppress(OSError):
            if status_field(pid, "Name") == comm and int(status_field(pid, "PPid")) not in tasks:
                return True
    return False


def test_a_daemon_stopped_in_the_ct_comes_back_stopped_with_its_memory(ct: VzRoot, tmp_path: Path) -> None:
    vz = ct
    pid = start_detached(vz, "stopped")[0]
    vz.run("exec", CTID, "kill", "-STOP", str(pid), stdin=subprocess.DEVNULL, check=True)
    eventually(lambda: status_field(host_pid(vz, pid), "State").startswith("T"), "the daemon stopped")

    chkpnt_and_restore(vz, tmp_path / "Dump")

    assert status_field(host_pid(vz, pid), "State").startswith("T"), "it comes back stopped"
    vz.run("exec", CTID, "kill", "-CONT", str(pid), stdin=subprocess.DEVNULL, check=True)
    assert ask(vz, pid, "stopped") == (pid, 1, PATTERN_BYTES, expected_crc(vz))
    assert_a_child_of_the_cts_init(vz, pid)


def test_a_job_sent_to_the_background_with_ctrl_z_in_an_enter_shell(ct: VzRoot, tmp_path: Path) -> None:
    """`vzpy enter`, the daemon run in the foreground, ^Z, `bg`, `exit`: it stays, on the CT's own pty."""
    vz = ct
    child, master = pty.fork()
    if child == 0:
        os.execve(VZPY, [VZPY, "enter", CTID], vz.env)
    try:
        read_pty(master, until=b"# ")
        os.write(master, b"memd /tmp/pattern /tmp/job\r")
        pid = eventually(lambda: read_answer(vz, "job"), "the job's first answer")[0]
        os.write(master, b"\x1a")  # ^Z
        read_pty(master, until=b"# ")
        eventually(lambda: status_field(host_pid(vz, pid), "State").startswith("T"), "the job stopped")
        os.write(master, b"bg\r")
        read_pty(master, until=b"# ")
        os.write(master, b"exit\r")
        read_pty(master, until=None)
    except BaseException:
        os.kill(child, signal.SIGKILL)
        raise
    finally:
        os.waitpid(child, 0)
        os.close(master)
    assert not status_field(host_pid(vz, pid), "State").startswith("T")

    chkpnt_and_restore(vz, tmp_path / "Dump")

    assert ask(vz, pid, "job") == (pid, 1, PATTERN_BYTES, expected_crc(vz))
    assert_a_child_of_the_cts_init(vz, pid)
