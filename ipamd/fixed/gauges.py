"""The scrape-time gauge of fixed pod IPs, `moor_fixed_ips{state}`, registered by ipamd/metrics.py.

Cluster-wide: every daemon reads the same bindings from the store, so every daemon reports the same
numbers (aggregate with max, not sum). A scrape that cannot reach the store leaves the family out,
like `moor_node_subnets`; the store error is counted by `moor_store_errors_total`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ipamd.fixed.model import FixedBinding
from ipamd.store.base import StoreError

log = logging.getLogger(__name__)
FIXED_STATES = ("held", "reserved", "retained")


class FixedCollector:
    """moor_fixed_ips, cluster-wide, from the store at scrape time; left out when unreachable."""

    def __init__(self) -> None:
        self.bindings: Callable[[], Iterable[FixedBinding]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        if self.bindings is None:
            return []
        counts = dict.fromkeys(FIXED_STATES, 0)
        try:
            for b in self.bindings():
                counts[b.state] = counts.get(b.state, 0) + 1
        except StoreError as exc:  # counted by CountingStore
            log.warning("metrics: cannot list fixed IPs: %s", exc)
            return []
        family = self._family()
        for state, n in counts.items():
            family.add_metric([state], n)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "moor_fixed_ips",
            "Fixed pod IPs of the cluster by state: held (a pod has it), reserved (a reservation "
            "nobody holds now), retained (a sticky pod's, kept after its last DEL).",
            labels=["state"],
        )
