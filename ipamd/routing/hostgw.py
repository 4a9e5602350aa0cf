"""host-gw: a plain route `<peer subnet> via <peer public IP>` per remote subnet.

It needs the peers on a directly connected network (one L2 segment): the peer's public IP must be
a next hop the kernel can use. Whether it is is decided on every reconcile from the kernel's own
lookup (`ip route get`), not once when the lease arrives (flannel's DirectRouting is frozen at
event time), so a peer that moves behind a router loses its route, and gets it back when it
returns. No encapsulation: pods get the underlay's MTU.
"""

from __future__ import annotations

from collections.abc import Sequence

from cni_plugin.datapath import routes
from cni_plugin.datapath.monitor import Deleted
from cni_plugin.datapath.routes import MOOR_RTPROTO, Underlay
from cni_plugin.datapath.rtnl_codec import RouteMsg
from ipamd.model import IPNetwork
from ipamd.routing.backend import add_missing, plan_with_fixed, taken_reason
from ipamd.routing.peers import REFUSED, ROUTED, UNREACHABLE, FixedPlan, RemoteSubnet, RouteState


class HostGw:
    name = "host-gw"

    def __init__(self, underlay: Underlay) -> None:
        self.underlay = underlay

    @property
    def pod_mtu(self) -> int:
        return self.underlay.mtu

    def reconcile(
        self, remotes: Sequence[RemoteSubnet], fixed: FixedPlan
    ) -> dict[IPNetwork, RouteState]:
        states: dict[IPNetwork, RouteState] = {}
        desired: dict[str, RouteMsg] = {}
        for remote in remotes:
            path = routes.path_to(remote.public_ip)
            if path is None or not path.direct:
                how = (
                    "no route"
                    if path is None
                    else f"reached via {path.gateway or 'a non-unicast route'}"
                )
                states[remote.subnet] = RouteState(
                    UNREACHABLE,
                    f"node {remote.node}'s public IP {remote.public_ip} is not on a directly "
                    f"connected network ({how}); host-gw needs one L2 segment: use vxlan",
                )
                continue
            route = RouteMsg(
                str(remote.subnet.network_address),
                remote.subnet.prefixlen,
                gateway=remote.public_ip,
                oif=path.oif,
                proto=MOOR_RTPROTO,
            )
            desired[route.prefix] = route
            states[remote.subnet] = RouteState(ROUTED)
        plan, local = plan_with_fixed(desired, fixed)
        for route in plan.stale:
            routes.delete_route(route)
        add_missing(plan.missing, local)
        for remote in remotes:
            taken = plan.taken.get(str(remote.subnet))
            if taken is not None:
                states[remote.subnet] = RouteState(REFUSED, taken_reason(taken))
        return states

    def wants(self, deleted: Deleted) -> bool:
        return deleted.kind == "route" and deleted.proto == MOOR_RTPROTO
