"""The object every command gets as ctx.obj (`@click.pass_obj`): configuration, containers, locking, output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from vzpy.cli import display
from vzpy.config import GlobalConfig
from vzpy.container import Container
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
        ctids = sorted((p.name.removesuffix(".conf") for p in confdir.glob("*.conf")), key=_ctid_order)
        return [self.container(ctid) for ctid in ctids]

    @contextmanager
    def locked(self, ct: Container, operation: str) -> Iterator[None]:
        with ct_lock(self.gconf.lockdir, ct.ctid, operation):
            yield

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


def _ctid_order(ctid: str) -> tuple[int, int, str]:
    return (0, int(ctid), "") if ctid.isdigit() else (1, 0, ctid)
