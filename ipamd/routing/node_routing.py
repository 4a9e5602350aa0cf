"""This node's routes to the other nodes, composed: the backend the cluster's config names, the
reconcile loop fed by the lease watcher, and the netlink monitor that wakes it.

Routing needs to know where this node is: its public IP (`--public-ip`, or `--iface`). Without
one (a single node, the SQLite default) nothing is routed and nothing is touched; peers cannot
route to a node that publishes no address either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from cni_plugin.datapath.errors import DatapathError
from cni_plugin.datapath.monitor import DeletionMonitor
from cni_plugin.datapath.routes import underlay_for
from ipamd.fixed.model import FixedBinding
from ipamd.leases import SubnetLeaseManager
from ipamd.metrics import Metrics
from ipamd.model import IPAddress, IPNetwork
from ipamd.routing.backend import RoutingBackend
from ipamd.routing.hostgw import HostGw
from ipamd.routing.lease_watch import FixedWatcher, LeaseWatcher
from ipamd.routing.peers import RouteState
from ipamd.routing.reconciler import RouteReconciler
from ipamd.routing.vxlan import Vxlan

log = logging.getLogger(__name__)
START_ATTEMPTS = 3
MAX_UNDERLAY_MTU = 65535  # above it: loopback, not a wire


class NodeRouting:
    def __init__(self, backend: RoutingBackend, reconciler: RouteReconciler) -> None:
        self.backend = backend
        self.reconciler = reconciler
        self._monitor: DeletionMonitor | None = None

    @classmethod
    def build(
        cls,
        leases: SubnetLeaseManager,
        public_ip: str,
        *,
        interval: float,
        metrics: Metrics,
        local_fixed: Callable[[], dict[IPAddress, str]] = dict,
    ) -> NodeRouting | None:
        """The routing of this node, or None (logged) when it has no public IP."""
        if not public_ip:
            log.warning(
                "no --public-ip or --iface: node %s programs no routes to other nodes, and "
                "they route none to it (fine for a single node)",
                leases.node,
            )
            return None
        config = leases.config
        try:
            underlay = underlay_for(public_ip)
        except DatapathError as exc:
            log.error(
                "%s: node %s programs no routes to other nodes (give --iface, or a --public-ip "
                "that is one of this node's addresses)",
                exc,
                leases.node,
            )
            return None
        if underlay.mtu > MAX_UNDERLAY_MTU or underlay.name == "lo":
            log.error(
                "the public IP %s is on %s, not an interface toward other nodes: node %s "
                "programs no routes to other nodes",
                public_ip,
                underlay.name,
                leases.node,
            )
            return None
        backend: RoutingBackend
        if config.backend == "vxlan":
            backend = Vxlan(underlay, config, leases.node, lambda: leases.subnets)
        else:
            backend = HostGw(underlay)
        log.info(
            "node %s routes with %s over %s (%s, MTU %d; pods get MTU %d)",
            leases.node, backend.name, underlay.name, public_ip, underlay.mtu, backend.pod_mtu,
        )  # fmt: skip
        reconciler = RouteReconciler(
            backend,
            leases.node,
            lambda: leases.config,
            public_ip,
            interval=interval,
            local_fixed=local_fixed,
            on_run=metrics.observe_reconcile,
        )
        return cls(backend, reconciler)

    @property
    def pod_mtu(self) -> int:
        return self.backend.pod_mtu

    def states(self) -> dict[IPNetwork, RouteState]:
        return self.reconciler.states()

    def start(
        self,
        leases: LeaseWatcher,
        fixed: FixedWatcher,
        stop: threading.Event,
        spawn: Callable[[str, object], None],
    ) -> None:
        """Reconcile once now (the daemon reports ready after this), then keep reconciling on
        every change either watcher reports (called before the watchers' threads start)."""
        leases.on_change = self.reconciler.leases_changed
        before = fixed.on_change

        def fixed_changed(snapshot: Mapping[IPAddress, FixedBinding], revision: int) -> None:
            before(snapshot, revision)
            self.reconciler.fixed_changed(snapshot, revision)

        fixed.on_change = fixed_changed
        self.reconciler.leases_changed(leases.snapshot())
        self.reconciler.fixed_changed(fixed.snapshot())
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self.reconciler.reconcile_now()
                break
            except Exception:
                log.exception("route reconcile at start failed (attempt %d)", attempt)
        self._monitor = DeletionMonitor(self.backend.wants, self.reconciler.wake)
        self._monitor.start()
        spawn("route-reconcile", lambda: self.reconciler.run(stop))

    def stop(self) -> None:
        """The loop ends with the daemon's stop event; the routes stay (pods keep their network
        while the daemon restarts)."""
        if self._monitor is not None:
            self._monitor.stop()
