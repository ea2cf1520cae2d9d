"""Fixtures for multi-host tests (live migration): see vzpy_lab.netns for what a test host is.

- `test_network` (session): the switch + client namespaces; stale networks of killed runs are reaped first.
- `host_a`, `host_b` (module): two hosts on it, fresh for every test module.
- `ssh_client_key` (module): the client's key and a known_hosts naming both hosts.
- `make_test_host` (function): a factory for more hosts, stopped when the test ends.

Tests using them need `@pytest.mark.root`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import pytest

from vzpy_lab.netns import ClientKey, HostCleanupError, TestHost, TestNetwork, reap_stale


@pytest.fixture(scope="session")
def test_network() -> Iterator[TestNetwork]:
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    for message in reap_stale():
        warnings.warn(message, stacklevel=1)
    network = TestNetwork.create()
    try:
        yield network
    finally:
        network.stop()


def _host(network: TestNetwork, name: str) -> Iterator[TestHost]:
    host = network.add_host(name)
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def host_a(test_network: TestNetwork) -> Iterator[TestHost]:
    yield from _host(test_network, "a")


@pytest.fixture(scope="module")
def host_b(test_network: TestNetwork) -> Iterator[TestHost]:
    yield from _host(test_network, "b")


@pytest.fixture(scope="module")
def ssh_client_key(test_network: TestNetwork, host_a: TestHost, host_b: TestHost) -> ClientKey:
    return test_network.client_key


@pytest.fixture
def make_test_host(test_network: TestNetwork) -> Iterator[Callable[..., TestHost]]:
    """make_test_host(name, vz_conf=None, env=None) -> TestHost; each is stopped after the test."""
    made: list[TestHost] = []

    def make(name: str, vz_conf: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> TestHost:
        host = test_network.add_host(name, vz_conf, env)
        made.append(host)
        return host

    try:
        yield make
    finally:
        _stop_all(reversed(made))


def _stop_all(hosts: Iterable[TestHost]) -> None:
    """Stop every host even if one fails; re-raise the first failure."""
    failures: list[HostCleanupError] = []
    for host in hosts:
        try:
            host.stop()
        except HostCleanupError as e:
            failures.append(e)
    if failures:
        raise failures[0]
