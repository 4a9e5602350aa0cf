"""The gauges moor-ipamd computes at scrape time, so they are never stale: the node's addresses
and the cluster's subnets (`IpamCollector`), and the cluster's address conflicts. Registered on
the daemon's private registry by `metrics.py`; a store that does not answer leaves its families
out of that scrape (the store errors are counted where they happen).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig
from ipamd.store.base import StoreError

if TYPE_CHECKING:
    from ipamd.node import NodeIpam

log = logging.getLogger(__name__)


# ---- scrape-time gauges -------------------------------------------------------------------
class IpamCollector:
    """moor_addresses, moor_node_subnets and moor_node_subnets_held, read at scrape time."""

    def __init__(self) -> None:
        self.ipam: NodeIpam | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        ipam = self.ipam
        if ipam is None:
            return []
        addresses, subnets, held = self._families()
        for pool in ipam.pools():
            subnet = str(pool.subnet)
            addresses.add_metric([subnet, "allocated"], pool.used)
            addresses.add_metric([subnet, "free"], pool.free)
            addresses.add_metric([subnet, "cooling"], pool.cooling)
            addresses.add_metric([subnet, "conflict"], pool.conflicts)
            addresses.add_metric([subnet, "reserved"], pool.subnet.num_addresses - pool.total)
        held.add_metric([], len(ipam.leases.subnets))
        families = [addresses, held]
        try:
            items, _ = ipam.store.list_prefix(ipam.leases.keys.subnets_prefix())
        except StoreError as exc:  # counted by CountingStore; the rest of the scrape still works
            log.warning("metrics: cannot list node subnets: %s", exc)
            return families
        config = ipam.leases.config
        parsed = (ipam.leases.keys.parse_subnet(kv.key) for kv in items)
        leased = [s for s in parsed if s is not None and _in_network(config, s)]
        # A lease outside the leaseable range (the range shrank since) is leased, but not off `free`.
        in_range = sum(1 for s in leased if config.leaseable(s))
        subnets.add_metric(["leased"], len(leased))
        subnets.add_metric(["free"], max(0, config.leaseable_count() - in_range))
        return [*families, subnets]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "moor_addresses",
                "Pod addresses of this node's subnets by state: allocated, free, cooling "
                "(released, waiting out the cooldown), reserved (network, gateway, broadcast), "
                "conflict (another host answered the ARP probe for it).",
                labels=["subnet", "state"],
            ),
            GaugeMetricFamily(
                "moor_node_subnets",
                "Node subnets of the cluster network: leased (by any node) and free.",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "moor_node_subnets_held", "Node subnets this node holds a lease on.", labels=[]
            ),
        )


class ConflictCollector:
    """moor_ip_conflicts at scrape time: the cluster's address conflict records (one range read
    of `<prefix>/conflicts/`, empty but for conflicts; fixed IPs' included). Every node reports
    the same count, as for moor_node_subnets."""

    def __init__(self) -> None:
        self.ipam: NodeIpam | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        ipam = self.ipam
        if ipam is None:
            return []
        keys = ipam.leases.keys
        try:
            items, _ = ipam.store.list_prefix(keys.conflicts_prefix())
        except StoreError as exc:  # counted by CountingStore; the rest of the scrape still works
            log.warning("metrics: cannot list address conflicts: %s", exc)
            return []
        family = self._family()
        family.add_metric([], sum(1 for kv in items if keys.parse_conflict(kv.key) is not None))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "moor_ip_conflicts",
            "IPs of the cluster another host answered the ARP probe for (netconf arpProbe): "
            "never handed out until `moorctl conflicts clear`.",
            labels=[],
        )


def _in_network(config: NetworkConfig, subnet: IPNetwork) -> bool:
    return (
        subnet.version == config.network.version
        and subnet.prefixlen == config.subnet_len
        and subnet.subnet_of(config.network)  # type: ignore[arg-type]
    )
