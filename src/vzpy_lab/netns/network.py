"""A test network: several "hosts" and a client on one machine.

    switch netns  vzt-sw-<tok>      bridge br0, one veth port v<N> per host and v200 for the client
    client netns  vzt-client-<tok>  eth0 10.231.0.200/24, runs external clients (ssh, TCP)

and the TestHosts on it (host.py). Everything a network creates lives under STATE_ROOT/<tok>/ (see
reaper.py, which tears down networks whose owner died before its teardown ran).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vzpy_lab.netns.host import TestHost
from vzpy_lab.netns.keys import ClientKey, generate_keys, public_key
from vzpy_lab.netns.layout import (
    BRIDGE,
    CLIENT_OCTET,
    CT_OCTETS,
    DEFAULT_TIMEOUT,
    ENV_KEY_RE,
    ENV_VALUE_RE,
    HOST_IFACE,
    HOST_OCTETS,
    NAME_RE,
    PREFIX_LEN,
    STATE_ROOT,
    SUBNET,
    HostCleanupError,
    HostSetupError,
    mac_for,
    netns_path,
)
from vzpy_lab.netns.reaper import HostRecord, Residents, network_teardown, reap
from vzpy_lab.netns.system import (
    Step,
    add_netns,
    connect_from,
    ip_batch,
    netns_socket,
    ns_id,
    run_steps,
    start_time,
    write_file,
)


class TestNetwork:
    """The switch netns with the bridge, the client netns, and the hosts on them."""

    __test__ = False

    def __init__(self, token: str, state_dir: Path) -> None:
        self.token = token
        self.state_dir = state_dir
        self.switch_netns = f"vzt-sw-{token}"
        self.client_netns = f"vzt-client-{token}"
        self.client_address = f"{SUBNET}{CLIENT_OCTET}"
        client_dir = state_dir / "client"
        self.client_key = ClientKey(
            client_dir / "id_ed25519", client_dir / "id_ed25519.pub", client_dir / "known_hosts"
        )
        self.hosts: dict[str, TestHost] = {}
        self._client_children: list[subprocess.Popen[Any]] = []
        self._next_ct_octet = CT_OCTETS.start
        self._stopped = False

    @classmethod
    def create(cls, state_root: Path = STATE_ROOT) -> TestNetwork:
        state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(3)
        state_dir = state_root / token
        state_dir.mkdir(mode=0o700)
        network = cls(token, state_dir)
        owner = {"pid": os.getpid(), "start": start_time(os.getpid())}
        write_file(
            state_dir / "owner.json",
            json.dumps({**owner, "switch": network.switch_netns, "client": network.client_netns}),
        )
        _LIVE_NETWORKS.add(network)
        try:
            network._setup()
        except BaseException:
            network.stop()
            raise
        return network

    def _setup(self) -> None:
        (self.state_dir / "hosts").mkdir()
        self.client_key.private_key.parent.mkdir(mode=0o700)
        generate_keys(self.client_key.private_key)
        write_file(self.client_key.known_hosts, "")
        add_netns(self.switch_netns)
        add_netns(self.client_netns)
        port = f"v{CLIENT_OCTET}"
        ip_batch(
            self.switch_netns,
            [
                "link set lo up",
                f"link add {BRIDGE} type bridge stp_state 0",
                f"link set {BRIDGE} up",
                f"link add {port} type veth peer name {HOST_IFACE} address {mac_for(CLIENT_OCTET)} "
                f"netns {self.client_netns}",
                f"link set {port} master {BRIDGE} up",
            ],
        )
        ip_batch(
            self.client_netns,
            [
                "link set lo up",
                f"addr add {self.client_address}/{PREFIX_LEN} dev {HOST_IFACE}",
                f"link set {HOST_IFACE} up",
            ],
        )

    def add_host(
        self, name: str, vz_conf: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> TestHost:
        """Create and start a host. `vz_conf` adds or overrides keys of its /etc/vz/vz.conf; `env` is
        set in its ssh sessions (sshd SetEnv) and in host.run/popen."""
        if not NAME_RE.match(name) or name in self.hosts:
            raise HostSetupError(f"bad or duplicate host name {name!r} (want {NAME_RE.pattern}, unused)")
        for key, value in (env or {}).items():
            if not ENV_KEY_RE.match(key) or not ENV_VALUE_RE.match(value):
                raise HostSetupError(f"unsupported session variable {key}={value!r} (no spaces or quotes)")
        netns = f"vzt-{name}-{secrets.token_hex(3)}"
        base = self.state_dir / "hosts" / name
        base.mkdir(mode=0o700)
        record = HostRecord(name=name, octet=self._free_octet(), netns=netns, base=str(base))
        record.save()
        host = TestHost(self, record, env)
        self.hosts[name] = host
        try:
            host._setup(vz_conf)
        except BaseException:
            host.stop()
            raise
        return host

    def _free_octet(self) -> int:
        used = {host.record.octet for host in self.hosts.values()}
        for octet in HOST_OCTETS:
            if octet not in used:
                return octet
        raise HostSetupError(f"no free host address in {SUBNET}{HOST_OCTETS.start}-{HOST_OCTETS.stop - 1}")

    def forget(self, host: TestHost) -> None:
        if self.hosts.get(host.name) is host:
            del self.hosts[host.name]
            self.refresh_keys()

    def refresh_keys(self) -> None:
        """Rewrite known_hosts (client's and every host's /root/.ssh) and every authorized_keys."""
        hosts = [host for host in self.hosts.values() if (host.sshd_dir / "ssh_host_ed25519_key.pub").exists()]
        known = "".join(f"{host.known_hosts_line()}\n" for host in hosts)
        keys = [public_key(self.client_key.private_key), *(host.identity_public_key() for host in hosts)]
        authorized = "".join(f"{key}\n" for key in keys)
        write_file(self.client_key.known_hosts, known)
        for host in hosts:
            write_file(host.path("/root/.ssh/known_hosts"), known)
            write_file(host.sshd_dir / "authorized_keys", authorized, mode=0o600)

    def new_ct_address(self) -> str:
        """A fresh CT address in 10.231.0.100-199, never handed out twice in one network."""
        if self._next_ct_octet not in CT_OCTETS:
            raise HostSetupError("all CT addresses of this test network are used")
        self._next_ct_octet += 1
        return f"{SUBNET}{self._next_ct_octet - 1}"

    # the client

    def _client_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", f"--net={netns_path(self.client_netns)}", "--", *(os.fspath(arg) for arg in argv)]

    def client_run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run in the client netns (machine's mount ns and environment).
        Defaults: capture_output=True, text=True, timeout=DEFAULT_TIMEOUT, check=False."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEFAULT_TIMEOUT)
        return subprocess.run(self._client_argv(argv), **kw)

    def client_popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen in the client netns; stop() kills whatever is left in it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._client_argv(argv), **kw)
        self._client_children.append(proc)
        return proc

    def client_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return netns_socket(netns_path(self.client_netns), family, kind)

    def client_connect(self, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP socket from the client to address:port, connected, with `timeout` set on it."""
        return connect_from(netns_path(self.client_netns), address, port, timeout)

    def ssh_argv(self, host: TestHost, *command: str) -> list[str]:
        """OpenSSH client argv (run it with client_run) for `command` on host, strict host keys."""
        options = {
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.client_key.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "5",
        }
        flags = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
        return ["ssh", "-F", "/dev/null", "-i", str(self.client_key.private_key), *flags, host.ssh_target, *command]

    # teardown

    def _teardown_steps(self) -> list[Step]:
        namespaces = [("net", ns_id(netns_path(name))) for name in (self.client_netns, self.switch_netns)]
        residents = Residents.of(namespaces)
        steps = network_teardown(self.state_dir, self.switch_netns, self.client_netns, residents)
        return [steps[0], ("reap client children", self._reap_client_children), *steps[1:]]

    def _reap_client_children(self) -> None:
        reap(self._client_children)

    def stop(self) -> None:
        """Stop every host, then kill what is left in the client netns, delete both namespaces and
        the state dir. Failures are collected and raised together as HostCleanupError."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE_NETWORKS.discard(self)
        errors = []
        for host in list(self.hosts.values()):
            try:
                host.stop()
            except HostCleanupError as e:
                errors.append(str(e))
        errors += run_steps(self._teardown_steps())
        if errors:
            raise HostCleanupError(f"cleanup of test network {self.token} incomplete:\n" + "\n".join(errors))

    def __enter__(self) -> TestNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE_NETWORKS: set[TestNetwork] = set()


@atexit.register
def _stop_forgotten_networks() -> None:
    """Last resort for scripts that exit without stopping their networks (pytest fixtures do)."""
    for network in list(_LIVE_NETWORKS):
        try:
            network.stop()
        except HostCleanupError as e:
            print(e, file=sys.stderr)
