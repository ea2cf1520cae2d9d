"""The source's handle on the destination's agent: a typed method for every op of vzpy.migrate.ops,
errors raised with the agent's exit codes (vzpy.migrate.error_for_code)."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vzpy.errors import VzError
from vzpy.migrate import ConnectionBroken, DestinationNotReady
from vzpy.migrate.protocol import Client, Message
from vzpy.migrate.ssh import ChannelStream

if TYPE_CHECKING:
    from vzpy.migrate.ssh import SshSession

CONNECT_TIMEOUT = 60.0
BYE_TIMEOUT = 10.0
LONG_OP_TIMEOUT = 600.0  # restore and page-server waits, when no frozen-time budget bounds them
IMAGES_WITH_RESTORE = (1, 2)  # the protocol version whose restore takes the images along


def agent_argv(remote_vzpy: str = "vzpy") -> list[str]:
    return [remote_vzpy, "migrate-agent"]


class RemoteAgent:
    """Typed calls to a running agent. `timeout` bounds each call's wait for its reply (ConnectionTimeout,
    after which the connection is unusable)."""

    def __init__(self, client: Client, hello: Message) -> None:
        self.client = client
        self.hello = hello

    @property
    def usable(self) -> bool:
        """False after a timeout or a broken connection: any later call fails at once."""
        return self.client.usable

    def ping(self, *, timeout: float | None = None) -> float:
        return float(self.client.call("ping", timeout=timeout)["time"])

    def ct_exists(self, ctid: str, ips: Sequence[str] = (), *, timeout: float | None = None) -> Message:
        return self.client.call("ct_exists", ctid=ctid, ips=list(ips), timeout=timeout)

    def prepare(self, ctid: str, conf_text: str, *, token: str, keep_dst: bool = False) -> Message:
        """Paths on the destination: private, root, workdir, images_dir, conf."""
        return self.client.call("prepare", ctid=ctid, conf_text=conf_text, token=token, keep_dst=keep_dst)

    def page_server_start(self, ctid: str, subdir: str = "", parent: str = "") -> int:
        """Start a page server for the CT's images (subdir: one pre-dump iteration; parent: the iteration
        before, whose pages need not be sent again); its loopback port."""
        args: dict[str, Any] = {"parent": parent} if parent else {}
        return int(self.client.call("page_server_start", ctid=ctid, subdir=subdir, **args)["port"])

    def lazy_port(self, ctid: str) -> int:
        """Post-copy: a free loopback port there, for the tunnel to this host's lazy page server."""
        return int(self.client.call("lazy_port", ctid=ctid)["port"])

    def lazy_wait(self, ctid: str, *, timeout: float) -> int:
        """Post-copy, after the commit: wait for the lazy-pages daemon there to have every page; its exit code."""
        return int(self.client.call("lazy_wait", ctid=ctid, wait=timeout, timeout=timeout + 5.0)["exit_code"])

    def page_server_wait(self, ctid: str, subdir: str = "", timeout: float = LONG_OP_TIMEOUT) -> int:
        """Wait for the page server to finish; the bytes of memory pages it received."""
        reply = self.client.call("page_server_wait", ctid=ctid, subdir=subdir, wait=timeout, timeout=timeout + 5.0)
        return int(reply.get("bytes", 0))

    def page_server_stop(self, ctid: str, subdir: str = "", *, timeout: float | None = None) -> None:
        self.client.call("page_server_stop", ctid=ctid, subdir=subdir, timeout=timeout)

    def put_images(self, ctid: str, files: Mapping[str, str], *, timeout: float | None = None) -> int:
        """Write the named images (base64) into the CT's images dir there; how many."""
        return int(self.client.call("put_images", ctid=ctid, files=dict(files), timeout=timeout)["written"])

    @property
    def restore_takes_images(self) -> bool:
        """Whether restore can carry the images put_images would send (protocol 1.2)."""
        return self.client.version is not None and self.client.version >= IMAGES_WITH_RESTORE

    def restore(
        self,
        ctid: str,
        fs_fingerprint: Mapping[str, Any] | None,
        *,
        timeout: float = LONG_OP_TIMEOUT,
        lazy_port: int | None = None,
        images: Mapping[str, str] | None = None,
    ) -> int:
        """Restore the CT there, frozen (CRIU bounded by `timeout` there too); its init's pid. lazy_port:
        post-copy, its pages come from the lazy page server the tunnel reaches on that port there. images:
        what put_images would write, written first (only if restore_takes_images)."""
        args: dict[str, Any] = {} if lazy_port is None else {"lazy_port": lazy_port}
        if images is not None:
            args["images"] = dict(images)
        reply = self.client.call(
            "restore", ctid=ctid, fs_fingerprint=fs_fingerprint, deadline=timeout, timeout=timeout + 5.0, **args
        )
        return int(reply["init_pid"])

    def resume(self, ctid: str, *, timeout: float, held: list[str] | None = None) -> Message:
        """Commit the CT there and wake it, then deliver into it the TCP segments `held` for it while it was
        frozen (vzpy.runtime.tcpkick): frozen time there, interfaces announced on."""
        return self.client.call("resume", ctid=ctid, timeout=timeout, **({"held": held} if held else {}))

    def start(self, ctid: str, *, start: bool, timeout: float) -> Message:
        """Commit the CT there and (start) start it."""
        return self.client.call("start", ctid=ctid, start=start, timeout=timeout)

    def cleanup(self, ctid: str, keep_dst: bool | None = None, *, wait: float | None = None) -> list[str]:
        """Undo what was done for the CT there (with `wait`: wait that long for another agent's lock)."""
        args: dict[str, Any] = {} if keep_dst is None else {"keep_dst": keep_dst}
        if wait is not None:
            args.update(wait=wait, timeout=wait + CONNECT_TIMEOUT)
        return list(self.client.call("cleanup", ctid=ctid, **args)["removed"])

    def recover_state(self, ctid: str, *, wait: float) -> Message:
        """committed | prepared | kept | none, once no other agent works on the CT (waiting up to `wait`)."""
        return self.client.call("recover_state", ctid=ctid, wait=wait, timeout=wait + CONNECT_TIMEOUT)

    def recover_commit(self, ctid: str, *, start: bool) -> Message:
        """Finish a committed migration there: wake the CT (or start it), remove the work dir."""
        return self.client.call("recover_commit", ctid=ctid, start=start, timeout=LONG_OP_TIMEOUT)

    def close(self) -> None:
        """Say bye (best effort: the agent rolls back what is not committed either way) and hang up."""
        if self.client.usable:
            with contextlib.suppress(VzError):
                self.client.call("bye", timeout=BYE_TIMEOUT)
        self.client.close()

    def __enter__(self) -> RemoteAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_agent(
    session: SshSession, argv: Sequence[str] | None = None, *, timeout: float = CONNECT_TIMEOUT, fault: str = ""
) -> RemoteAgent:
    """Start the agent over `session` and say hello (its facts: RemoteAgent.hello). DestinationNotReady
    (exit 14) when vzpy is missing there or has no migrate-agent. `fault`: the agent's fault injection."""
    argv = list(argv or agent_argv())
    connection = session.exec_json(argv)
    client = Client(connection, timeout=timeout)
    try:
        return RemoteAgent(client, client.hello(fault=fault) if fault else client.hello())
    except ConnectionBroken as e:
        stream = connection.stream
        status = stream.exit_status(2.0) if isinstance(stream, ChannelStream) else None
        client.close()
        if status == 127:
            raise DestinationNotReady(
                f"{argv[0]} not found on {session.target}: install vzpy there or pass --remote-vzpy PATH"
            ) from e
        if status:
            raise DestinationNotReady(
                f"`{shlex.join(argv)}` failed on {session.target} with exit code {status}: install the same vzpy "
                "version there (or pass --remote-vzpy PATH)",
                detail=e.message,
            ) from e
        raise
    except BaseException:
        client.close()
        raise
