"""Pod veth pairs: create, configure inside the pod, delete. (CHECK's read-only inspection is in
`inventory.py`.)

The ADD path is budgeted in netlink round trips (~0.5-0.9 ms each):
  create_veth             2 requests from the host side: create + get (+1 only for hairpin)
  configure_pod_interface 1 socket + 3 requests + 1 per address + 1 per route
The veth is created with its peer already inside the pod netns (one RTM_NEWLINK), which is about
three times faster than create-on-host-then-move.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

from cni_plugin.iptypes import IPAddress, IPNetwork
from cni_plugin.naming import ifname_problem

from . import rtnl_codec as codec
from .bridge import IFA_F_NODAD, random_mac
from .errors import (
    DatapathError,
    InvalidSetting,
    LinkExists,
    LinkNotFound,
    PodInterfaceExists,
)
from .netns import netns_inode
from .nl import (
    IFF_UP,
    NLM_F_ACK,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    host_ipr,
    host_rtnl,
    ifaddrmsg,
    ifinfmsg,
    link_kind,
    pod_ipr,
    pod_rtnl,
    rtmsg,
    translate_errors,
)

NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
LOOPBACK_INDEX = 1  # lo is always ifindex 1 in a network namespace

__all__ = [
    "Route",
    "VethPair",
    "configure_pod_interface",
    "create_veth",
    "delete_host_veth_if_exists",
    "host_veth_index",
    "host_veth_name",
]

RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class Route:
    """A route in the pod: via `gw`, or link-scope (directly on the interface) when gw is None."""

    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class VethEnd:
    name: str
    mac: str


@dataclass(frozen=True)
class VethPair:
    """What the CNI result needs of a new pair; both MACs are chosen here, so no read-back."""

    host: VethEnd
    pod: VethEnd


def host_veth_name(container_id: str, ifname: str) -> str:
    """Host-side veth name derived from (container id, pod ifname), so DEL and GC can find it
    without the pod netns (which may already be gone). 15 chars: the kernel's limit."""
    digest = hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()
    return "veth" + digest[:11]


def _check_ifname(name: str) -> None:
    """A guard, not validation (the CNI layer validated the request): the one rule's home."""
    if problem := ifname_problem(name):
        raise ValueError(problem)


def create_veth(
    host_name: str,
    pod_ifname: str,
    netns_fd: int,
    bridge_index: int | None,
    mtu: int = 0,
    mac: str | None = None,
    hairpin: bool = False,
    alias: str = "",
) -> VethPair:
    """Create host end `host_name` (up, enslaved to `bridge_index`, or on no bridge when None: a
    fixed IP's point-to-point pair) with peer `pod_ifname` already inside the netns of
    `netns_fd`, in ONE RTM_NEWLINK. The pod end stays down until configure_pod_interface.

    alias: the host end's IFLA_IFALIAS (the attachment's kernel record, see kernel_record.py);
    one more request, because the kernel ignores an alias given at creation.

    mac: MAC of the pod end; a random locally administered one when None. The host end's MAC is
    chosen here too, so the result is known without reading either end back (one request saved on
    every ADD).
    Raises PodInterfaceExists / LinkExists (nothing is left behind: the kernel creates both ends
    or neither), LinkNotFound when the bridge index does not exist, NetnsError for a bad fd.
    """
    _check_ifname(host_name)
    _check_ifname(pod_ifname)
    pod_mac = (mac or random_mac()).lower()
    host_mac = random_mac()
    rtnl = host_rtnl()
    for _ in range(2):
        try:
            with translate_errors(f"create veth {host_name!r}/{pod_ifname!r}"):
                rtnl.request(
                    _veth_message(
                        host_name, host_mac, pod_ifname, pod_mac, netns_fd, bridge_index, mtu
                    ),
                    RTM_NEWLINK,
                    NLM_F_CREATE | NLM_F_EXCL,
                )
            break
        except LinkExists as e:
            _raise_which_exists(e, host_name, pod_ifname, netns_fd)
            # neither name exists any more: a concurrent delete raced us; try once more
        except DatapathError as e:
            _explain_create_failure(e, netns_fd, bridge_index)
            raise
    else:
        raise LinkExists(f"veth {host_name!r}/{pod_ifname!r}: EEXIST but no clash found")
    try:
        if alias:
            named = ifinfmsg()  # ifindex 0: the kernel finds the link by IFLA_IFNAME
            named["attrs"] = [("IFLA_IFNAME", host_name), ("IFLA_IFALIAS", alias)]
            with translate_errors(f"set the alias of {host_name!r}"):
                rtnl.request(named, RTM_NEWLINK)
        if hairpin:
            with translate_errors(f"set hairpin on {host_name!r}"):
                ipr = host_ipr()
                index = int(ipr.link("get", ifname=host_name)[0]["index"])
                ipr.brport("set", index=index, mode=1)
    except BaseException:
        with contextlib.suppress(DatapathError):
            delete_host_veth_if_exists(host_name)  # leave nothing half-configured behind
        raise
    return VethPair(host=VethEnd(host_name, host_mac), pod=VethEnd(pod_ifname, pod_mac))


