"""From the lease snapshot to the remote subnets this node should route to, and why not the rest.

Pure logic: desired state is a function of the leases and the cluster's network config. A lease
that cannot be routed is never a crash: it gets a state and a reason, which the daemon logs once
per change and `moorctl subnets` shows.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ipamd.fixed.model import FixedBinding
from ipamd.model import IPAddress, IPNetwork, SubnetLease
from ipamd.network_config import NetworkConfig

LOCAL = "local"  # this node's own subnet
ROUTED = "routed"
UNREACHABLE = "unreachable"  # host-gw: the peer is not on a directly connected network
REFUSED = "refused"  # the lease itself is unusable here (VNI or port differs, no public IP, ...)
PENDING = "pending"  # not reconciled yet, or the last reconcile failed
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class RouteState:
    state: str
    reason: str = ""


@dataclass(frozen=True)
class FixedPlan:
    """The /32s of fixed IPs: those this node hosts (IP -> host veth) and those other nodes host
    (IP -> that node's first routable subnet, whose next hop the /32 shares)."""

    local: dict[IPAddress, str] = field(default_factory=dict)
    remote: dict[IPAddress, RemoteSubnet] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteSubnet:
    """A peer's subnet as the backends need it."""

    subnet: IPNetwork
    node: str
    public_ip: str
    vtep_mac: str = ""


def remote_subnets(
    leases: Iterable[SubnetLease], node: str, config: NetworkConfig, public_ip: str
) -> tuple[list[RemoteSubnet], dict[IPNetwork, RouteState]]:
    """The routable remote subnets, and a state for every lease that is not one (own, refused)."""
    remotes: list[RemoteSubnet] = []
    states: dict[IPNetwork, RouteState] = {}
    for lease in leases:
        if lease.node == node:
            states[lease.subnet] = RouteState(LOCAL)
            continue
        problem = _refusal(lease, config, public_ip)
        if problem:
            states[lease.subnet] = RouteState(REFUSED, problem)
            continue
        mac = str(lease.backend.get("vtepMAC", "")) if config.backend == "vxlan" else ""
        remotes.append(RemoteSubnet(lease.subnet, lease.node, lease.public_ip, mac))
    return remotes, states


def _refusal(lease: SubnetLease, config: NetworkConfig, public_ip: str) -> str:
    if lease.subnet.version != 4 or not lease.subnet.subnet_of(config.network):  # type: ignore[arg-type]
        return f"{lease.subnet} is not inside the cluster network {config.network}"
    try:
        peer_ip = ipaddress.IPv4Address(lease.public_ip)
    except ValueError:
        return f"node {lease.node} publishes no usable public IP ({lease.public_ip!r})"
    if peer_ip.is_unspecified or peer_ip.is_multicast or peer_ip.is_loopback:
        return f"node {lease.node} publishes public IP {peer_ip}, which cannot be a next hop"
    if str(peer_ip) == public_ip:
        return f"node {lease.node} publishes this node's own public IP {public_ip}"
    if config.backend != "vxlan":
        return ""
    data = lease.backend
    if data.get("type") != "vxlan":
        return f"node {lease.node} runs backend {data.get('type')!r}, this cluster is vxlan"
    if data.get("vni") != config.vni:
        return f"node {lease.node} uses VNI {data.get('vni')!r}, this node {config.vni}"
    if data.get("port") != config.vxlan_port:
        return (
            f"node {lease.node} uses UDP port {data.get('port')!r}, this node {config.vxlan_port}"
        )
    if not isinstance(data.get("vtepMAC"), str) or not _MAC_RE.fullmatch(data["vtepMAC"]):
        return f"node {lease.node} publishes no valid VTEP MAC ({data.get('vtepMAC')!r})"
    return ""


def fixed_plan(
    bindings: Iterable[FixedBinding], node: str, remotes: list[RemoteSubnet],
    local: dict[IPAddress, str],
) -> FixedPlan:  # fmt: skip
    """Where each held fixed IP's /32 goes from this node. What this node hosts (its own memory,
    newer than any watch) is local and never gets the remote form; a binding on a node with no
    routable subnet here gets no route."""
    first: dict[str, RemoteSubnet] = {}
    for remote in sorted(remotes, key=lambda r: int(r.subnet.network_address)):
        first.setdefault(remote.node, remote)
    remote_ips = {
        b.ip: first[b.node]
        for b in bindings
        if b.held and b.node != node and b.ip not in local and b.node in first
    }
    return FixedPlan(dict(local), remote_ips)
