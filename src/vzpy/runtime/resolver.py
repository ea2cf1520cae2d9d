"""NAMESERVER and SEARCHDOMAIN: the host's resolver settings (`inherit`) and the CT's /etc/resolv.conf.

As vzctl's set_dns does: the CT's other resolv.conf lines stay; its `nameserver` lines are replaced when
NAMESERVER is set, its `search`/`domain` line when SEARCHDOMAIN is. The file is read and replaced through
CtRoot (resolved inside the CT's root; a symlink planted at the name is replaced, never written through).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

from vzpy.errors import CtFileError
from vzpy.runtime.ctfs import CtRoot

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
CT_RESOLV_CONF = "/etc/resolv.conf"


def _host_lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines() if line.strip() and line.lstrip()[0] not in "#;"]


def host_nameservers(path: Path = HOST_RESOLV_CONF) -> list[str]:
    """Every `nameserver` of the host's resolv.conf, in order (resolv.conf(5): they accumulate)."""
    return [words[1] for words in _host_lines(path) if words[0] == "nameserver" and len(words) > 1]


def host_searchdomains(path: Path = HOST_RESOLV_CONF) -> list[str]:
    """The domains of the host's last `search` or `domain` line (resolv.conf(5): the last one counts)."""
    found: list[str] = []
    for words in _host_lines(path):
        if words[0] in ("search", "domain"):
            found = words[1:]
    return found


def updated_resolv_conf(text: str, nameservers: Sequence[str] | None, searchdomains: Sequence[str] | None) -> str:
    """`text` with its nameserver lines (when `nameservers` is given) and search/domain lines (when
    `searchdomains` is) replaced; every other line kept as it was."""
    replaced = {
        *(("nameserver",) if nameservers is not None else ()),
        *(("search", "domain") if searchdomains is not None else ()),
    }
    kept = [line for line in text.splitlines() if (line.split() or [""])[0] not in replaced]
    if searchdomains:
        kept.insert(0, "search " + " ".join(searchdomains))
    kept.extend(f"nameserver {server}" for server in nameservers or ())
    return "".join(f"{line}\n" for line in kept)


def write_ct_resolv_conf(root: Path, nameservers: Sequence[str] | None, searchdomains: Sequence[str] | None) -> bool:
    """Update the CT's /etc/resolv.conf (nothing when both are None). False when the CT has no /etc."""
    if nameservers is None and searchdomains is None:
        return True
    with CtRoot(root) as ct_root:
        try:
            current = ct_root.read_bytes(CT_RESOLV_CONF).decode(errors="replace")
        except CtFileError as e:
            if e.errno not in (errno.ENOENT, errno.ELOOP):
                raise
            current = ""  # none yet, or a link leading nowhere inside the CT: replaced by a file
        try:
            ct_root.write_atomic(CT_RESOLV_CONF, updated_resolv_conf(current, nameservers, searchdomains).encode())
        except CtFileError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
    return True
