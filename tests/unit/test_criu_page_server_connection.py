"""A dump's connection to its page server, opened by vzpy and handed to CRIU (loopback TCP, no CRIU run).

CRIU corks the socket when it connects and never uncorks it: the close it sends last, whose answer it
waits for, then sat in the socket for the kernel's 200 ms cork limit with the CT frozen.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpy.criu.options import CriuOptions
from vzpy.criu.rpc import _page_server_connection, freezer_strays
from vzpy.errors import ChkpntError


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def corked(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


def cork(fd: int) -> None:
    """What CRIU does to the socket right after it gets it."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)


def dump_options(port: int, *, lazy_pages: bool = False) -> CriuOptions:
    return CriuOptions(images_dir=Path("/images"), pid=42, page_server=("127.0.0.1", port), lazy_pages=lazy_pages)


def test_the_connection_is_ours_blocking_and_handed_over_by_fd(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with _page_server_connection(dump_options(port), None, "dump") as (opts, notify, _cut_off):
        assert opts.page_server_fd is not None and notify is not None
        with socket.socket(fileno=os.dup(opts.page_server_fd)) as sock:
            assert sock.getpeername() == ("127.0.0.1", port)
            assert sock.getblocking()  # CRIU shares the file: a timeout of ours would make its I/O fail (EAGAIN)
        fd = opts.page_server_fd
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the dump is over


def test_the_cut_off_ends_a_send_blocked_on_a_page_server_that_stopped_reading(listener: socket.socket) -> None:
    """What CRIU sees when vzpy closes the connection at a deadline: its blocked send fails (EPIPE), its wait
    for an answer ends (EOF), instead of hanging until it is killed."""
    with _page_server_connection(dump_options(listener.getsockname()[1]), None, "dump") as (opts, _, cut_off):
        assert opts.page_server_fd is not None and cut_off is not None
        peer, _ = listener.accept()  # accepts, never reads
        with peer, socket.socket(fileno=os.dup(opts.page_server_fd)) as criu_side:
            criu_side.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    criu_side.send(bytes(1 << 16))  # until the buffers are full: the next send would block
            cut_off()
            with pytest.raises(BrokenPipeError):
                criu_side.send(b"page")
            assert criu_side.recv(16) == b""
            cut_off()  # twice (a peer gone already) is no error


def test_the_cork_comes_off_from_the_first_notification_after_criu_connected(listener: socket.socket) -> None:
    seen: list[tuple[str, int, int]] = []
    with _page_server_connection(
        dump_options(listener.getsockname()[1]), lambda script, pid: seen.append((script, pid, corked(fd))), "dump"
    ) as (opts, notify, _cut_off):
        assert opts.page_server_fd is not None and notify is not None
        fd = opts.page_server_fd
        notify("pre-dump", 0)  # CRIU has not connected yet: nothing to uncork
        cork(fd)
        notify("network-lock", 0)
        cork(fd)
        notify("post-dump", 0)
    assert seen == [("pre-dump", 0, 0), ("network-lock", 0, 0), ("post-dump", 0, 0)]


def test_the_callers_notify_failure_still_reaches_criu(listener: socket.socket) -> None:
    def refuse(script: str, pid: int) -> None:
        raise RuntimeError(f"no {script}")

    with _page_server_connection(dump_options(listener.getsockname()[1]), refuse, "dump") as (_, notify, _cut_off):
        assert notify is not None
        with pytest.raises(RuntimeError, match="no network-lock"):
            notify("network-lock", 0)


def test_nothing_is_opened_for_a_dump_without_page_server_or_a_lazy_one(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    for plain in (CriuOptions(images_dir=Path("/images"), pid=42), dump_options(port, lazy_pages=True)):
        with _page_server_connection(plain, None, "dump") as (opts, notify, cut_off):
            assert opts is plain and notify is None and cut_off is None


def test_a_page_server_nobody_listens_on_is_a_chkpnt_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connecting is refused
        connection = _page_server_connection(dump_options(port), None, "criu dump of pid 42")
        with pytest.raises(ChkpntError, match=f"cannot connect to the page server at 127.0.0.1:{port}"):
            connection.__enter__()


def test_the_tasks_criu_left_out_of_a_frozen_cgroup_are_read_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("(00.01) Warn  (criu/seize.c:403): Unexpected process 4242 in the freezer cgroup (status 0x137f)\n")
    assert freezer_strays(log) == [4242]
    log.write_text("(00.01) Dumping finished successfully\n")
    assert freezer_strays(log) == [] == freezer_strays(tmp_path / "missing.log") == freezer_strays(None)
