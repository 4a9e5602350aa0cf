"""The vxlan device `moor.<VNI>` and the per-peer neighbour and FDB entries on it.

The device is made the way flannel makes `flannel.<VNI>` (learning off, no L2/L3 miss, the node's
subnet `.0/32` as its address, MTU = underlay - 50), with two differences: the UDP port is always
sent (the kernel default applies otherwise, and the port cannot be changed on a live device) and
the MAC is the stable one the caller derives, set at creation and checked after link up.

Every permanent neighbour and FDB entry on the device is moor's: the reconcile deletes any it did
not ask for. FDB entries are written with REPLACE, never APPEND: for a unicast MAC the kernel's
append keeps the old destination beside the new one (vxlan_fdb_update_existing), a stale tunnel.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

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
    link_kind,
    translate_errors,
)
from cni_plugin.datapath.rtnl_codec import NeighMsg

ENCAP_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
IFF_UP = 0x1


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    port: int
    local: str  # the node's public IP: source of the tunnel
    underlay_index: int
    mac: str
    mtu: int
    address: str  # the node's subnet .0, as a /32


def device_name(vni: int) -> str:
    return f"moor.{vni}"


def _data(link: Any) -> dict[str, Any]:
    info = link.get("IFLA_LINKINFO")
    data = info.get("IFLA_INFO_DATA") if info is not None else None
    if data is None:
        return {}
    return {name: value for name, value in data["attrs"]}


def _compatible(link: Any, spec: VxlanSpec) -> bool:
    """What cannot change on a live device (port, VNI, local, underlay) and our MAC."""
    if link_kind(link) != "vxlan":
        return False
    d = _data(link)
    return (
        d.get("IFLA_VXLAN_ID") == spec.vni
        and d.get("IFLA_VXLAN_PORT") == spec.port
        and d.get("IFLA_VXLAN_LOCAL") == spec.local
        and d.get("IFLA_VXLAN_LINK") == spec.underlay_index
        and d.get("IFLA_VXLAN_LEARNING", 0) == 0
        and str(link.get("IFLA_ADDRESS")).lower() == spec.mac
    )


def find_device(name: str) -> Any | None:
    ipr = host_ipr()
    with translate_errors(f"look up {name}"):
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        (link,) = ipr.get_links(found[0])
    return link


def ensure_device(spec: VxlanSpec) -> tuple[int, bool]:
    """The device as `spec` says, up, with its address: (ifindex, made). A device of that name
    that differs in what cannot be changed live is deleted and made again (`made` is then True:
    every neighbour, FDB entry and route on the old one went with it)."""
    ipr = host_ipr()
    link = find_device(spec.name)
    made = False
    if link is not None and not _compatible(link, spec):
        with translate_errors(f"delete incompatible {spec.name}"):
            ipr.link("del", index=link["index"])
        link = None
    if link is None:
        with translate_errors(f"create {spec.name}"):
            ipr.link(
                "add",
                ifname=spec.name,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_port=spec.port,
                vxlan_learning=0,
                vxlan_local=spec.local,
                vxlan_link=spec.underlay_index,
                address=spec.mac,
                mtu=spec.mtu,
            )
        link = find_device(spec.name)
        made = True
        if link is None:
            raise DatapathError(f"{spec.name} vanished right after it was made")
    index = int(link["index"])
    brought_up = made or not int(link["flags"]) & IFF_UP
    with translate_errors(f"configure {spec.name}"):
        if int(link.get("IFLA_MTU")) != spec.mtu:
            ipr.link("set", index=index, mtu=spec.mtu)
        if brought_up:
            ipr.link("set", index=index, state="up")
    if brought_up:  # else it was up already and `_compatible` has just read our MAC on it
        _check_mac(spec)
    _ensure_address(index, spec)
    with contextlib.suppress(OSError):  # no IPv6 on this node: nothing to turn off
        with open(f"/proc/sys/net/ipv6/conf/{spec.name}/accept_ra", "w") as f:
            f.write("0")
    return index, made


def _check_mac(spec: VxlanSpec) -> None:
    """After link up: a udev/systemd MACAddressPolicy may have rewritten it (flannel #1795)."""
    link = find_device(spec.name)
    mac = str(link.get("IFLA_ADDRESS")).lower() if link is not None else ""
    if mac != spec.mac:
        with translate_errors(f"set the MAC of {spec.name}"):
            host_ipr().link("set", ifname=spec.name, address=spec.mac)
        link = find_device(spec.name)
        if link is None or str(link.get("IFLA_ADDRESS")).lower() != spec.mac:
            raise DatapathError(f"{spec.name} does not keep its MAC {spec.mac} (now {mac})")


def _ensure_address(index: int, spec: VxlanSpec) -> None:
    ipr = host_ipr()
    with translate_errors(f"addresses of {spec.name}"):
        present = [
            (a.get("IFA_ADDRESS"), int(a["prefixlen"]))
            for a in dump_retry(lambda: ipr.get_addr(family=socket.AF_INET, index=index))
        ]
        for addr, plen in present:
            if (addr, plen) != (spec.address, 32):
                ipr.addr("del", index=index, address=addr, prefixlen=plen)
        if (spec.address, 32) not in present:
            ipr.addr("add", index=index, address=spec.address, prefixlen=32)


def delete_device(name: str) -> bool:
    link = find_device(name)
    if link is None:
        return False
    with translate_errors(f"delete {name}"):
        host_ipr().link("del", index=link["index"])
    return True


# ---- neighbours and FDB entries ---------------------------------------------------------------
def entries(family: int, ifindex: int) -> list[NeighMsg]:
    """Permanent neighbours (AF_INET) or FDB entries (codec.AF_BRIDGE) on `ifindex`."""
    with translate_errors("dump neighbours"):
        raw = dump_retry(
            lambda: host_rtnl().raw(
                codec.RTM_GETNEIGH, codec.neigh_dump_request(family), NLM_F_DUMP
            )
        )
    found = (codec.parse_neigh(m) for m in raw if codec.message_type(m) == codec.RTM_NEWNEIGH)
    return [
        e
        for e in found
        if e.family == family and e.ifindex == ifindex and e.state & codec.NUD_PERMANENT
    ]


def neighbour(ifindex: int, ip: str, mac: str) -> NeighMsg:
    return NeighMsg(socket.AF_INET, ifindex, mac, ip, codec.NUD_PERMANENT)


def fdb_entry(ifindex: int, mac: str, dst: str) -> NeighMsg:
    return NeighMsg(
        codec.AF_BRIDGE, ifindex, mac, dst, codec.NUD_PERMANENT | codec.NUD_NOARP, codec.NTF_SELF
    )


def replace_entry(entry: NeighMsg) -> None:
    with translate_errors(f"neighbour {entry.dst} {entry.lladdr}"):
        host_rtnl().raw(
            codec.RTM_NEWNEIGH, codec.pack_neigh(entry), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        )


def delete_entry(entry: NeighMsg) -> bool:
    """False when it was already gone."""
    try:
        with translate_errors(f"delete neighbour {entry.dst} {entry.lladdr}"):
            host_rtnl().raw(codec.RTM_DELNEIGH, codec.pack_neigh(entry))
    except DatapathError as exc:
        if exc.errno == 2:  # ENOENT
            return False
        raise
    return True