def _veth_message(
    host_name: str,
    host_mac: str,
    pod_name: str,
    pod_mac: str,
    netns_fd: int,
    bridge_index: int | None,
    mtu: int,
) -> ifinfmsg:
    """RTM_NEWLINK for a veth whose host end is up on the bridge and whose peer is born in the pod."""
    peer_attrs: list[tuple[str, Any]] = [
        ("IFLA_IFNAME", pod_name),
        ("IFLA_ADDRESS", pod_mac),
        ("IFLA_NET_NS_FD", netns_fd),
    ]
    attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", host_name), ("IFLA_ADDRESS", host_mac)]
    if bridge_index is not None:
        attrs.append(("IFLA_MASTER", bridge_index))
    if mtu:
        peer_attrs.append(("IFLA_MTU", mtu))
        attrs.append(("IFLA_MTU", mtu))
    attrs.append(
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": peer_attrs})]}),
                ]
            },
        )
    )
    msg = ifinfmsg()
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["attrs"] = attrs
    return msg


def _explain_create_failure(err: DatapathError, netns_fd: int, bridge_index: int | None) -> None:
    """The kernel answers EINVAL/EBADF/EOPNOTSUPP/ENODEV (and ERANGE/EADDRNOTAVAIL for an MTU or
    MAC) for several distinct mistakes; find out which one it was (error path only) and raise the
    precise exception. With the fd and the bridge ruled out, an EINVAL/ERANGE/EADDRNOTAVAIL is the
    request's own MTU or MAC: InvalidSetting."""
    if err.errno not in _EXPLAINED:
        return
    netns_inode(netns_fd)  # raises NetnsError if the fd is the culprit
    if bridge_index is None:
        if err.errno in _REQUEST_SETTING:
            raise InvalidSetting(str(err), err.errno) from err
        return
    try:
        with translate_errors(f"get bridge index {bridge_index}"):
            msg = host_ipr().link("get", index=bridge_index)[0]
    except LinkNotFound:
        raise LinkNotFound(f"bridge index {bridge_index} does not exist", err.errno) from err
    if link_kind(msg) != "bridge":
        raise DatapathError(
            f"master index {bridge_index} ({msg.get('IFLA_IFNAME')!r}) is not a bridge", err.errno
        ) from err
    if err.errno in _REQUEST_SETTING:
        raise InvalidSetting(str(err), err.errno) from err


_REQUEST_SETTING = (errno.EINVAL, errno.ERANGE, errno.EADDRNOTAVAIL)
_REFUSED_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.ERANGE)
_EXPLAINED = (errno.EBADF, errno.EOPNOTSUPP, errno.ENODEV, *_REQUEST_SETTING)


def _raise_which_exists(err: LinkExists, host_name: str, pod_ifname: str, netns_fd: int) -> None:
    """EEXIST on a veth create does not say which end clashed; one cheap lookup per side does."""
    ipr = host_ipr()
    try:
        with translate_errors(f"get link {host_name!r}"):
            ipr.link("get", ifname=host_name)
        raise LinkExists(f"host link {host_name!r} already exists", errno.EEXIST) from err
    except LinkNotFound:
        pass
    try:
        with pod_ipr(netns_fd) as p, translate_errors(f"get pod link {pod_ifname!r}", host=False):
            p.link("get", ifname=pod_ifname)
        raise PodInterfaceExists(
            f"interface {pod_ifname!r} already exists in the pod netns", errno.EEXIST
        ) from err
    except LinkNotFound:
        pass


