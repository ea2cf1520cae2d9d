"""The object every command gets as ctx.obj (`@click.pass_obj`): configuration, containers, locking, output."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vzpy import oplog
from vzpy.cli import display
from vzpy.config import GlobalConfig
from vzpy.container import Container
from vzpy.errors import VzError
from vzpy.lock import ct_lock


@dataclass
class App:
    debug: bool = False
    quiet: bool = False
    _containers: dict[str, Container] = field(default_factory=dict)

    @cached_property
    def gconf(self) -> GlobalConfig:
        return GlobalConfig.load()

    def container(self, ctid: str) -> Container:
        if ctid not in self._containers:
            self._containers[ctid] = Container(ctid, self.gconf)
        return self._containers[ctid]

    def existing(self, ctid: str) -> Container:
        """A CT that must exist: ConfigNotFound (exit 14) otherwise."""
        ct = self.container(ctid)
        ct.conf  # noqa: B018 - loading is the existence check
        return ct

    def all_containers(self) -> list[Container]:
        confdir = self.gconf.confdir
        if not confdir.is_dir():
            return []
        ctids = sorted((p.name.removesuffix(".conf") for p in confdir.glob("*.conf")), key=ctid_order)
        return [self.container(ctid) for ctid in ctids]

    def listed_containers(self, wanted: Sequence[str] = ()) -> list[Container]:
        """The CTs `list`/vzlist show: every CTID.conf's, or those `wanted` (CTIDs or NAMEs), by CTID.

        A file whose name is no valid CTID is skipped with a warning, as vzlist does, rather than failing all."""
        confdir = self.gconf.confdir
        names = [p.name.removesuffix(".conf") for p in confdir.glob("*.conf")] if confdir.is_dir() else []
        found = []
        for name in sorted(names, key=ctid_order):
            try:
                found.append(self.container(name))
            except VzError:
                display.warning(f"invalid CTID in config file name: {name}.conf, skipping")
        if not wanted:
            return found
        chosen = {ct.ctid for ct in found if ct.ctid in wanted}
        if not set(wanted) <= chosen:  # the others may be NAMEs (vzctl's --name)
            chosen.update(ct.ctid for ct in found if _readable(ct) and ct.conf.get("NAME") in wanted)
        return [ct for ct in found if ct.ctid in chosen]

    @contextmanager
    def locked(self, ct: Container, operation: str) -> Iterator[None]:
        """Hold CT's lock for a state-changing operation, and log how it ended (vzpy.oplog) before releasing it."""
        with ct_lock(self.gconf.lockdir, ct.ctid, operation):
            try:
                yield
            except BaseException as e:
                oplog.record(self.gconf, ct.ctid, operation, oplog.exit_code_of(e), oplog.message_of(e), self.warn)
                raise
            oplog.record(self.gconf, ct.ctid, operation, 0, "", self.warn)

    def progress(self, message: str, *, to_stderr: bool = False) -> None:
        """What is going on; silenced by -q. `to_stderr` keeps stdout for data (e.g. --json)."""
        if not self.quiet:
            display.progress(message, to_stderr=to_stderr)

    @staticmethod
    def warn(message: str) -> None:
        display.warning(message)

    @staticmethod
    def print_json(data: Any) -> None:
        display.json_out(data)


def ctid_order(ctid: str) -> tuple[int, int, str]:
    return (0, int(ctid), "") if ctid.isdigit() else (1, 0, ctid)


def _readable(ct: Container) -> bool:
    """Whether the CT's CTID.conf loads (a broken one is reported where the CT is listed)."""
    try:
        ct.conf  # noqa: B018 - loading is the check
    except (VzError, OSError, ValueError):
        return False
    return True
