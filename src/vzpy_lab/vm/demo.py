"""`make lab-demo`: the migration ladder on two VMs with Debian 12's stock kernel (the VM lab).

A CT in vm1 runs the fidelity workload (its credentials child changes to a real non-root uid), and a
service started the way operators start daemons, with `vzpy exec`, running as `nobody`: the dirtier, which
keeps rewriting a small part of its 32 MiB. A client in the lab keeps an established TCP connection to the
CT. The CT goes vm1 -> vm2 online with pre-copy, then vm2 -> vm1 with post-copy; after each move every
fidelity item, every page of the dirtier and the connection are checked. Each migration's
`vzpy migrate --json` summary is printed as one line starting `lab-json: `.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from vzpy_lab.vm.lab import Lab, LabVM
from vzpy_lab.workload.build import build_dirtier, build_fidelity
from vzpy_lab.workload.client import (
    DirtierError,
    EchoStream,
    FidelityClient,
    dirtier_generation,
    failures,
    wait_for_dirtier,
)

CTID = "101"
FIDELITY_PORT = 7000  # and 7001: its echo port
DIRTIER_PORT = 7100
# TCG is 10-50x slower than a real host: the frozen part takes seconds, not the default budget
MIGRATE_OPTIONS = ("--online", "--json", "--max-frozen", "600")
PATHS = {"--precopy": "pre-copy", "--postcopy": "post-copy", "--stop-and-copy": "stop-and-copy"}


class DemoFailed(Exception):
    """Something the demo shows did not hold."""


def vzpy(vm: LabVM, *args: str, timeout: float = 900) -> str:
    print(f"[{vm.name}]$ vzpy {' '.join(args)}", flush=True)
    result = vm.run(["vzpy", *args], timeout=timeout)
    if "--json" not in args:
        print(result.stdout + result.stderr, end="", flush=True)
    if result.returncode != 0:
        raise DemoFailed(f"`vzpy {' '.join(args)}` failed on {vm.name} ({result.returncode}): {result.stderr}")
    return result.stdout


def check_all(lab: Lab, ip: str, fidelity: FidelityClient, echo: EchoStream, where: str) -> None:
    failed = failures(fidelity.verify())
    if failed:
        raise DemoFailed(f"fidelity items broken {where}: {failed}")
    echo.exchange(64 * 1024)
    generation = dirtier_generation(ip, DIRTIER_PORT, lab.connector())
    print(
        f"client: {where}: every fidelity item ok, 64 KiB echoed on the same connection, "
        f"the dirtier's pages intact (generation {generation})\n",
        flush=True,
    )


def migrate(source: LabVM, dest: LabVM, path: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(vzpy(source, "migrate", *MIGRATE_OPTIONS, path, dest.address, CTID))
    print("lab-json: " + json.dumps(summary, separators=(",", ":"), sort_keys=True), flush=True)
    if summary.get("path") != PATHS[path]:
        raise DemoFailed(f"asked for {path}, the migration took {summary.get('path')}")
    return summary


def pre_copy_paid_off(summary: dict[str, Any]) -> str:
    iterations, frozen, total = len(summary["iterations"]), summary["pages_while_frozen"], summary["pages_total"]
    if iterations < 2 or frozen > 0.1 * total:
        raise DemoFailed(f"pre-copy took {iterations} iterations and moved {frozen} of {total} pages frozen")
    return f"{iterations} iterations, {frozen} of {total} pages moved while frozen ({100 * frozen / total:.1f}%)"


def set_up_ct(lab: Lab, vm: LabVM, ip: str, workdir: Path) -> None:
    vzpy(vm, "create", CTID, "--ostemplate", "minimal", "--ipadd", ip, "--hostname", "ladder.lab")
    private = f"/vz/private/{CTID}"
    vm.copy_in(build_fidelity(workdir), f"{private}/usr/bin/fidelity")
    vm.copy_in(build_dirtier(workdir), f"{private}/usr/bin/dirtier")
    service = f"{private}/etc/vzpy/services/fidelity"
    script = f"#!/bin/sh\nexec /usr/bin/fidelity {FIDELITY_PORT}\n"  # no -r: the credentials child is uid 1234
    vm.run(["sh", "-c", f"cat > {service} && chmod 755 {service}"], input=script, check=True)
    vzpy(vm, "start", CTID)
    as_nobody = f"su -s /bin/sh -c 'exec /usr/bin/dirtier {DIRTIER_PORT}' nobody"
    vzpy(vm, "exec", CTID, "sh", "-c", f"{as_nobody} </dev/null >/dev/null 2>&1 &")


def run(lab: Lab, workdir: Path) -> None:
    vm1, vm2 = lab.vms
    ip = lab.new_ct_address()
    print(f"lab: vm1 = {vm1.address}, vm2 = {vm2.address}, the client at {lab.client_address}; CT {ip}\n")
    vzpy(vm1, "check", "--to", vm2.address)
    set_up_ct(lab, vm1, ip, workdir)
    connect = lab.connector()
    fidelity = FidelityClient(ip, FIDELITY_PORT, timeout=120, connect=connect)
    fidelity.wait_ready(timeout=120)
    wait_for_dirtier(ip, DIRTIER_PORT, lab.connector())
    with EchoStream(ip, FIDELITY_PORT + 1, timeout=120, connect=connect) as echo:
        check_all(lab, ip, fidelity, echo, "before")
        there = migrate(vm1, vm2, "--precopy")
        check_all(lab, ip, fidelity, echo, "on vm2 after pre-copy")
        back = migrate(vm2, vm1, "--postcopy")
        check_all(lab, ip, fidelity, echo, "on vm1 after post-copy")
    print(
        f"vm1 -> vm2 pre-copy: {pre_copy_paid_off(there)}; vm2 -> vm1 {back['path']}: "
        f"{back['pages_total'] - back['pages_while_frozen']} pages after the CT ran again",
        flush=True,
    )
    vzpy(vm1, "stop", CTID)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vzpy-lab-demo-") as workdir, Lab(n=2, log=print) as lab:
        try:
            run(lab, Path(workdir))
        except (DemoFailed, DirtierError) as e:
            print(f"lab-demo: {e}", file=sys.stderr)
            return 1
        finally:
            for vm in lab.vms:
                vm.remove_ct(CTID)
    return 0


if __name__ == "__main__":
    sys.exit(main())
