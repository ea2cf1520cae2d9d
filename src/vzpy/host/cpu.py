"""The host's CPU and the one policy on whether processes that ran on one CPU can run on another.

`restore` (a dump file's CPU against this host's), migration preflight (this host's CPU against the
destination's) and the migration agent (which reports the destination's) all use `missing_flags` and
`arch_mismatch`, so a CT that preflight lets go is one that restore accepts, and the other way round.

The policy: the architecture must be the same; on x86 every flag that names instructions user space may
pick at run time (glibc's ifuncs, JITs, crypto libraries) must be present on the destination, since a
process that chose AVX2 at start dies with SIGILL on a CPU without it. The other x86 flags (bugs, power
management, virtualization, paging and other kernel-only features) cannot reach a restored process. On
other architectures (arm64 `Features` are hwcaps, all of them user-visible) every flag counts.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
X86_MACHINES = frozenset({"x86_64", "i386", "i486", "i586", "i686"})
_X86_USER_ISA = """
fpu tsc cx8 cmov mmx fxsr sse sse2 pni ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave f16c rdrand abm
lahf_lm lm syscall clflush rdtscp sse4a misalignsse 3dnowprefetch 3dnow 3dnowext mmxext xop fma4 tbm bmi1 bmi2
erms rtm hle tsxldtrk rdseed adx clflushopt clwb sha_ni sha512 sm3 sm4 xsaveopt xsavec xgetbv1 xsaves fsgsbase
pclmulqdq vaes vpclmulqdq gfni rdpid rdpru pku ospke clzero mwaitx cldemote movdiri movdir64b serialize waitpkg
enqcmd ptwrite fsrm fzrm fsrs fsrc cmpccxadd lzcnt
"""
X86_USER_FLAGS = frozenset(_X86_USER_ISA.split())
# Whole families of user-visible vector and matrix extensions: avx, avx2, avx512*, avx_vnni, avx10*, amx_*.
X86_USER_PREFIXES = ("avx", "amx")


def parse_cpuinfo(text: str, machine: str | None = None) -> dict[str, Any]:
    """The compatibility-relevant part of /proc/cpuinfo's first processor (x86 and arm64 spellings)."""
    first: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip(), value.strip())
    return {
        "arch": machine or platform.machine(),
        "vendor": first.get("vendor_id", first.get("CPU implementer", "")),
        "model_name": first.get("model name", first.get("CPU part", "")),
        "family": first.get("cpu family", first.get("CPU architecture", "")),
        "model": first.get("model", first.get("CPU part", "")),
        "flags": sorted(set(first.get("flags", first.get("Features", "")).split())),
    }


def host_cpu(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """This host's CPU as parse_cpuinfo describes it; no flags when /proc/cpuinfo is unreadable."""
    try:
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        return parse_cpuinfo("")


def relevant_flags(flags: Iterable[str], machine: str) -> frozenset[str]:
    """The flags whose absence on a destination breaks processes that ran here (on non-x86: all of them)."""
    if machine not in X86_MACHINES:
        return frozenset(flags)
    return frozenset(f for f in flags if f in X86_USER_FLAGS or f.startswith(X86_USER_PREFIXES))


def arch_mismatch(source_arch: str, dest_arch: str) -> bool:
    """True when both architectures are known and differ: no CT moves between them."""
    return bool(source_arch and dest_arch and source_arch != dest_arch)


def missing_flags(source_flags: Iterable[str], source_arch: str, dest_flags: Iterable[str]) -> list[str]:
    """The relevant flags of the source CPU that the destination lacks, sorted; [] when it can run them."""
    return sorted(relevant_flags(source_flags, source_arch) - set(dest_flags))


def restore_problems(dumped: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """Why processes dumped on CPU `dumped` may not run on CPU `here` (both as parse_cpuinfo gives them)."""
    source_arch, dest_arch = str(dumped.get("arch") or ""), str(here.get("arch") or "")
    if arch_mismatch(source_arch, dest_arch):
        return [f"the dump was made on {source_arch}, this host is {dest_arch}"]
    missing = missing_flags(dumped.get("flags") or (), source_arch or dest_arch, here.get("flags") or ())
    return [f"CPU flag {flag} of the dumping host is missing here" for flag in missing]
