"""CT networking with pyroute2: a veth pair routed like OpenVZ's venet.

The CT side (eth0) carries the CT's addresses as /32 with a default route out of eth0; the host side
has no address, answers ARP for the CT (proxy_arp) and has a /32 route per CT address. Moving a CT is
then a matter of moving its routes: nothing in the CT depends on the host's addressing.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vzpy import background
from vzpy.errors import BadIp, NetworkError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

CT_IFNAME = "eth0"
IFNAMSIZ = 15
MAX_PREFIX = 7


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as vzctl's IP_ADDRESS holds it: bare, or with a valid /prefix (which is ignored)."""
    try:
        return ipaddress.ip_interface(value).ip
    except ValueError as e:
        raise BadIp(f"invalid IP address {value!r}: give an address such as 10.0.0.101") from e


def host_ifname(prefix: str, ctid: str) -> str:
    """vzctl's veth naming (veth101.0), hashed when the CTID is too long for an interface name."""
    name = f"{prefix}{ctid}.0"
    if len(name) <= IFNAMSIZ:
        return name
    prefix = prefix[:MAX_PREFIX]  # leaves at least 6 hex digits of the hash
    return f"{prefix}{hashlib.sha1(ctid.encode()).hexdigest()[: IFNAMSIZ - len(prefix) - 2]}.0"


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def _netns_path(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def _iproute(netns_of: int | None = None) -> IPRoute:
    """A netlink socket in the host's netns, or in that of pid `netns_of`. pyroute2 is imported here, not at
    the top: it costs ~0.2 s of start-up that commands doing no network work (status, list) must not pay."""
    from pyroute2 import IPRoute

    return IPRoute() if netns_of is None else IPRoute(netns=_netns_path(netns_of), flags=0)


def load_soon() -> None:
    """Start importing pyroute2 in a thread (vzpy.background), for a command that waits for something else
    (CRIU) before it configures the network."""
    background.import_soon("pyroute2")


def link_exists(ifname: str) -> bool:
    """Whether this process's netns has an interface `ifname`: one ioctl, without the ~0.1 s of pyroute2's
    import (cleanup after a kill mostly finds the CT's veth gone already)."""
    import socket  # here, as in _send_garp: status and list, which import this module, need no socket

    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _prefixlen(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return 32 if ip.version == 4 else 128


def create_veth(host_if: str, init_pid: int) -> None:
    """Create the veth pair and move its CT end into the netns of init_pid, named eth0."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        if ipr.link_lookup(ifname=host_if):
            ipr.link("del", ifname=host_if)
        try:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": f"{host_if[:-2]}.c"})
            peer = ipr.link_lookup(ifname=f"{host_if[:-2]}.c")[0]
            ipr.link("set", index=peer, net_ns_fd=_netns_path(init_pid))
        except NetlinkError as e:
            raise NetworkError(f"cannot create veth {host_if}: {e}") from e
    with _iproute(init_pid) as ct:
        index = ct.link_lookup(ifname=f"{host_if[:-2]}.c")[0]
        ct.link("set", index=index, ifname=CT_IFNAME)


def configure_ct_side(init_pid: int, ips: Iterable[str]) -> None:
    """Inside the CT: lo up, eth0 up with its /32 addresses and default routes out of eth0."""
    parsed = [parse_ip(ip) for ip in ips]
    with _iproute(init_pid) as ct:
        ct.link("set", index=ct.link_lookup(ifname="lo")[0], state="up")
        index = ct.link_lookup(ifname=CT_IFNAME)[0]
        ct.link("set", index=index, state="up")
        for ip in parsed:
            _add_address(ct, index, ip)


def add_ct_address(init_pid: int, ip: str) -> None:
    parsed = parse_ip(ip)
    with _iproute(init_pid) as ct:
        _add_address(ct, ct.link_lookup(ifname=CT_IFNAME)[0], parsed)


def _add_address(ct: IPRoute, index: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """The address as a host route on eth0, and the default route of its family out of eth0."""
    ct.addr("add", index=index, address=str(ip), prefixlen=_prefixlen(ip))
    dst = "0.0.0.0/0" if ip.version == 4 else "::/0"
    ct.route("replace", dst=dst, oif=index, scope=253 if ip.version == 4 else 0)


def del_ct_address(init_pid: int, ip: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    parsed = parse_ip(ip)
    with _iproute(init_pid) as ct:
        index = ct.link_lookup(ifname=CT_IFNAME)[0]
        try:
            ct.addr("del", index=index, address=str(parsed), prefixlen=_prefixlen(parsed))
        except NetlinkError:
            pass


def configure_host_side(host_if: str, ips: Iterable[str]) -> None:
    """On the host: the veth end up, proxy ARP on it, forwarding, and a /32 route per CT address."""
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            raise NetworkError(f"host interface {host_if} is missing; restart the CT")
        ipr.link("set", index=found[0], state="up")
        _sysctl(f"net/ipv4/conf/{host_if}/proxy_arp", "1")
        # answer the CT's ARP at once: the default (up to 0.8 s, random) lengthens every restore's downtime
        _sysctl(f"net/ipv4/neigh/{host_if}/proxy_delay", "0")
        _sysctl(f"net/ipv4/conf/{host_if}/forwarding", "1")
        for ip in ips:
            add_host_route(host_if, ip, ipr=ipr)


def add_host_route(host_if: str, ip: str, ipr: IPRoute | None = None) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    parsed = parse_ip(ip)
    own = ipr is None
    ipr = ipr or _iproute()
    try:
        index = ipr.link_lookup(ifname=host_if)[0]
        ipr.route("replace", dst=f"{parsed}/{_prefixlen(parsed)}", oif=index, scope=253)
    except (NetlinkError, IndexError) as e:
        raise NetworkError(f"cannot route {parsed} to {host_if}: {e}") from e
    finally:
        if own:
            ipr.close()


def del_host_route(ip: str, host_if: str | None = None) -> None:
    """Remove the /32 (/128) route add_host_route made. It is a link-scope route: a delete naming no scope
    asks for a universe-scope one, which the kernel does not find, and the route would stay.

    A route through `host_if` goes with that link: when the link is gone already (a killed CT's netns took its
    veth along) there is nothing to remove, and pyroute2 is not even loaded. While it exists (the netns is torn
    down asynchronously) the route is deleted here."""
    parsed = parse_ip(ip)
    if host_if and not link_exists(host_if):
        return
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        spec: dict[str, Any] = {"dst": f"{parsed}/{_prefixlen(parsed)}", "scope": 253}
        found = ipr.link_lookup(ifname=host_if) if host_if else []
        if found:
            spec["oif"] = found[0]
        try:
            ipr.route("del", **spec)
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise NetworkError(f"cannot remove the route to {parsed}: {e}") from e


def delete_veth(host_if: str) -> None:
    """Remove the host end (the CT end goes with it); absent is fine."""
    if not link_exists(host_if):
        return
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as e:
                if e.code != 19:  # ENODEV: the CT's netns took it down with it meanwhile
                    raise NetworkError(f"cannot delete {host_if}: {e}") from e


def announce(ip: str, exclude: Iterable[str] = (), mode: str = "detect", devices: Iterable[str] = ()) -> list[str]:
    """Gratuitous ARP for `ip`, so that peers move their ARP entry to this host at once, on the interfaces
    vz.conf's NEIGHBOUR_DEVS names (`mode`):
    - "detect" (vzpy's default): where this host routes or proxies the CT's address: up, ARP-capable
      interfaces with a directly connected route (no gateway, not a host route, not the default route) whose
      network holds `ip`. Never on unrelated interfaces (an uplink to elsewhere).
    - "all" (vzctl's default): every interface that is up, ARP-capable, not a loopback or a bond's slave.
    - "list": those of `devices` that are up and ARP-capable.
    `exclude`: interfaces never to send on (the CT's own veth). Returns the interfaces it was sent on."""
    parsed = parse_ip(ip)
    if parsed.version != 4:
        return []
    wanted = set(devices)
    sent = []
    with _iproute() as ipr:
        links = {link["index"]: link for link in ipr.get_links()}
        if mode == "detect":
            candidates = _connected_route_ifindexes(ipr, parsed)
        else:
            candidates = [i for i, link in links.items() if mode == "all" or link.get_attr("IFLA_IFNAME") in wanted]
        for index in candidates:
            link = links.get(index)
            if link is None:
                continue
            name, mac = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
            if name in exclude or name in sent or not _announceable(link, name, mac):
                continue
            _send_garp(name, mac, parsed.packed)
            sent.append(name)
    return sent


def _connected_route_ifindexes(ipr: IPRoute, ip: ipaddress.IPv4Address) -> list[int]:
    """Interfaces of the main table's on-link IPv4 routes to a network holding `ip` (most specific first)."""
    found: list[tuple[int, int]] = []
    for route in ipr.get_routes(family=2, table=254):
        prefix, dst, oif = route["dst_len"], route.get_attr("RTA_DST"), route.get_attr("RTA_OIF")
        if not dst or not 0 < prefix < 32 or oif is None or route.get_attr("RTA_GATEWAY"):
            continue
        if ip in ipaddress.ip_network(f"{dst}/{prefix}", strict=False):
            found.append((prefix, oif))
    return [oif for _, oif in sorted(found, reverse=True)]


def _announceable(link: Any, name: str, mac: str | None) -> bool:  # link: a pyroute2 message (untyped)
    flags = link["flags"]
    up, loopback, noarp, slave = flags & 0x1, flags & 0x8, flags & 0x80, flags & 0x800  # IFF_*
    usable = up and not (loopback or noarp or slave)
    return bool(usable) and name != "lo" and mac not in (None, "00:00:00:00:00:00")


def _send_garp(ifname: str, mac: str, ip: bytes) -> None:
    import socket

    hw = bytes.fromhex(mac.replace(":", ""))
    broadcast = b"\xff" * 6
    # Ethernet + ARP request (op 1) with sender = target = the CT's address: every Linux peer updates on it
    frame = broadcast + hw + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01" + hw + ip + b"\x00" * 6 + ip
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((ifname, 0))
        raw.send(frame)
