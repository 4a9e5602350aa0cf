"""moor-ipamd's Prometheus metrics, on a private registry served over HTTP (`--metrics-addr`).

Counters and histograms are updated where things happen (allocation in NodeIpam, CNI requests in
Daemon.handle, store errors in `ipamd.store.counting.CountingStore`); the address, subnet and
fixed-IP gauges are computed at scrape time from the allocator and the store, and the DEL spool
and release journal gauges from the node's disk, so they are never stale. The registry is private, so several daemons (or tests) in one process never share a series.

Only the daemon imports this module: bin/moor, the CNI shim, stays stdlib-only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from ipamd.config import split_host_port
from ipamd.errors import NetworkExhausted, NoLease
from ipamd.fixed.gauges import FixedCollector
from ipamd.metrics_gauges import BacklogCollector, ConflictCollector, IpamCollector
from ipamd.store.base import (
    Store,
    StoreError,
)
from ipamd.store.counting import STORE_OPS, CountingStore

if TYPE_CHECKING:
    from cni_plugin.skel import Reply
    from ipamd.fixed.model import FixedBinding
    from ipamd.node import NodeIpam

log = logging.getLogger(__name__)

# 0.1 ms .. 5 s: an allocation is one store transaction; an ADD adds a few netlink round trips.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
CNI_VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
FAILURE_REASONS = ("exhausted", "unavailable", "other")
CONFLICT_KINDS = ("subnet", "ip", "config")
WATCH_KEYS = ("ip", "subnet", "other")
WATCH_RESTARTS = ("error", "rescope")


class MetricsServerError(Exception):
    """The metrics endpoint could not be served (address in use, unknown host)."""


class Metrics:
    """Every metric of one daemon, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Registered first, so a store error they hit shows in the same scrape's error counter.
        self._ipam_collector = IpamCollector()
        self.registry.register(self._ipam_collector)
        self._fixed_collector = FixedCollector()
        self.registry.register(self._fixed_collector)
        self._conflict_collector = ConflictCollector()
        self.registry.register(self._conflict_collector)
        self._backlog_collector = BacklogCollector()
        self.registry.register(self._backlog_collector)
        self.allocation_seconds = Histogram(
            "moor_allocation_duration_seconds",
            "Time to allocate one pod IP (store transaction included), failures included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.allocation_failures = Counter(
            "moor_allocation_failures",
            "Failed IP allocations by reason: exhausted (no free IP in the cluster network), "
            "unavailable (store unreachable or no subnet lease), other.",
            ["reason"],
            registry=self.registry,
        )
        self.cni_seconds = Histogram(
            "moor_cni_request_duration_seconds",
            "Time the daemon spent on one CNI request, by verb.",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cni_requests = Counter(
            "moor_cni_requests",
            "CNI requests by verb and CNI result code (0 is success).",
            ["verb", "code"],
            registry=self.registry,
        )
        self.store_recoveries = Counter(
            "moor_store_recoveries",
            "Times this node found the store had lost or rolled back data it knows to be live, "
            "and re-asserted it (network config, subnet leases, live pods' allocations).",
            registry=self.registry,
        )
        self.store_conflicts = Counter(
            "moor_store_conflicts",
            "What this node could not re-assert because the store gives it to someone else: "
            "subnet (another node leased it), ip (another pod's record), config (another "
            "network config).",
            ["kind"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "moor_store_errors",
            "Errors raised by the IPAM store (etcd or SQLite), by store operation.",
            ["op"],
            registry=self.registry,
        )
        self.store_watch_events = Counter(
            "moor_store_watch_events",
            "Store changes this node's watch brought, by key: ip (pod IP records in the key "
            "ranges of its own subnets), subnet (subnet leases), other.",
            ["key"],
            registry=self.registry,
        )
        self.store_watch_restarts = Counter(
            "moor_store_watch_restarts",
            "Times this node re-synced from the store and watched again: error (the watch "
            "broke) or rescope (the node holds a subnet its watch was not set up for).",
            ["reason"],
            registry=self.registry,
        )
        self.route_reconciles = Counter(
            "moor_route_reconciles",
            "Runs of the route reconcile (routes, neighbours, FDB entries to other nodes), by "
            "result: ok or failed (retried within a second).",
            ["result"],
            registry=self.registry,
        )
        self.route_reconcile_seconds = Histogram(
            "moor_route_reconcile_seconds",
            "Wall time of one route reconcile run.",
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0),
            registry=self.registry,
        )
        self.fixed_moves = Counter(
            "moor_fixed_ip_moves",
            "Fixed IPs taken over by a newer generation of their pod (a move to another node, "
            "a recreated pod or a new sandbox), counted by the node that took it.",
            registry=self.registry,
        )
        self.fixed_move_seconds = Histogram(
            "moor_fixed_ip_move_seconds",
            "How long a fixed IP's move took to reach the node it left: from the new holder's "
            "claim (the new node's clock) to this node routing the IP away from its old pod.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        for result in ("ok", "failed"):
            self.route_reconciles.labels(result)
        for reason in FAILURE_REASONS:
            self.allocation_failures.labels(reason)
        for key in WATCH_KEYS:
            self.store_watch_events.labels(key)
        for reason in WATCH_RESTARTS:
            self.store_watch_restarts.labels(reason)
        for kind in CONFLICT_KINDS:
            self.store_conflicts.labels(kind)
        for verb in CNI_VERBS:
            self.cni_seconds.labels(verb)
        for op in STORE_OPS:
            self.store_errors.labels(op)
        self._server: WSGIServer | None = None

    # ---- wiring ----------------------------------------------------------------------------
    def track(self, ipam: NodeIpam) -> None:
        """Report this node's address and subnet gauges from `ipam` at every scrape."""
        self._ipam_collector.ipam = ipam
        self._conflict_collector.ipam = ipam
        self._backlog_collector.ipam = ipam  # its release journal

    def track_spool(self, spool_dir: str) -> None:
        """Report `moor_del_spool_entries` from `spool_dir` (listed at every scrape)."""
        self._backlog_collector.spool_dir = spool_dir

    def track_fixed(self, bindings: Callable[[], Iterable[FixedBinding]]) -> None:
        """Report `moor_fixed_ips` from `bindings` (the store's, read at every scrape)."""
        self._fixed_collector.bindings = bindings

    def count_store_errors(self, store: Store) -> CountingStore:
        return CountingStore(store, lambda op: self.store_errors.labels(op).inc())

    def serve(self, addr: str) -> None:
        """Serve /metrics on `addr` (HOST:PORT) from a daemon thread."""
        host, port = split_host_port(addr, "--metrics-addr")
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise MetricsServerError(
                f"cannot serve metrics on {addr}: {exc.strerror or exc}"
            ) from exc
        log.info("metrics on http://%s/metrics", addr)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # ---- observations ----------------------------------------------------------------------
    @contextmanager
    def time_allocation(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except NetworkExhausted:
            self.allocation_failures.labels("exhausted").inc()
            raise
        except (StoreError, NoLease):
            self.allocation_failures.labels("unavailable").inc()
            raise
        except Exception:
            self.allocation_failures.labels("other").inc()
            raise
        finally:
            self.allocation_seconds.observe(time.perf_counter() - started)

    def count_recovery(self) -> None:
        self.store_recoveries.inc()

    def count_conflict(self, kind: str, _sentence: str = "") -> None:
        self.store_conflicts.labels(kind if kind in CONFLICT_KINDS else "other").inc()

    def observe_reconcile(self, seconds: float, ok: bool) -> None:
        self.route_reconciles.labels("ok" if ok else "failed").inc()
        self.route_reconcile_seconds.observe(seconds)

    def count_watch_event(self, key: str) -> None:
        self.store_watch_events.labels(key if key in WATCH_KEYS else "other").inc()

    def count_watch_restart(self, reason: str) -> None:
        self.store_watch_restarts.labels(reason if reason in WATCH_RESTARTS else "error").inc()

    def count_fixed_move(self) -> None:
        self.fixed_moves.inc()

    def observe_fixed_move(self, seconds: float) -> None:
        self.fixed_move_seconds.observe(seconds)

    def observe_cni(self, command: str, reply: Reply, seconds: float) -> None:
        verb = command if command in CNI_VERBS else "other"
        self.cni_seconds.labels(verb).observe(seconds)
        self.cni_requests.labels(verb, cni_code(reply.code, reply.stdout)).inc()


def cni_code(exit_code: int, stdout: bytes) -> str:
    """The CNI result code of a reply: 0, else the `code` of its error JSON."""
    if exit_code == 0:
        return "0"
    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        code = None
    return str(code) if isinstance(code, int) else "unknown"
