#!/opt/vzpy/venv/bin/python
"""The demo's last act: an online migration of a CT between two local test hosts and back.

Each test host is a network + mount namespace of this machine with its own /etc/vz, /vz and a real sshd
(vzpy_lab.netns, the same hosts the tests use); a client namespace watches the CT's
counter, kept in a shell's memory, go on across both moves.
"""

from __future__ import annotations

import sys
import time

from vzpy_lab.netns import TestHost, TestNetwork

CTID = "101"
COUNTER = '#!/bin/sh\ni=0\nwhile :; do i=$((i + 1)); echo "$i" >/var/www/counter; sleep 0.1; done\n'


def show(host: TestHost, *args: str) -> str:
    print(f"[{host.name}]$ vzpy {' '.join(args)}", flush=True)
    result = host.run(["vzpy", *args], timeout=300)
    stdout: str = result.stdout
    print(stdout + result.stderr, end="", flush=True)
    if result.returncode != 0:
        sys.exit(f"demo: `vzpy {' '.join(args)}` failed on host {host.name} ({result.returncode})")
    return stdout


def counter(network: TestNetwork, ip: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        result = network.client_run(["wget", "-qO-", "-T", "2", f"http://{ip}/counter"], timeout=10)
        if result.returncode == 0 and result.stdout.strip().isdigit():
            return int(result.stdout)
        if time.monotonic() > deadline:
            sys.exit(f"demo: the CT's counter at {ip} does not answer")
        time.sleep(0.2)


def main() -> None:
    with TestNetwork.create() as network:
        a, b = network.add_host("a"), network.add_host("b")
        ip = network.new_ct_address()
        print(f"test hosts: a = {a.address}, b = {b.address}; the client at {network.client_address}; CT {ip}\n")
        show(a, "create", CTID, "--ostemplate", "minimal", "--hostname", "roamer", "--ipadd", ip)
        private = a.path(f"/vz/private/{CTID}")
        (private / "var" / "www").mkdir(parents=True, exist_ok=True)
        for name, text in (("httpd", "#!/bin/sh\nexec httpd -f -p 80 -h /var/www\n"), ("counter", COUNTER)):
            (private / "etc" / "vzpy" / "services" / name).write_text(text)
            (private / "etc" / "vzpy" / "services" / name).chmod(0o755)
        show(a, "start", CTID)
        time.sleep(1)
        before = counter(network, ip)
        print(f"client: counter = {before}\n")
        show(a, "migrate", "--online", "-t", b.address, CTID)
        show(b, "list")
        there = counter(network, ip)
        print(f"client: counter = {there} (served by host b now, counting on from {before})\n")
        show(b, "migrate", "--online", "-t", a.address, CTID)
        show(a, "list")
        back = counter(network, ip)
        print(f"client: counter = {back} (back on host a)\n")
        if not before <= there <= back:
            sys.exit("demo: the counter went backwards: the CT's memory did not move with it")
        show(a, "stop", CTID)


if __name__ == "__main__":
    main()
