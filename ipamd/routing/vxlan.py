"""vxlan: one device `moor.<VNI>`, and per remote subnet a permanent neighbour (peer `.0` -> its
VTEP MAC), an FDB entry (MAC -> peer public IP) and the route `<subnet> via <peer .0> onlink`.

Order (flannel's, for the kernel's sake): stale routes go first (nothing uses a next hop whose
entries are about to vanish), then stale FDB entries and neighbours (an old MAC of a rebooted
peer, a peer that left); then neighbours, FDB entries, and routes last, so the kernel never ARPs
for a gateway it has no entry for. The device is checked on every reconcile: one that vanished or
changed is made again, and since its entries and routes died with it, all are written again.
Works across L3: the tunnel is plain UDP between public IPs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from cni_plugin.datapath import routes, vxlan
from cni_plugin.datapath.monitor import Deleted
from cni_plugin.datapath.routes import MOOR_RTPROTO, Underlay
from cni_plugin.datapath.rtnl_codec import AF_BRIDGE, RouteMsg
from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig
from ipamd.routing.backend import add_missing, plan_with_fixed, taken_reason
from ipamd.routing.peers import REFUSED, ROUTED, FixedPlan, RemoteSubnet, RouteState


class Vxlan:
    name = "vxlan"

    def __init__(
        self,
        underlay: Underlay,
        config: NetworkConfig,
        node: str,
        own_subnets: Callable[[], list[IPNetwork]],
    ) -> None:
        self.underlay = underlay
        self.config = config
        self.node = node
        self.own_subnets = own_subnets
        self.device = vxlan.device_name(config.vni)
        self.ifindex = 0  # of the device as last made; read by the netlink monitor's filter

    @property
    def pod_mtu(self) -> int:
        return self.underlay.mtu - vxlan.ENCAP_OVERHEAD

    def spec(self) -> vxlan.VxlanSpec:
        own = self.own_subnets()
        if not own:
            raise RuntimeError(
                f"node {self.node} holds no subnet yet: {self.device} has no address"
            )
        return vxlan.VxlanSpec(
            name=self.device,
            vni=self.config.vni,
            port=self.config.vxlan_port,
            local=self.underlay.address,
            underlay_index=self.underlay.index,
            mac=self.config.vtep_mac(self.node),
            mtu=self.pod_mtu,
            address=str(own[0].network_address),
        )

    def reconcile(
        self, remotes: Sequence[RemoteSubnet], fixed: FixedPlan
    ) -> dict[IPNetwork, RouteState]:
        index, _made = vxlan.ensure_device(self.spec())
        self.ifindex = index
        desired_routes = {
            str(r.subnet): RouteMsg(
                str(r.subnet.network_address),
                r.subnet.prefixlen,
                gateway=str(r.subnet.network_address),
                oif=index,
                onlink=True,
                proto=MOOR_RTPROTO,
            )
            for r in remotes
        }
        neighbours = {
            (str(r.subnet.network_address), r.vtep_mac): vxlan.neighbour(
                index, str(r.subnet.network_address), r.vtep_mac
            )
            for r in remotes
        }
        fdb = {
            (r.vtep_mac, r.public_ip): vxlan.fdb_entry(index, r.vtep_mac, r.public_ip)
            for r in remotes
        }
        plan, local = plan_with_fixed(desired_routes, fixed)
        for route in plan.stale:
            routes.delete_route(route)
        have_fdb = vxlan.entries(AF_BRIDGE, index)
        have_neigh = vxlan.entries(socket.AF_INET, index)
        for entry in have_fdb:
            if (entry.lladdr, entry.dst) not in fdb:
                vxlan.delete_entry(entry)
        for entry in have_neigh:
            if (entry.dst, entry.lladdr) not in neighbours:
                vxlan.delete_entry(entry)
        present_neigh = {(e.dst, e.lladdr) for e in have_neigh}
        present_fdb = {(e.lladdr, e.dst) for e in have_fdb}
        for key, entry in neighbours.items():
            if key not in present_neigh:
                vxlan.replace_entry(entry)
        for key, entry in fdb.items():
            if key not in present_fdb:
                vxlan.replace_entry(entry)
        add_missing(plan.missing, local)
        states: dict[IPNetwork, RouteState] = {}
        for r in remotes:
            taken = plan.taken.get(str(r.subnet))
            states[r.subnet] = (
                RouteState(REFUSED, taken_reason(taken)) if taken else RouteState(ROUTED)
            )
        return states

    def wants(self, deleted: Deleted) -> bool:
        if deleted.kind == "route":
            return deleted.proto == MOOR_RTPROTO
        return deleted.kind in ("neigh", "link") and deleted.ifindex == self.ifindex
