"""The one interface both routing backends (host-gw, vxlan) implement, and the route planning
they share.

A backend's `reconcile` is level-triggered and complete: given every remote subnet that should be
routed now, it reads the kernel, removes what it owns and is not wanted (a peer that left while
the daemon was down), replaces what differs (a peer's new public IP or MAC) and adds what is
missing. It owns only objects marked as moor's: routes with protocol `MOOR_RTPROTO`, and the
permanent neighbour/FDB entries on its own vxlan device. A destination someone else already routes
is left alone and reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cni_plugin.datapath import routes
from cni_plugin.datapath.errors import LinkNotFound
from cni_plugin.datapath.monitor import Deleted
from cni_plugin.datapath.routes import MOOR_RTPROTO
from cni_plugin.datapath.rtnl_codec import RT_SCOPE_LINK, RouteMsg
from cni_plugin.datapath.veth import host_veth_index
from ipamd.model import IPAddress, IPNetwork
from ipamd.routing.peers import FixedPlan, RemoteSubnet, RouteState


class RoutingBackend(Protocol):
    name: str

    @property
    def pod_mtu(self) -> int:
        """The MTU pods get when netconf sets none: the underlay minus the encapsulation."""
        ...

    def reconcile(
        self, remotes: Sequence[RemoteSubnet], fixed: FixedPlan
    ) -> dict[IPNetwork, RouteState]:
        """Make the kernel match `remotes` and the fixed IPs' /32s (see the module docstring);
        a state per subnet."""
        ...

    def wants(self, deleted: Deleted) -> bool:
        """Is this kernel deletion one of ours (so the reconcile should run now)?"""
        ...


@dataclass
class RoutePlan:
    stale: list[RouteMsg] = field(default_factory=list)  # ours, not wanted or different
    missing: list[RouteMsg] = field(default_factory=list)  # wanted, absent or different
    taken: dict[str, RouteMsg] = field(default_factory=dict)  # prefix routed by someone else


def plan_routes(
    desired: Mapping[str, RouteMsg], table: Sequence[RouteMsg], keep: frozenset[str] = frozenset()
) -> RoutePlan:
    """Compare wanted routes (by prefix) with the main table. Only metric-0 routes can collide
    with ours (the kernel keys a route by prefix and metric), so those are the ones checked.
    Routes to a prefix in `keep` are left as they are (a fixed IP whose ADD is under way)."""
    plan = RoutePlan()
    present: dict[str, RouteMsg] = {}
    for route in table:
        if route.prefix in keep:
            continue
        if route.proto == MOOR_RTPROTO:
            want = desired.get(route.prefix)
            if want is None or want.priority != route.priority or route.prefix in present:
                plan.stale.append(route)  # a REPLACE would not reach it: delete
            elif _same(want, route):
                present[route.prefix] = route
            # else: different next hop, same key: the REPLACE of `missing` changes it in place
        elif route.priority == 0 and route.prefix in desired:
            plan.taken[route.prefix] = route
    for prefix, want in desired.items():
        if prefix not in present and prefix not in plan.taken:
            plan.missing.append(want)
    return plan


def _same(want: RouteMsg, have: RouteMsg) -> bool:
    return (want.gateway, want.oif, want.onlink, want.priority) == (
        have.gateway,
        have.oif,
        have.onlink,
        have.priority,
    )


def taken_reason(route: RouteMsg) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    return f"{route.prefix} is already routed{via} by another owner (protocol {route.proto})"


def local_fixed_routes(
    local: Mapping[IPAddress, str],
) -> tuple[dict[str, RouteMsg], frozenset[str]]:
    """The /32 of each fixed IP this node hosts, to its host veth (scope link); a host veth not
    there (yet, or any more) makes its prefix one to keep as it is, not one to delete."""
    desired: dict[str, RouteMsg] = {}
    keep: set[str] = set()
    for ip, host_veth in local.items():
        index = host_veth_index(host_veth) if host_veth else None
        route = RouteMsg(str(ip), ip.max_prefixlen, oif=index or 0, proto=MOOR_RTPROTO,
                         scope=RT_SCOPE_LINK)  # fmt: skip
        if index is None:
            keep.add(route.prefix)
        else:
            desired[route.prefix] = route
    return desired, frozenset(keep)


def add_missing(missing: Sequence[RouteMsg], local: Mapping[str, RouteMsg]) -> None:
    """Add `missing`, in order. A host veth in `local` that vanished since `local_fixed_routes`
    looked (its pod's DEL) took its /32 along: that route is skipped, not a failed run that
    would hold every route after it back until the retry."""
    for route in missing:
        try:
            routes.replace_route(route)
        except LinkNotFound:
            if route.prefix not in local:
                raise


def remote_fixed_route(ip: IPAddress, via: RouteMsg) -> RouteMsg:
    """A remote fixed IP's /32 takes the next hop of its node's subnet route."""
    return RouteMsg(str(ip), ip.max_prefixlen, via.gateway, via.oif, MOOR_RTPROTO,
                    onlink=via.onlink)  # fmt: skip


def plan_with_fixed(
    subnet_routes: Mapping[str, RouteMsg], fixed: FixedPlan
) -> tuple[RoutePlan, dict[str, RouteMsg]]:
    """The plan for the subnet routes plus every fixed IP's /32: a remote one follows the next
    hop of its node's subnet route (none when that node is not routed), a local one goes to its
    host veth. Returns the plan and the local /32s (`add_missing` tolerates their veth going)."""
    desired = dict(subnet_routes)
    for ip, remote in fixed.remote.items():
        via = subnet_routes.get(str(remote.subnet))
        if via is not None:
            route = remote_fixed_route(ip, via)
            desired[route.prefix] = route
    local, keep = local_fixed_routes(fixed.local)
    desired.update(local)
    return plan_routes(desired, routes.main_table(), keep), local
