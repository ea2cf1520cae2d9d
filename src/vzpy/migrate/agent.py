"""`vzpy migrate-agent`: the destination's server. It answers the source's requests on stdin/stdout, one
at a time, with the ops of vzpy.migrate.ops, and rolls back every uncommitted CT when the source goes
away (stdin EOF) or the agent is signalled.

Run by the source over SSH (vzpy.migrate.remote.connect_agent); `python -m vzpy.migrate.agent` is the
same without the CLI.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from vzpy.errors import VzError
from vzpy.migrate import ConnectionBroken, MigrateError, ProtocolError, fault
from vzpy.migrate.ops import OPS, Op
from vzpy.migrate.protocol import PROTOCOL_MAJOR, Connection, FdStream, Message, error_reply, ok_reply
from vzpy.migrate.session import AgentSession

CATCH_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def handle(session: AgentSession, message: Message, ops: dict[str, Op] = OPS) -> Message:
    """One request -> its reply (errors become error replies, never exceptions)."""
    request_id = message.get("id") if isinstance(message.get("id"), int) else None
    try:
        name, spec = _op_for(session, message, ops)
        args = {k: v for k, v in message.items() if k not in ("v", "id", "op")}
        fault.hit(session.fault, "agent", "before", name)
        results = _run_op(session, name, spec, args)
        fault.hit(session.fault, "agent", "after", name)
        return ok_reply(request_id, **results)
    except VzError as e:
        return error_reply(request_id, e)


def _op_for(session: AgentSession, message: Message, ops: dict[str, Op]) -> tuple[str, Op]:
    name = message.get("op")
    if message.get("v") != PROTOCOL_MAJOR and name != "hello":
        raise ProtocolError(f"migration protocol error: message version {message.get('v')!r}, expected 1")
    if not isinstance(name, str) or name not in ops:
        raise ProtocolError(f"migration protocol error: unknown op {name!r} (known: {', '.join(sorted(ops))})")
    spec = ops[name]
    if spec.needs_hello and session.version is None:
        raise ProtocolError(f"migration protocol error: {name} before hello")
    return name, spec


def _run_op(session: AgentSession, name: str, spec: Op, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return spec.handler(session, args)
    except MigrateError:
        raise
    except VzError as e:
        raise spec.failure(e.message, detail=e.detail) from e
    except OSError as e:
        raise spec.failure(f"{name} on {session.hostname} failed: {e}") from e
    except Exception as e:  # a bug: say which op and what, keep serving
        raise spec.failure(f"{name} on {session.hostname}: internal error: {type(e).__name__}: {e}") from e


# --- serving -------------------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SERVING_PID = 0  # the agent's own pid, set when it starts serving


def _raise_stop(signum: int, frame: object) -> None:
    # Children the agent forks (the CT launcher, pyroute2's netns helpers) inherit this handler until they
    # exec. In them, raising would unwind through a copy of the agent's own stack and answer on the
    # protocol channel: they must just die of the signal, as they would without the handler.
    if os.getpid() != _SERVING_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    raise _Stop(signum)


def serve(session: AgentSession, connection: Connection) -> int:
    """Answer requests until bye or EOF; roll back uncommitted CTs on the way out. The exit code: 0 after
    bye or after EOF with nothing to roll back, 21 (connection broken) when the source vanished mid-way."""
    try:
        while True:
            message = connection.receive(timeout=session.idle_timeout)
            if message is None:
                broken = any(incoming.state == "prepared" for incoming in session.incoming.values())
                return ConnectionBroken.exit_code if broken else 0
            connection.send(handle(session, message))
            if message.get("op") == "bye":
                return 0
    except VzError as e:  # broken pipe, idle timeout, garbage on stdin
        print(f"vzpy migrate-agent: {e.message}; rolling back", file=sys.stderr)
        return e.exit_code
    except _Stop as e:
        print(f"vzpy migrate-agent: {e}; rolling back", file=sys.stderr)
        return 128 + e.signum
    finally:
        _ignore_stop_signals()
        for error in session.rollback_all():
            print(f"vzpy migrate-agent: {error}", file=sys.stderr)


def _ignore_stop_signals() -> None:
    """A second signal must not interrupt the rollback (only where serve_stdio installed the handlers)."""
    for signum in CATCH_SIGNALS:
        if signal.getsignal(signum) is _raise_stop:
            signal.signal(signum, signal.SIG_IGN)


def serve_stdio() -> int:
    """Serve on fds 0/1, moved aside: stray output (and CRIU's children) cannot touch the protocol."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    for fd in (proto_in, proto_out):
        os.set_inheritable(fd, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    global _SERVING_PID
    _SERVING_PID = os.getpid()
    for signum in CATCH_SIGNALS:
        signal.signal(signum, _raise_stop)
    connection = Connection(FdStream(proto_in, proto_out), peer="the migration source")
    try:
        return serve(AgentSession(), connection)
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(serve_stdio())
