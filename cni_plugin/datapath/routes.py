"""The routes moor owns in the main table, and the kernel lookups the backends decide with.

Ownership is the routing protocol number: every route moor installs carries `MOOR_RTPROTO`
(109, "moor"; not in rtnetlink.h, not used by Calico (80), kube-router (17) or flannel (3)), and
moor never changes or deletes a route without it. pyroute2 would default to `static` (4), the
administrator's own protocol, so routes are packed here (rtnl_codec.py) with the number set.

All calls run on the calling thread's host netlink socket (nl.host_rtnl), in the daemon's netns.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass

from cni_plugin.datapath import rtnl_codec as codec
from cni_plugin.datapath.errors import DatapathError
from cni_plugin.datapath.nl import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REPLACE,
    dump_retry,
    host_ipr,
    host_rtnl,
    translate_errors,
)
from cni_plugin.datapath.rtnl_codec import RouteMsg

MOOR_RTPROTO = 109


class RouteConflict(DatapathError):
    """The destination is already routed by someone else (another protocol): moor leaves it."""


def main_table() -> list[RouteMsg]:
    """Every IPv4 route of the main table (one dump)."""
    with translate_errors("dump routes"):
        raw = dump_retry(
            lambda: host_rtnl().raw(codec.RTM_GETROUTE, codec.route_dump_request(), NLM_F_DUMP)
        )
    routes = (codec.parse_route(m) for m in raw if codec.message_type(m) == codec.RTM_NEWROUTE)
    return [r for r in routes if r is not None and r.table == codec.RT_TABLE_MAIN]


def replace_route(route: RouteMsg) -> None:
    """Install or change `route` (CREATE|REPLACE: idempotent), marked as moor's."""
    owned = RouteMsg(**{**route.__dict__, "proto": MOOR_RTPROTO})
    with translate_errors(f"route {route.prefix} via {route.gateway or '-'}"):
        host_rtnl().raw(
            codec.RTM_NEWROUTE, codec.pack_route(owned), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        )


def delete_route(route: RouteMsg) -> bool:
    """Delete one of moor's routes; False when it was already gone. Refuses anything else."""
    if route.proto != MOOR_RTPROTO:
        raise DatapathError(
            f"refusing to delete route {route.prefix}: not moor's (proto {route.proto})"
        )
    try:
        with translate_errors(f"delete route {route.prefix}"):
            host_rtnl().raw(codec.RTM_DELROUTE, codec.pack_route(route))
    except DatapathError as exc:
        if exc.errno in (3, 2):  # ESRCH, ENOENT: someone deleted it first
            return False
        raise
    return True


@dataclass(frozen=True)
class PathTo:
    """How the kernel would reach an address right now (`ip route get`)."""

    oif: int
    gateway: str  # "" when the address is on a directly connected network
    kind: int

    @property
    def direct(self) -> bool:
        return not self.gateway and self.kind == codec.RTN_UNICAST


def path_to(address: str) -> PathTo | None:
    """The kernel's route lookup for `address`; None when it has no route (ENETUNREACH)."""
    request = codec.pack_route(RouteMsg(address, 32, table=0))
    try:
        with translate_errors(f"route get {address}"):
            (reply,) = host_rtnl().raw(codec.RTM_GETROUTE, request)
    except DatapathError as exc:
        if exc.errno in (101, 113, 22):  # ENETUNREACH, EHOSTUNREACH, EINVAL (unroutable)
            return None
        raise
    found = codec.parse_route(reply)
    return None if found is None else PathTo(found.oif, found.gateway, found.kind)


@dataclass(frozen=True)
class Underlay:
    """The node's interface toward other nodes: the one holding its public IP."""

    index: int
    name: str
    mtu: int
    address: str


def underlay_for(address: str) -> Underlay:
    """The link that has `address` configured; DatapathError when no link has it."""
    packed = socket.inet_aton(address)
    ipr = host_ipr()
    with translate_errors("dump addresses"):
        addrs = dump_retry(lambda: ipr.get_addr(family=socket.AF_INET))
    for a in addrs:
        local = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
        if local and socket.inet_aton(local) == packed:
            index = int(a["index"])
            with translate_errors(f"link {index}"):
                (link,) = ipr.get_links(index)
            return Underlay(index, link.get("IFLA_IFNAME"), int(link.get("IFLA_MTU")), address)
    raise DatapathError(f"no interface of this node has the public IP {address}")


SIOCGIFADDR = 0x8915


def interface_ipv4(iface: str) -> str:
    """The first IPv4 address of `iface` (its primary one, as SIOCGIFADDR reports it)."""
    request = struct.pack("256s", iface.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, request)
        except OSError as exc:
            raise ValueError(f"--iface {iface}: no IPv4 address ({exc.strerror})") from exc
    return socket.inet_ntoa(reply[20:24])
