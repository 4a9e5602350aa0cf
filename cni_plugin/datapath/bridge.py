"""The node bridge that all pod veths attach to, and its gateway addresses.

The daemon owns the bridge. Every call re-reads kernel state (one RTM_GETLINK) instead of caching
the ifindex, because an operator or another tool can delete and recreate the bridge at any time.
"""

from __future__ import annotations

import errno
import os
import socket
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

from .errors import AddressExists, DatapathError, LinkExists, LinkNotFound
from .nl import (
    IFF_PROMISC,
    IFF_UP,
    LinkInfo,
    dump_retry,
    host_ipr,
    link_info,
    link_kind,
    translate_errors,
)

__all__ = [
    "enable_ip_forward",
    "ensure_bridge",
    "ensure_bridge_address",
    "random_mac",
    "remove_bridge_address",
]

IFA_F_NODAD = 0x02


def random_mac() -> str:
    """A random locally administered unicast MAC (what the kernel would pick, but known to us)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _write_sysctl(path: str, value: str) -> bool:
    """Write `value` unless already set (reading /proc is far cheaper than a redundant write).

    Returns False when the knob does not exist (e.g. IPv6 disabled on this node).
    """
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    except OSError as exc:  # e.g. EROFS: a container whose /proc/sys is read-only
        raise DatapathError(
            f"cannot set {path} to {value}: {exc.strerror} (moor-ipamd needs a writable "
            "/proc/sys/net: a privileged container, or podman's --security-opt unmask=/proc/sys)",
            exc.errno,
        ) from exc
    return True


def ensure_bridge(name: str, mtu: int = 0, promisc: bool = False) -> LinkInfo:
    """Create the bridge `name`, or adopt an existing one (same ifindex), and make sure it is up.

    * An existing non-bridge link of that name is an error, never replaced.
    * mtu=0 leaves the MTU alone; promisc=False leaves the promiscuous flag alone.
    * A new bridge gets a fixed random MAC: otherwise the kernel re-derives the bridge MAC from the
      lowest port MAC whenever ports come and go, changing the pods' gateway MAC under them.
    * accept_ra=0: the bridge faces pods, and a pod must not be able to steer the host's IPv6
      routing with router advertisements.
    Cost when already correct: one netlink request and one /proc read.
    """
    ipr = host_ipr()
    for _ in range(2):
        try:
            with translate_errors(f"get link {name!r}"):
                msg = ipr.link("get", ifname=name)[0]
        except LinkNotFound:
            msg = None
        if msg is not None:
            info = _adopt_bridge(name, msg, mtu, promisc)
            break
        kwargs: dict[str, object] = {
            "ifname": name,
            "kind": "bridge",
            "state": "up",
            "address": random_mac(),
        }
        if mtu:
            kwargs["mtu"] = mtu
        if promisc:
            kwargs["flags"] = IFF_UP | IFF_PROMISC
            kwargs["change"] = IFF_UP | IFF_PROMISC
        try:
            with translate_errors(f"create bridge {name!r}"):
                ipr.link("add", **kwargs)
        except LinkExists:
            continue  # lost a race with a concurrent creator: adopt theirs
        with translate_errors(f"get link {name!r}"):
            info = link_info(ipr.link("get", ifname=name)[0])
        break
    else:
        raise DatapathError(f"bridge {name!r} keeps appearing and disappearing")
    _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "0")
    return info


def _adopt_bridge(name: str, msg: Any, mtu: int, promisc: bool) -> LinkInfo:
    if link_kind(msg) != "bridge":
        raise DatapathError(f"{name!r} already exists but is not a bridge", errno.EEXIST)
    info = link_info(msg)
    flags = int(msg["flags"])
    want = IFF_UP | (IFF_PROMISC if promisc else 0)
    change: dict[str, int] = {}
    if flags & want != want:
        change["flags"] = flags | want
        change["change"] = want
    if mtu and msg.get("IFLA_MTU") != mtu:
        change["mtu"] = mtu
    if change:
        with translate_errors(f"update bridge {name!r}"):
            host_ipr().link("set", index=info.index, **change)
    return info


def _bridge_index(name: str) -> int:
    with translate_errors(f"get link {name!r}"):
        msg = host_ipr().link("get", ifname=name)[0]
    if link_kind(msg) != "bridge":
        raise DatapathError(f"{name!r} is not a bridge")
    return int(msg["index"])


def _family(iface: IPv4Interface | IPv6Interface) -> int:
    return socket.AF_INET if iface.version == 4 else socket.AF_INET6


def ensure_bridge_address(name: str, iface: IPv4Interface | IPv6Interface) -> bool:
    """Make sure the gateway address `iface` (e.g. 10.251.3.1/24) is on bridge `name`.

    Several subnets' gateways may live on one bridge (a node can hold several subnet leases), so
    other addresses are left alone. The same IP with a different prefix length is a conflict.
    Returns True when the address was added, False when it was already there.
    """
    ipr = host_ipr()
    index = _bridge_index(name)
    family = _family(iface)
    with translate_errors(f"list addresses of {name!r}"):
        current = dump_retry(lambda: ipr.addr("dump", index=index, family=family))
    ip = str(iface.ip)
    for a in current:
        if a.get("IFA_ADDRESS") == ip and a.get("index") == index:
            if int(a["prefixlen"]) == iface.network.prefixlen:
                return False
            raise AddressExists(
                f"{ip} is on {name!r} with prefix /{a['prefixlen']}, wanted {iface.with_prefixlen}"
            )
    kwargs: dict[str, object] = {
        "index": index,
        "address": ip,
        "prefixlen": iface.network.prefixlen,
        "family": family,
    }
    if iface.version == 4 and iface.network.prefixlen < 31:
        kwargs["broadcast"] = str(iface.network.broadcast_address)
    if iface.version == 6:
        kwargs["flags"] = IFA_F_NODAD
    try:
        with translate_errors(f"add {iface} to {name!r}", exists=AddressExists):
            ipr.addr("add", **kwargs)
    except AddressExists:
        return False  # a concurrent caller added it between our dump and our add
    return True


def remove_bridge_address(name: str, iface: IPv4Interface | IPv6Interface) -> bool:
    """Remove the gateway address `iface` from bridge `name` (when a subnet lease is released).

    Returns False when it (or the bridge) was not there.
    """
    try:
        index = _bridge_index(name)
    except LinkNotFound:
        return False
    try:
        with translate_errors(f"remove {iface} from {name!r}", missing=LinkNotFound):
            host_ipr().addr(
                "del",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=_family(iface),
            )
    except LinkNotFound:
        return False
    except DatapathError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return False
        raise
    return True


def enable_ip_forward(ipv6: bool = False) -> None:
    """Turn on IPv4 (and optionally IPv6) forwarding in the calling thread's netns.

    Pods reach anything beyond the bridge only if the node routes for them. Note that enabling IPv6
    forwarding makes the kernel ignore router advertisements on interfaces with accept_ra=1.
    """
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if ipv6 and not _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1"):
        raise DatapathError("IPv6 forwarding requested but IPv6 is disabled on this node")
