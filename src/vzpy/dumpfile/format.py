"""The dump file's format: header, trailer, layout constants and the manifest (docs/dumpfile.md)."""

from __future__ import annotations

import json
import platform
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from vzpy import __version__
from vzpy.dumpfile.kio import DIGESTS
from vzpy.host.cpu import host_cpu

FORMAT_NAME = "vzpy-dump"
FORMAT_VERSION = 2  # 1: members' digests are sha256; 2: the manifest's "digest" names their algorithm
DIGEST = "blake3"  # what new dumps hash their members with
MAGIC = b"VZPYDUMP"
TRAILER_MAGIC = b"VZPYTAIL"
# magic, format version, flags (0), manifest offset, manifest length, trailer offset, manifest sha256
HEADER = struct.Struct("<8sIIQQQ32s")
# magic, trailer offset, manifest sha256: ties the trailer to this header, so a file cut short is never taken whole
TRAILER = struct.Struct("<8sQ32s")
ALIGN = 4096  # members start page-aligned: mmap maps them without slack, and reflinking filesystems can share blocks
MANIFEST_OFFSET = ALIGN
MAX_MANIFEST = 64 << 20
CODECS = ("none", "zstd")
CPU_TEXT_FIELDS = ("arch", "vendor", "model_name", "family", "model")
LAST_TIMESTAMP = 253402300799  # 9999-12-31 23:59:59 UTC, the last second datetime can show
_NAME_RE = re.compile(r"[A-Za-z0-9_.@+:=-]{1,255}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")  # sha256 and BLAKE3-256 alike: 32 bytes in lowercase hex


@dataclass
class Member:
    """One file in the dump: `size`/`digest` describe the original bytes, `stored_size` what the dump holds.

    `digest` is hex, of the manifest's digest algorithm; in the JSON it sits under the algorithm's name."""

    size: int
    digest: str
    offset: int
    stored_size: int
    codec: str = "none"

    def to_dict(self, algorithm: str) -> dict[str, Any]:
        entry = asdict(self)
        entry[algorithm] = entry.pop("digest")
        return entry


_MEMBER_FIELDS = ("size", "offset", "stored_size", "codec")  # and the digest, under the algorithm's name


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Manifest:
    ctid: str
    criu_version: str
    ct_config: str
    processes: list[dict[str, Any]] = field(default_factory=list)
    fs_fingerprint: Any = None
    with_fs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    created_unix: float = 0.0
    vzpy_version: str = __version__
    kernel: str = field(default_factory=platform.release)
    arch: str = field(default_factory=platform.machine)
    cpu: dict[str, Any] = field(default_factory=lambda: host_cpu())
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    digest: str = DIGEST
    compression: str = "none"
    memory_bytes: int = 0
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.created:
            now = _now()
            self.created = now.isoformat(timespec="seconds").replace("+00:00", "Z")
            self.created_unix = round(now.timestamp(), 3)

    def to_json(self) -> str:
        data = asdict(self)
        data["members"] = {name: member.to_dict(self.digest) for name, member in self.members.items()}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest; ValueError says what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        version_1 = data.get("format_version") == 1
        optional = {"extra", "digest"} if version_1 else {"extra"}  # version 1 has no "digest": it is sha256
        missing = sorted(known - optional - data.keys())
        if missing:
            raise ValueError(f"missing field {missing[0]}")
        for name, kind in _FIELD_TYPES.items():
            if name in data and not _is_a(data[name], kind):
                raise ValueError(f"field {name} has the wrong type")
        values = {k: v for k, v in data.items() if k in known}
        if version_1:
            values["digest"] = "sha256"
        if values["digest"] not in DIGESTS:
            raise ValueError(
                f"member digest algorithm {values['digest']!r} is not one this vzpy knows ({', '.join(DIGESTS)}); "
                "read the dump with a newer vzpy"
            )
        values["members"] = _parse_members(values["members"], values["digest"])
        manifest = cls(**values)
        if manifest.format != FORMAT_NAME:
            raise ValueError(f"format is {manifest.format!r}, not {FORMAT_NAME!r}")
        _check_totals(manifest)
        _check_host_fields(manifest)
        return manifest


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("ctid", "criu_version", "ct_config", "created", "vzpy_version", "kernel", "arch"), str),
    **dict.fromkeys(("format", "compression", "digest"), str),
    **dict.fromkeys(("format_version", "memory_bytes"), int),
    **dict.fromkeys(("cpu", "extra", "members"), dict),
    "processes": list,
    "with_fs": bool,
    "created_unix": (int, float),
}


def _is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints too: a count or a version is never one.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _parse_members(raw: dict[str, Any], algorithm: str) -> dict[str, Member]:
    members = {}
    for name, entry in raw.items():
        if problem := name_problem(name):
            raise ValueError(f"member {name!r}: {problem}")
        if not isinstance(entry, dict):
            raise ValueError(f"member {name}: not an object")
        missing = sorted({*_MEMBER_FIELDS, algorithm} - entry.keys())
        if missing:
            raise ValueError(f"member {name}: missing field {missing[0]}")
        # like the manifest's own fields, unknown ones are a newer writer's additions: ignored
        member = Member(digest=entry[algorithm], **{key: entry[key] for key in _MEMBER_FIELDS})
        ints = (member.size, member.offset, member.stored_size)
        if not all(type(n) is int and n >= 0 for n in ints) or not _DIGEST_RE.fullmatch(str(member.digest)):
            raise ValueError(f"member {name}: bad size, offset or {algorithm}")
        if member.offset % ALIGN:
            raise ValueError(f"member {name}: offset {member.offset} is not a multiple of {ALIGN}")
        if member.codec not in CODECS or not _sizes_fit(member):
            raise ValueError(f"member {name}: bad codec {member.codec!r} for its sizes")
        members[name] = member
    return members


def _sizes_fit(member: Member) -> bool:
    """Plain: stored as is. zstd: only ever kept when smaller (an empty member is never compressed)."""
    if member.codec == "none":
        return member.stored_size == member.size
    return 0 < member.stored_size < member.size


def _check_host_fields(manifest: Manifest) -> None:
    """The fields dumpinfo shows and restore's CPU check reads: of the types they are used as."""
    if not 0 <= manifest.created_unix <= LAST_TIMESTAMP:  # also false for NaN
        raise ValueError(f"created_unix {manifest.created_unix} is not a time")
    cpu = manifest.cpu
    if any(not isinstance(cpu.get(key, ""), str) for key in CPU_TEXT_FIELDS):
        raise ValueError("a cpu field is not a string")
    flags = cpu.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        raise ValueError("cpu flags are not a list of strings")


def _check_totals(manifest: Manifest) -> None:
    """The fields the writer derives from the members must say what the members say."""
    if manifest.compression not in CODECS:
        raise ValueError(f"compression {manifest.compression!r} is neither none nor zstd")
    if manifest.compression == "none" and any(m.codec != "none" for m in manifest.members.values()):
        raise ValueError("a member is compressed but the dump's compression is none")
    if manifest.memory_bytes != memory_bytes({name: m.size for name, m in manifest.members.items()}):
        raise ValueError("memory_bytes is not the size of the pages-*.img members")


def memory_bytes(sizes: Mapping[str, int]) -> int:
    """The CT's memory in a dump: the total size of CRIU's pages-*.img images, given name -> size."""
    return sum(size for name, size in sizes.items() if name.startswith("pages-") and name.endswith(".img"))


def name_problem(name: Any) -> str | None:
    """Members are plain file names: nothing that could climb out of the directory they are extracted to."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        return "not a plain file name (letters, digits and _.@+:=- only)"
    return None


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to
