"""The route reconcile loop: desired state from the lease snapshot, applied by the backend.

Level-triggered: every run computes the whole desired state from the latest snapshot and lets the
backend make the kernel match it, so a missed event, a restart or a hand-made change all converge
the same way. It runs:
  * once at start, before the daemon reports ready (`reconcile_now` from the daemon's start);
  * after every lease change and every fixed-IP binding change the watchers report
    (`leases_changed`, `fixed_changed`);
  * when the kernel reports that one of our objects was deleted (netlink monitor -> `wake`);
  * every `interval` seconds (default 10 s, flannel host-gw's repair period).
Wake-ups that arrive while a run is going coalesce into one more run.

Locks: `_lock` guards `_leases`, `_states` and `_logged`, and is never held across kernel work.
`_run_lock` serialises runs (the start-up run on the main thread, then the loop thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from ipamd.fixed.model import FixedBinding
from ipamd.model import IPAddress, IPNetwork, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.routing.backend import RoutingBackend
from ipamd.routing.peers import PENDING, ROUTED, RouteState, fixed_plan, remote_subnets

log = logging.getLogger(__name__)
RETRY = 1.0  # after a failed run, the next one comes this soon


class RouteReconciler:
    def __init__(
        self,
        backend: RoutingBackend,
        node: str,
        config: Callable[[], NetworkConfig],
        public_ip: str,
        *,
        interval: float = 10.0,
        local_fixed: Callable[[], dict[IPAddress, str]] = dict,
        on_run: Callable[[float, bool], None] = lambda seconds, ok: None,
    ) -> None:
        self.backend = backend
        self.node = node
        self.config = config
        self.public_ip = public_ip
        self.interval = interval
        self.local_fixed = local_fixed  # the fixed IPs this node hosts: IP -> host veth
        self.on_run = on_run  # metrics: duration, success
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._wake = threading.Event()
        self._leases: dict[IPNetwork, SubnetLease] = {}
        self._fixed: list[FixedBinding] = []
        self._states: dict[IPNetwork, RouteState] = {}
        self._logged: dict[IPNetwork, RouteState] = {}

    # ---- inputs -----------------------------------------------------------------------------
    def leases_changed(self, snapshot: Mapping[IPNetwork, SubnetLease], revision: int = 0) -> None:
        with self._lock:
            self._leases = dict(snapshot)
        self._wake.set()

    def fixed_changed(self, snapshot: Mapping[IPAddress, FixedBinding], revision: int = 0) -> None:
        with self._lock:
            self._fixed = list(snapshot.values())
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ---- output -----------------------------------------------------------------------------
    def states(self) -> dict[IPNetwork, RouteState]:
        """This node's view of every lease it knows: local, routed, unreachable, refused, pending."""
        with self._lock:
            pending = {s: RouteState(PENDING) for s in self._leases if s not in self._states}
            return {**pending, **self._states}

    # ---- the work ---------------------------------------------------------------------------
    def reconcile_now(self) -> None:
        """One complete run; raises what the backend raised (the loop logs and retries)."""
        with self._run_lock:
            self._wake.clear()
            with self._lock:
                leases, bindings = list(self._leases.values()), list(self._fixed)
            started = time.perf_counter()
            ok = False
            try:
                remotes, states = remote_subnets(leases, self.node, self.config(), self.public_ip)
                fixed = fixed_plan(bindings, self.node, remotes, self.local_fixed())
                states.update(self.backend.reconcile(remotes, fixed))
                ok = True
            finally:
                self.on_run(time.perf_counter() - started, ok)
            with self._lock:
                self._states = states
            self._log_changes(states)

    def run(self, stop: threading.Event) -> None:
        """The loop thread: runs on every wake-up and every interval, until `stop`."""
        delay = self.interval
        while not stop.is_set():
            self._wake.wait(delay)
            if stop.is_set():
                return
            try:
                self.reconcile_now()
                delay = self.interval
            except Exception:
                log.exception("route reconcile failed; retrying in %.0f s", RETRY)
                delay = RETRY

    def _log_changes(self, states: dict[IPNetwork, RouteState]) -> None:
        """One line per change of a subnet's state, not one per run."""
        with self._lock:
            before, self._logged = self._logged, dict(states)
        for subnet, state in states.items():
            if before.get(subnet) == state:
                continue
            if state.state == ROUTED:
                log.info("route to %s: routed (%s)", subnet, self.backend.name)
            elif state.reason:
                log.warning("route to %s: %s: %s", subnet, state.state, state.reason)
        for subnet in before.keys() - states.keys():
            log.info("route to %s: removed (its lease is gone)", subnet)
