"""One CPU policy: restore, migration preflight and the agent judge CPUs the same way (vzpy.host.cpu)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest

from vzpy import checkpoint
from vzpy.errors import RestoreError
from vzpy.host import cpu
from vzpy.migrate import facts, preflight

CPU = {"arch": "x86_64", "vendor": "GenuineIntel", "model_name": "Xeon", "family": "6", "model": "85", "flags": []}
# Kernel-only flags a restored process never sees, as /proc/cpuinfo shows them on x86 hosts and VMs.
_KERNEL_ONLY_TEXT = """
hypervisor constant_tsc nonstop_tsc tsc_known_freq rep_good nopl xtopology cpuid apic acpi ht pti ibrs ibpb stibp
ssbd md_clear flush_l1d arch_capabilities de invpcid mca mce msr mtrr nx pae pat pcid pdpe1gb pge pse pse36 smap
smep umip vme vmx svm ept vpid tpr_shadow x2apic tsc_deadline_timer arat
"""
KERNEL_ONLY = _KERNEL_ONLY_TEXT.split()


def test_restore_problems_report_only_missing_user_visible_flags() -> None:
    dumped = {**CPU, "flags": ["fpu", "avx2", "avx512f", "hypervisor", "constant_tsc"]}
    here = {**CPU, "vendor": "AuthenticAMD", "flags": ["fpu", "avx2", "sse4_2"]}
    assert cpu.restore_problems(dumped, here) == ["CPU flag avx512f of the dumping host is missing here"]
    assert cpu.restore_problems(here, dumped) == ["CPU flag sse4_2 of the dumping host is missing here"]
    assert cpu.restore_problems(dumped, dumped) == []
    assert cpu.restore_problems(dumped, {**here, "arch": "aarch64"}) == [
        "the dump was made on x86_64, this host is aarch64"
    ]


@pytest.mark.parametrize("flag", KERNEL_ONLY)
def test_kernel_only_flags_never_block(flag: str) -> None:
    assert cpu.missing_flags({flag, "sse2"}, "x86_64", {"sse2"}) == []


@pytest.mark.parametrize("flag", ["sse2", "avx2", "avx512f", "avx512_vnni", "amx_tile", "aes", "rdtscp", "clflush"])
def test_user_visible_flags_block(flag: str) -> None:
    assert cpu.missing_flags({flag, "fpu"}, "x86_64", {"fpu"}) == [flag]


def test_every_flag_counts_off_x86() -> None:
    assert cpu.missing_flags({"fp", "asimd", "sve"}, "aarch64", {"fp"}) == ["asimd", "sve"]
    assert cpu.relevant_flags({"hypervisor"}, "aarch64") == {"hypervisor"}


def test_an_unknown_architecture_on_either_side_is_no_mismatch() -> None:
    assert cpu.arch_mismatch("x86_64", "aarch64")
    assert not cpu.arch_mismatch("x86_64", "x86_64")
    assert not cpu.arch_mismatch("", "aarch64")
    assert not cpu.arch_mismatch("x86_64", "")


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n"
    )
    info = cpu.parse_cpuinfo(text, "x86_64")
    assert info == {
        "arch": "x86_64",
        "vendor": "AuthenticAMD",
        "model_name": "AMD EPYC",
        "family": "25",
        "model": "17",
        "flags": ["avx2", "fpu", "sse2"],
    }
    arm = cpu.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert (arm["vendor"], arm["model_name"], arm["flags"]) == ("0x41", "0xd0c", ["aes", "asimd", "fp"])


def test_host_cpu_reads_this_host_and_survives_a_missing_cpuinfo(tmp_path: Path) -> None:
    here = cpu.host_cpu()
    assert here["arch"] == platform.machine() and here["flags"]
    assert cpu.host_cpu(tmp_path / "none")["flags"] == []


# --- restore, preflight and the agent agree


def _restore_refuses(dumped_flags: list[str], here_flags: list[str], monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(cpu, "host_cpu", lambda: {**CPU, "arch": platform.machine(), "flags": here_flags})

    class Ct:
        ctid = "101"

    dumped: Any = type("M", (), {"ctid": "101", "cpu": {**CPU, "arch": platform.machine(), "flags": dumped_flags}})
    try:
        checkpoint._check_compatible(Ct(), dumped)  # type: ignore[arg-type]
    except RestoreError:
        return True
    return False


def _preflight_refuses(source_flags: list[str], dest_flags: list[str]) -> bool:
    facts = preflight.SourceFacts(ctid="101", private_bytes=0, cpu_flags=frozenset(source_flags))
    hello: dict[str, Any] = {"proto": list(preflight.PROTOCOL_VERSION), "criu": {"ok": True}}
    hello["cpu"] = {"machine": platform.machine(), "flags": dest_flags}
    return any(p.check == "cpu" for p in preflight.check(hello, {}, facts))


def test_restore_and_preflight_agree_on_every_flag_of_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping any one of this host's flags (or a kernel-only one) on the other side: same verdict from both."""
    flags = sorted(set(cpu.host_cpu()["flags"]) | set(KERNEL_ONLY) | {"avx512f", "amx_tile", "sha_ni"})
    verdicts = {}
    for flag in flags:
        other = [f for f in flags if f != flag]
        restore = _restore_refuses(flags, other, monkeypatch)
        assert restore == _preflight_refuses(flags, other), flag
        verdicts[flag] = restore
    assert any(verdicts.values()) and not all(verdicts.values())  # the walk met both kinds of flag


def test_the_agent_reports_the_flags_the_policy_reads() -> None:
    reported = facts.cpu_facts()
    assert reported["flags"] == cpu.host_cpu()["flags"] and reported["machine"] == platform.machine()
    assert not _preflight_refuses(reported["flags"], reported["flags"])


def test_a_dump_without_its_arch_is_judged_by_this_hosts() -> None:
    dumped = {**CPU, "arch": "", "flags": ["hypervisor", "sse2"]}
    assert cpu.restore_problems(dumped, {**CPU, "flags": ["sse2"]}) == []
    assert cpu.restore_problems(dumped, {**CPU, "flags": []}) == ["CPU flag sse2 of the dumping host is missing here"]


def test_only_the_first_processor_counts_and_its_first_value_wins() -> None:
    text = "processor\t: 0\nflags\t\t: sse2\nflags\t\t: avx2\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    info = cpu.parse_cpuinfo(text, "x86_64")
    assert (info["model_name"], info["flags"]) == ("", ["sse2"])


def test_an_unreadable_cpuinfo_has_no_flags(tmp_path: Path) -> None:
    assert cpu.host_cpu(tmp_path)["flags"] == []  # a directory: read_text raises IsADirectoryError
