"""The gauges moor-ipamd computes at scrape time, so they are never stale: the node's addresses
and the cluster's subnets (`IpamCollector`), the cluster's address conflicts, and the DELs waiting
on the node's disk (`BacklogCollector`). Registered on the daemon's private registry by
`metrics.py`; a store that does not answer leaves its families out of that scrape (the store
errors are counted where they happen).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig
from ipamd.spool import FAILED
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


class BacklogCollector:
    """moor_del_spool_entries{state} and moor_release_journal_entries: DELs on the node's disk
    that have not reached the store yet, counted at scrape time.

    The spool holds DELs the shim wrote while it could not reach the daemon; the daemon replays
    them when it starts, so `pending` entries while it runs wait for its next start, and `failed`
    ones (moved to failed/ by a replay) wait for an operator. The release journal holds DELs
    made while the store was unreachable; the daemon applies them within seconds of its return.
    Either one staying above 0 is what an alert looks for."""

    def __init__(self) -> None:
        self.spool_dir: str | None = None
        self.ipam: NodeIpam | None = None  # its journal; None while the node awaits its network

    def describe(self) -> Iterable[Metric]:
        return [self._spool_family(), self._journal_family()]

    def collect(self) -> Iterable[Metric]:
        families = []
        if self.spool_dir is not None:
            try:
                pending = _entries(self.spool_dir, skip=(FAILED,))
                failed = _entries(os.path.join(self.spool_dir, FAILED))
            except OSError as exc:
                log.warning("metrics: cannot list the DEL spool %s: %s", self.spool_dir, exc)
            else:
                spool = self._spool_family()
                spool.add_metric(["pending"], pending)
                spool.add_metric(["failed"], failed)
                families.append(spool)
        ipam = self.ipam
        if ipam is not None:
            journal = self._journal_family()
            journal.add_metric([], len(ipam.journal) if ipam.journal is not None else 0)
            families.append(journal)
        return families

    @staticmethod
    def _spool_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "moor_del_spool_entries",
            "DELs the CNI shim spooled while the daemon was unreachable: pending (replayed at "
            "the daemon's next start) and failed (a replay failed: moved to failed/).",
            labels=["state"],
        )

    @staticmethod
    def _journal_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "moor_release_journal_entries",
            "Releases journaled while the store was unreachable, not yet applied to it.",
            labels=[],
        )


def _entries(path: str, skip: tuple[str, ...] = ()) -> int:
    """Spool entries in `path`: names not starting with '.' (the shim's temp files), nor `skip`;
    0 when the directory does not exist (nothing was ever spooled)."""
    try:
        with os.scandir(path) as it:
            return sum(1 for e in it if not e.name.startswith(".") and e.name not in skip)
    except FileNotFoundError:
        return 0


def _in_network(config: NetworkConfig, subnet: IPNetwork) -> bool:
    return (
        subnet.version == config.network.version
        and subnet.prefixlen == config.subnet_len
        and subnet.subnet_of(config.network)  # type: ignore[arg-type]
    )
