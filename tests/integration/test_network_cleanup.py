"""Cleanup of a CT's host-side network (lifecycle.cleanup_leftovers: its routes, then its veth) on real links.

A veth that is still there (the netns of a killed CT is torn down asynchronously) has its routes and itself
removed through netlink; one that is gone took its routes along, and nothing is loaded for it. The network
cases run in a network namespace of their own; the CT case checks what `chkpnt` and `stop` leave on the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VzRoot

pytestmark = pytest.mark.root

SRC = Path(__file__).resolve().parents[2] / "src"
IPS = ("192.0.2.10", "2001:db8::10")

# The host end of a veth pair, configured as a CT start does, then cleaned up as after a kill, while it exists.
WHILE_THE_LINK_EXISTS = """
import json, subprocess, sys
from vzpy.runtime import network

def routes(ip):
    family = "-6" if ":" in ip else "-4"
    shown = subprocess.run(["ip", family, "route", "show", ip], capture_output=True, text=True, check=True)
    return shown.stdout.strip()

ips = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "add", "vzh0", "type", "veth", "peer", "name", "vzh1"], check=True)
network.configure_host_side("vzh0", ips)
result = {"before": {ip: routes(ip) for ip in ips}}
for ip in ips:
    network.del_host_route(ip, "vzh0")
result["after_routes"] = {ip: routes(ip) for ip in ips}
result["link_after_routes"] = network.link_exists("vzh0")
network.delete_veth("vzh0")
result["link_after_veth"] = network.link_exists("vzh0")
result["peer_after_veth"] = network.link_exists("vzh1")
print(json.dumps(result))
"""

# The same cleanup in a fresh interpreter, once the link is gone (deleted with `ip`, as a netns teardown does).
AFTER_THE_LINK_WENT = """
import json, sys
from vzpy.runtime import network
for ip in json.loads(sys.argv[1]):
    network.del_host_route(ip, "vzg0")
network.delete_veth("vzg0")
print(json.dumps({"pyroute2": "pyroute2" in sys.modules}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vzpy-nc-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str, *argv: str) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def route_show(ip: str) -> list[str]:
    return ["ip", "-6" if ":" in ip else "-4", "route", "show", ip]


def test_routes_and_veth_that_still_exist_are_removed(netns: str) -> None:
    result = json.loads(in_netns(netns, sys.executable, "-c", WHILE_THE_LINK_EXISTS, json.dumps(IPS)))
    assert all("vzh0" in route for route in result["before"].values()), result["before"]
    assert result["after_routes"] == {ip: "" for ip in IPS}
    assert result["link_after_routes"] is True  # deleting a route does not take the link
    assert (result["link_after_veth"], result["peer_after_veth"]) == (False, False)


def test_a_link_that_went_took_its_routes_and_nothing_is_loaded_for_it(netns: str) -> None:
    in_netns(netns, "ip", "link", "add", "vzg0", "type", "veth", "peer", "name", "vzg1")
    in_netns(netns, "ip", "link", "set", "vzg0", "up")
    for ip in IPS:
        in_netns(netns, "ip", "route", "replace", ip, "dev", "vzg0")
        assert "vzg0" in in_netns(netns, *route_show(ip))
    in_netns(netns, "ip", "link", "del", "vzg0")
    for ip in IPS:  # what the skip relies on: the kernel removed the routes through the link with it
        assert in_netns(netns, *route_show(ip)).strip() == ""
    result = json.loads(in_netns(netns, sys.executable, "-c", AFTER_THE_LINK_WENT, json.dumps(IPS)))
    assert result == {"pyroute2": False}


def host_route(ip: str) -> str:
    return subprocess.run(["ip", "route", "show", f"{ip}/32"], capture_output=True, text=True, check=True).stdout


def test_chkpnt_and_stop_leave_no_route_or_veth_of_the_ct(running_ct: tuple[VzRoot, str, str]) -> None:
    vz, ctid, ip = running_ct
    veth = Path(f"/sys/class/net/{vz.veth(ctid)}")
    assert vz.veth(ctid) in host_route(ip) and veth.exists()
    vz.run("chkpnt", ctid, check=True)
    assert host_route(ip) == "" and not veth.exists()
    vz.run("restore", ctid, check=True)
    assert vz.veth(ctid) in host_route(ip) and veth.exists()
    vz.run("stop", ctid, check=True)
    assert host_route(ip) == "" and not veth.exists()
