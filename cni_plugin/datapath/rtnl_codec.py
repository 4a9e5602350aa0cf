"""Packing and parsing of the two rtnetlink bodies the route reconcile writes in bulk: routes
(rtmsg) and neighbours/FDB entries (ndmsg), with their attributes.

A reconcile of 5000 vxlan peers writes 15000 objects and dumps as many; pyroute2's generic codec
costs more Python per message than the kernel spends on the request, so these few fixed layouts
are packed by hand (linux/rtnetlink.h, linux/neighbour.h). Everything else stays on pyroute2.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_DELLINK = 17
AF_BRIDGE = 7
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF = 0x02

_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class RouteMsg:
    """An IPv4 route as the reconcile sees it: enough to compare, replace and delete."""

    dst: str  # network address
    dst_len: int
    gateway: str = ""
    oif: int = 0
    proto: int = 0
    table: int = RT_TABLE_MAIN
    onlink: bool = False
    priority: int = 0
    kind: int = RTN_UNICAST
    scope: int = RT_SCOPE_UNIVERSE

    @property
    def prefix(self) -> str:
        return f"{self.dst}/{self.dst_len}"


@dataclass(frozen=True)
class NeighMsg:
    """A neighbour (family AF_INET) or FDB entry (family AF_BRIDGE) on one link."""

    family: int
    ifindex: int
    lladdr: str
    dst: str = ""
    state: int = NUD_PERMANENT
    flags: int = 0


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def pack_route(route: RouteMsg) -> bytes:
    flags = RTNH_F_ONLINK if route.onlink else 0
    body = _RTMSG.pack(
        socket.AF_INET, route.dst_len, 0, 0, route.table if route.table < 256 else 252,
        route.proto, route.scope, route.kind, flags,
    )  # fmt: skip
    if route.table:
        body += _attr(RTA_TABLE, struct.pack("=I", route.table))
    body += _attr(RTA_DST, socket.inet_aton(route.dst))
    if route.gateway:
        body += _attr(RTA_GATEWAY, socket.inet_aton(route.gateway))
    if route.oif:
        body += _attr(RTA_OIF, struct.pack("=i", route.oif))
    if route.priority:
        body += _attr(RTA_PRIORITY, struct.pack("=I", route.priority))
    return body


def route_dump_request() -> bytes:
    return _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)


def parse_route(message: bytes) -> RouteMsg | None:
    """A route from one raw RTM_NEWROUTE message (with its netlink header); None if not IPv4."""
    body = _NLMSG.size
    family, dst_len, _src, _tos, table, proto, scope, kind, flags = _RTMSG.unpack_from(
        message, body
    )
    if family != socket.AF_INET:
        return None
    dst, gateway, oif, priority = "0.0.0.0", "", 0, 0
    for attr, value in _attrs(message, body + _RTMSG.size):
        if attr == RTA_DST:
            dst = socket.inet_ntoa(value[:4])
        elif attr == RTA_GATEWAY:
            gateway = socket.inet_ntoa(value[:4])
        elif attr == RTA_OIF:
            oif = struct.unpack_from("=i", value)[0]
        elif attr == RTA_TABLE:
            table = struct.unpack_from("=I", value)[0]
        elif attr == RTA_PRIORITY:
            priority = struct.unpack_from("=I", value)[0]
    return RouteMsg(
        dst, dst_len, gateway, oif, proto, table, bool(flags & RTNH_F_ONLINK), priority, kind, scope
    )


def pack_neigh(entry: NeighMsg) -> bytes:
    body = _NDMSG.pack(entry.family, entry.ifindex, entry.state, entry.flags, 0)
    if entry.dst:
        body += _attr(NDA_DST, socket.inet_aton(entry.dst))
    if entry.lladdr:
        body += _attr(NDA_LLADDR, bytes.fromhex(entry.lladdr.replace(":", "")))
    return body


def neigh_dump_request(family: int, ifindex: int = 0) -> bytes:
    return _NDMSG.pack(family, ifindex, 0, 0, 0)


def parse_neigh(message: bytes) -> NeighMsg:
    """A neighbour or FDB entry from one raw RTM_NEWNEIGH message (with its netlink header)."""
    body = _NLMSG.size
    family, ifindex, state, flags, _kind = _NDMSG.unpack_from(message, body)
    dst, lladdr = "", ""
    for attr, value in _attrs(message, body + _NDMSG.size):
        if attr == NDA_DST and len(value) == 4:
            dst = socket.inet_ntoa(value)
        elif attr == NDA_LLADDR:
            lladdr = ":".join(f"{b:02x}" for b in value)
    return NeighMsg(family, ifindex, lladdr, dst, state, flags)


def message_type(message: bytes) -> int:
    return _NLMSG.unpack_from(message)[1]


def split_messages(data: bytes) -> Iterator[bytes]:
    """The netlink messages of one datagram (a multicast notification may carry several)."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, offset)[0]
        if length < _NLMSG.size:
            return
        yield data[offset : offset + length]
        offset += (length + 3) & ~3
