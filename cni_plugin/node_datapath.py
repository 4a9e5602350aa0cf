"""What every pod of a node shares on the host, kept by the daemon: the bridges with their
gateway addresses, and the masquerade rules.

The ADD hot path reads them from a cache (a netlink request and two iptables execs saved per ADD);
`maintain()`, called by the daemon's timer, re-verifies the cache, so a bridge, an address or a nat
chain deleted by someone else is repaired within seconds, not at the next daemon restart.
`_lock` guards the three cached pieces; no call to the kernel is made while holding it.
`_masq_lock` serialises the masquerade rules' read-and-rewrite (a cold-cache ADD, `maintain`): each
rewrite is atomic, but two ADDs that both read "no jump" would each append one (two pods started
at once on a fresh node did). It is held across the iptables execs, and only those contend for it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from cni_plugin.datapath import bridge as br
from cni_plugin.datapath.masq import MasqueradeRules
from cni_plugin.iptypes import IPAddress, IPInterface, IPNetwork
from cni_plugin.netconf import NetConf

log = logging.getLogger(__name__)
BridgeKey = tuple[str, int, bool]  # name, mtu, promiscuous


class NodeDatapath:
    def __init__(self, masq: MasqueradeRules) -> None:
        self.masq = masq
        self._lock = threading.Lock()
        self._masq_lock = threading.Lock()
        self._bridges: dict[BridgeKey, br.LinkInfo] = {}
        self._gateways_done: set[tuple[str, int, str]] = set()  # bridge, its ifindex, gateway
        self._masq_for: IPNetwork | None = None  # the network whose rules are installed

    def ensure_bridge(
        self,
        conf: NetConf,
        gateway: tuple[IPAddress, IPInterface] | None,
        *,
        fresh: bool = False,
    ) -> br.LinkInfo:
        """The bridge of `conf` (and, with `isGateway`, the allocation's gateway on it, given as
        (gateway, the pod's interface)). `fresh` skips the cache: the cached bridge is gone."""
        key = (conf.bridge, conf.mtu, conf.promisc_mode)
        with self._lock:
            bridge = None if fresh else self._bridges.get(key)
        if bridge is None:
            bridge = br.ensure_bridge(conf.bridge, mtu=conf.mtu, promisc=conf.promisc_mode)
            with self._lock:
                self._bridges[key] = bridge
        if gateway is not None and conf.is_gateway:
            address, pod = gateway
            gw = ipaddress.ip_interface(f"{address}/{pod.network.prefixlen}")
            done = (conf.bridge, bridge.index, str(gw))
            with self._lock:
                known = done in self._gateways_done
            if fresh or not known:
                br.ensure_bridge_address(conf.bridge, gw)
                br.enable_ip_forward()
                with self._lock:
                    self._gateways_done.add(done)
        return bridge

    def ensure_masquerade(self, network: IPNetwork) -> None:
        with self._lock:
            if self._masq_for == network:
                return
        with self._masq_lock:  # a second caller reads the rules the first wrote
            self.masq.ensure([network])
        with self._lock:
            self._masq_for = network

    def maintain(self) -> None:
        """Re-verify every cached bridge, its gateways and the masquerade rules; repair them."""
        with self._lock:
            bridges = dict(self._bridges)
            gateways = set(self._gateways_done)
            masq_for = self._masq_for
        for (name, mtu, promisc), cached in bridges.items():
            info = br.ensure_bridge(name, mtu=mtu, promisc=promisc)
            if info != cached:
                log.warning(
                    "bridge %s was recreated outside moor (ifindex %d -> %d)",
                    name,
                    cached.index,
                    info.index,
                )
                with self._lock:
                    self._bridges[(name, mtu, promisc)] = info
            for bridge_name, index, gw in gateways:
                if bridge_name == name:
                    br.ensure_bridge_address(name, ipaddress.ip_interface(gw))
                    if index != info.index:
                        with self._lock:
                            self._gateways_done.discard((bridge_name, index, gw))
                            self._gateways_done.add((bridge_name, info.index, gw))
        if masq_for is not None:
            with self._masq_lock:
                if not self.masq.is_installed([masq_for]):
                    log.warning("masquerade rules were changed outside moor; restoring them")
                    self.masq.ensure([masq_for])
