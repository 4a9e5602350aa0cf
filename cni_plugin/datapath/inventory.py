"""Read-only views of links: CNI CHECK's inspection of a pod and its host veth, and the host link
listing of the daemon's leak GC.

A listing that fails raises; the leak GC treats that as an incomplete view and releases nothing.
CHECK's inspection costs three requests in the pod (link, addresses, routes) and one on the host.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any

from cni_plugin.datapath.errors import LinkNotFound
from cni_plugin.datapath.nl import (
    IFF_UP,
    RTM_GETADDR,
    RTM_GETROUTE,
    LinkInfo,
    dump_retry,
    host_ipr,
    host_rtnl,
    ifaddrmsg,
    link_info,
    link_kind,
    pod_rtnl,
    rtmsg,
    translate_errors,
)
from cni_plugin.datapath.veth import Route
from cni_plugin.iptypes import IPInterface

RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class PodInterfaceState:
    """What CNI CHECK compares against the recorded result."""

    index: int
    name: str
    kind: str | None
    mac: str
    mtu: int
    up: bool
    operstate: str
    peer_index: int | None
    addresses: list[IPInterface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


@dataclass(frozen=True)
class HostVethState:
    index: int
    name: str
    kind: str | None
    mac: str
    mtu: int
    up: bool
    master_index: int | None
    peer_index: int | None
    hairpin: bool


def _host_link(name: str) -> Any | None:
    """The host link called `name` (one RTM_GETLINK), or None when there is none."""
    try:
        with translate_errors(f"get link {name!r}"):
            return host_rtnl().get_link(name)
    except LinkNotFound:
        return None


def lookup_bridge(name: str) -> LinkInfo | None:
    """The bridge called `name` in the host netns, or None if absent or not a bridge."""
    msg = _host_link(name)
    return link_info(msg) if msg is not None and link_kind(msg) == "bridge" else None


def _host_links() -> list[Any]:
    with translate_errors("dump host links"):
        return dump_retry(lambda: host_ipr().link("dump"))


def host_link_aliases() -> dict[str, str]:
    """Every host link that carries an alias: name -> alias (one dump)."""
    return {
        str(m.get("IFLA_IFNAME")): str(alias)
        for m in _host_links()
        if (alias := m.get("IFLA_IFALIAS")) is not None
    }


def host_link_names() -> set[str]:
    """Names of every link in the host netns (one dump)."""
    return {str(m.get("IFLA_IFNAME")) for m in _host_links()}


def _decoded(replies: list[bytes], kind: type[Any]) -> list[Any]:
    """pyroute2 messages decoded from raw replies (the same objects IPRoute would return)."""
    out = []
    for data in replies:
        msg = kind(data)
        msg.decode()
        out.append(msg)
    return out


def _is_up(msg: Any) -> bool:
    return bool(int(msg["flags"]) & IFF_UP)


def inspect_pod_interface(netns_fd: int, ifname: str) -> PodInterfaceState | None:
    """State of `ifname` in the pod netns, or None when it does not exist.

    Three requests on one socket: the link, its addresses, and the (tiny) pod route table; only
    routes of the main table are reported.
    """
    with pod_rtnl(netns_fd) as rtnl:
        try:
            with translate_errors(f"get pod link {ifname!r}", host=False):
                link = rtnl.get_link(ifname)
        except LinkNotFound:
            return None
        index = int(link["index"])
        with translate_errors(f"dump pod addresses of {ifname!r}", host=False):
            addrs = dump_retry(lambda: _decoded(rtnl.dump(ifaddrmsg(), RTM_GETADDR), ifaddrmsg))
        with translate_errors("dump pod routes", host=False):
            rts = dump_retry(lambda: _decoded(rtnl.dump(rtmsg(), RTM_GETROUTE), rtmsg))
    addresses: list[IPInterface] = [
        ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        for a in addrs
        if a.get("index") == index and a.get("IFA_ADDRESS") is not None
    ]
    routes: list[Route] = []
    for r in rts:
        table = r.get("RTA_TABLE") or r["table"]
        if table != RT_TABLE_MAIN or r["family"] not in (socket.AF_INET, socket.AF_INET6):
            continue
        any_addr = "0.0.0.0" if r["family"] == socket.AF_INET else "::"
        dst = ip_network(f"{r.get('RTA_DST') or any_addr}/{r['dst_len']}", strict=False)
        gw = r.get("RTA_GATEWAY")
        routes.append(Route(dst=dst, gw=ip_address(gw) if gw else None))
    return PodInterfaceState(
        index=index,
        name=link.get("IFLA_IFNAME"),
        kind=link_kind(link),
        mac=link.get("IFLA_ADDRESS"),
        mtu=int(link.get("IFLA_MTU")),
        up=_is_up(link),
        operstate=str(link.get("IFLA_OPERSTATE")),
        peer_index=link.get("IFLA_LINK"),
        addresses=addresses,
        routes=routes,
    )


def inspect_host_veth(host_name: str) -> HostVethState | None:
    """State of the host end in one RTM_GETLINK, or None when it does not exist."""
    msg = _host_link(host_name)
    if msg is None:
        return None
    hairpin = False
    linkinfo = msg.get("IFLA_LINKINFO")
    if linkinfo is not None and linkinfo.get("IFLA_INFO_SLAVE_KIND") == "bridge":
        slave = linkinfo.get("IFLA_INFO_SLAVE_DATA")
        hairpin = bool(slave.get("IFLA_BRPORT_MODE")) if slave is not None else False
    return HostVethState(
        index=int(msg["index"]),
        name=msg.get("IFLA_IFNAME"),
        kind=link_kind(msg),
        mac=msg.get("IFLA_ADDRESS"),
        mtu=int(msg.get("IFLA_MTU")),
        up=_is_up(msg),
        master_index=msg.get("IFLA_MASTER"),
        peer_index=msg.get("IFLA_LINK"),
        hairpin=hairpin,
    )