def configure_pod_interface(
    netns_fd: int,
    ifname: str,
    addresses: list[IPv4Interface | IPv6Interface],
    routes: list[Route],
    neighbours: Sequence[tuple[IPAddress, str]] = (),
) -> None:
    """Inside the pod netns, on one short-lived netlink socket: add `addresses` to `ifname`, set it
    and `lo` up, add the permanent `neighbours` (IP, MAC), then add `routes` in the given order (so
    a link-scope route to an off-subnet gateway can precede the route through it). A fixed IP's
    pod gets its link-local gateway as a permanent neighbour: the host end's MAC, known at
    creation, so the pod never depends on proxy ARP (which needs the node to route the gateway
    out of another interface).

    Uses "replace" for addresses and routes: a retried ADD converges instead of failing on EEXIST.
    IPv6 addresses get IFA_F_NODAD: the pod's address is unique by IPAM, and DAD would leave it
    unusable for a second or more.
    """
    for r in routes:
        if r.gw is not None and r.gw.version != r.dst.version:
            raise ValueError(f"route {r.dst} via {r.gw}: address families differ")
    with pod_rtnl(netns_fd) as rtnl:
        with translate_errors(f"get pod link {ifname!r}", host=False):
            index = int(rtnl.get_link(ifname)["index"])
        for a in addresses:
            with translate_errors(f"add {a} to pod {ifname!r}", host=False):
                rtnl.request(_address_message(index, a), RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE)
        for link_index, name in ((index, ifname), (LOOPBACK_INDEX, "lo")):
            up = ifinfmsg()
            up["index"] = link_index
            up["flags"] = IFF_UP
            up["change"] = IFF_UP
            with translate_errors(f"set pod {name!r} up", host=False):
                rtnl.request(up, RTM_NEWLINK)
        for ip, mac in neighbours:
            entry = codec.NeighMsg(socket.AF_INET, index, mac, str(ip), codec.NUD_PERMANENT)
            with translate_errors(f"add neighbour {ip} in pod", host=False):
                rtnl.raw(codec.RTM_NEWNEIGH, codec.pack_neigh(entry),
                         NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)  # fmt: skip
        for r in routes:
            try:
                with translate_errors(f"add route {r.dst} via {r.gw} in pod", host=False):
                    rtnl.request(
                        _route_message(index, r), RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE
                    )
            except DatapathError as e:
                if e.errno in _REFUSED_ROUTE:  # e.g. a gateway not on any of the pod's links
                    raise InvalidSetting(str(e), e.errno) from e
                raise


def _address_message(index: int, a: IPv4Interface | IPv6Interface) -> ifaddrmsg:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if a.version == 4 else socket.AF_INET6
    msg["prefixlen"] = a.network.prefixlen
    msg["index"] = index
    attrs: list[tuple[str, Any]] = [("IFA_LOCAL", str(a.ip)), ("IFA_ADDRESS", str(a.ip))]
    if a.version == 4 and a.network.prefixlen < 31:
        attrs.append(("IFA_BROADCAST", str(a.network.broadcast_address)))
    if a.version == 6:
        msg["flags"] = IFA_F_NODAD
    msg["attrs"] = attrs
    return msg


def _route_message(index: int, r: Route) -> rtmsg:
    msg = rtmsg()
    msg["family"] = socket.AF_INET if r.dst.version == 4 else socket.AF_INET6
    msg["dst_len"] = r.dst.prefixlen
    msg["table"] = RT_TABLE_MAIN
    msg["proto"] = RTPROT_BOOT
    msg["scope"] = RT_SCOPE_LINK if r.gw is None else 0
    msg["type"] = RTN_UNICAST
    attrs: list[tuple[str, Any]] = [("RTA_OIF", index)]
    if r.dst.prefixlen:
        attrs.append(("RTA_DST", str(r.dst.network_address)))
    if r.gw is not None:
        attrs.append(("RTA_GATEWAY", str(r.gw)))
    msg["attrs"] = attrs
    return msg


def host_veth_index(host_name: str) -> int | None:
    """The ifindex of our host veth `host_name`, None when it does not exist (one request).

    A link of that name that is not a veth is an error: it is never ours to delete.
    """
    try:
        with translate_errors(f"get link {host_name!r}"):
            msg = host_rtnl().get_link(host_name)
    except LinkNotFound:
        return None
    if link_kind(msg) != "veth":
        raise DatapathError(f"{host_name!r} exists but is a {link_kind(msg)!r}, not a veth")
    return int(msg["index"])


def delete_host_veth_if_exists(host_name: str) -> bool:
    """Delete the host end (the kernel removes the pod end with it). ~16-20 ms (RCU).

    Returns False when it was already gone. A non-veth link with that name is never deleted.
    """
    index = host_veth_index(host_name)
    if index is None:
        return False
    gone = ifinfmsg()
    gone["index"] = index
    try:
        with translate_errors(f"delete veth {host_name!r}"):
            host_rtnl().request(gone, RTM_DELLINK)
    except LinkNotFound:
        return False
    return True
