"""Node subnet leases, in flannel's model with its known holes fixed.

A node claims subnets of the cluster network with create-if-absent: first the ones it already
holds (keyed by node name, never by a public IP that may change), then the one it held last
(remembered in a local state file), then a free one. All of a node's subnet keys hang on one store
lease with a TTL that a background thread renews well before expiry. A node whose subnets are full
takes one more, as Calico nodes take more blocks, so a full node subnet is never an outage.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from ipamd.errors import ConfigMismatch, NetworkExhausted
from ipamd.model import IPNetwork, NetworkConfig, SubnetLease
from ipamd.store.base import LeaseNotFound, Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
CLAIM_RETRIES = 8


class SubnetLeaseManager:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        node: str,
        config: NetworkConfig,
        *,
        ttl: float = 24 * 3600,
        state_file: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.config = config
        self.ttl = ttl
        self.state_file = state_file
        self.clock = clock
        self._lease_id = 0
        self._subnets: list[IPNetwork] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- network config -------------------------------------------------------------------
    def ensure_network_config(self) -> None:
        """Write the cluster network config if absent; refuse to run against a different one."""
        key = self.keys.config()
        if self.store.create(key, self.config.to_json()):
            return
        current = self.store.get(key)
        if current is None:
            raise ConfigMismatch("network config vanished while it was being written; retry")
        stored = NetworkConfig.from_json(current.value)
        if stored != self.config:
            raise ConfigMismatch(
                f"the store holds network {stored.network} /{stored.subnet_len} but this daemon "
                f"was started with {self.config.network} /{self.config.subnet_len}"
            )

    # ---- acquisition ----------------------------------------------------------------------
    @property
    def subnets(self) -> list[IPNetwork]:
        with self._lock:
            return list(self._subnets)

    def has_lease(self) -> bool:
        with self._lock:
            return bool(self._subnets)

    def acquire(self) -> list[IPNetwork]:
        """At start: keep every subnet this node already holds, else claim one (previous first)."""
        items, _ = self.store.list_prefix(self.keys.subnets_prefix())
        own: list[IPNetwork] = []
        for kv in items:
            subnet = self.keys.parse_subnet(kv.key)
            if subnet is None:
                continue
            if SubnetLease.from_json(subnet, kv.value).node == self.node:
                own.append(subnet)
                self._lease_id = self._lease_id or kv.lease
        if own:
            self._ensure_store_lease()
            with self._lock:
                self._subnets = sorted(own, key=lambda n: int(n.network_address))
            self._remember()
            return self.subnets
        self.acquire_additional()
        return self.subnets

    def acquire_additional(self) -> IPNetwork:
        """Claim one more free subnet; NetworkExhausted when the cluster network is full."""
        self._ensure_store_lease()
        for _ in range(CLAIM_RETRIES):
            taken = {
                self.keys.parse_subnet(kv.key)
                for kv in self.store.list_prefix(self.keys.subnets_prefix())[0]
            }
            for subnet in self._candidates(taken):
                lease = SubnetLease(subnet, self.node, self.clock())
                if self.store.create(
                    self.keys.subnet(subnet), lease.to_json(), lease=self._lease_id
                ):
                    with self._lock:
                        self._subnets.append(subnet)
                    self._remember()
                    log.info("node %s leased subnet %s", self.node, subnet)
                    return subnet
                break  # lost a race: re-list and try again
            else:
                raise NetworkExhausted(
                    f"no free /{self.config.subnet_len} subnet left in {self.config.network}"
                )
        raise NetworkExhausted(
            f"could not claim a subnet after {CLAIM_RETRIES} conflicting attempts"
        )

    def _candidates(self, taken: set[IPNetwork | None]) -> Iterator[IPNetwork]:
        previous = self._previous()
        if previous is not None and previous not in taken:
            yield previous
        for subnet in self.config.network.subnets(new_prefix=self.config.subnet_len):
            if subnet not in taken and subnet != previous:
                yield subnet

    def _ensure_store_lease(self) -> None:
        if self._lease_id:
            try:
                self.store.refresh_lease(self._lease_id)
                return
            except LeaseNotFound:
                log.warning("store lease %x expired; granting a new one", self._lease_id)
        self._lease_id = self.store.grant_lease(self.ttl)

    # ---- state file: the subnet held last, for a node whose lease expired -----------------
    def _previous(self) -> IPNetwork | None:
        if not self.state_file:
            return None
        try:
            with open(self.state_file) as f:
                subnet = ipaddress.ip_network(json.load(f)["subnets"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        return subnet if subnet.subnet_of(self.config.network) else None  # type: ignore[arg-type]

    def _remember(self) -> None:
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        os.makedirs(os.path.dirname(self.state_file) or ".", mode=0o700, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"node": self.node, "subnets": [str(s) for s in self.subnets]}, f)
        os.replace(tmp, self.state_file)

    # ---- renewal ----------------------------------------------------------------------------
    def renew_once(self) -> bool:
        """Refresh the store lease; on loss, re-claim this node's subnets. False if none is held."""
        try:
            self.store.refresh_lease(self._lease_id)
            return True
        except LeaseNotFound:
            log.error("subnet lease of node %s expired; re-acquiring", self.node)
        except StoreError as exc:
            log.warning("lease renewal failed: %s", exc)
            return self.has_lease()
        with self._lock:
            lost = list(self._subnets)
            self._subnets = []
        self._lease_id = self.store.grant_lease(self.ttl)
        for subnet in lost:
            lease = SubnetLease(subnet, self.node, self.clock())
            if self.store.create(self.keys.subnet(subnet), lease.to_json(), lease=self._lease_id):
                with self._lock:
                    self._subnets.append(subnet)
            else:
                log.error("subnet %s was taken by another node while our lease was lost", subnet)
        return self.has_lease()

    def start_renewal(self) -> None:
        def loop() -> None:
            while not self._stop.wait(max(1.0, self.ttl / 3)):
                self.renew_once()

        self._renewer = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._renewer.start()

    def stop(self) -> None:
        self._stop.set()
