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
from ipamd.store.base import KeyValue, LeaseNotFound, Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
CLAIM_RETRIES = 8
RENEW_RETRY = 5.0  # seconds between renewal attempts while the store does not answer


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
        public_ip: str = "",
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.config = config
        self.public_ip = public_ip  # published in the lease for the routing of other nodes
        self.ttl = ttl
        self.state_file = state_file
        self.clock = clock
        self._lease_id = 0
        self._subnets: list[IPNetwork] = []
        self._lost: list[IPNetwork] = []  # held until the store lease expired; to re-claim
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- network config -------------------------------------------------------------------
    def ensure_network_config(self) -> None:
        """Write the cluster network config if absent; refuse to run against a different one.

        Flags only say network and subnet length; the rest of a stored config (subnet min/max,
        fixed ranges, backend, from `moorctl network init`) is adopted.
        """
        key = self.keys.config()
        if self.store.create(key, self.config.to_json()):
            return
        current = self.store.get(key)
        if current is None:
            raise ConfigMismatch("network config vanished while it was being written; retry")
        stored = NetworkConfig.from_json(current.value)
        if (stored.network, stored.subnet_len) != (self.config.network, self.config.subnet_len):
            raise ConfigMismatch(
                f"the store holds network {stored.network} /{stored.subnet_len} but this daemon "
                f"was started with {self.config.network} /{self.config.subnet_len}"
            )
        self.config = stored

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
                self._republish(subnet, kv)
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
        try:
            return self._claim_free()
        except NetworkExhausted:
            if not self.has_lease():  # a node that holds nothing must not leave a lease behind
                self._revoke_store_lease()
            raise

    def _revoke_store_lease(self) -> None:
        lease_id, self._lease_id = self._lease_id, 0
        try:
            self.store.revoke_lease(lease_id)
        except (LeaseNotFound, StoreError) as exc:
            log.debug("revoking unused store lease %x: %s", lease_id, exc)

    def _claim_free(self) -> IPNetwork:
        for _ in range(CLAIM_RETRIES):
            taken = {
                self.keys.parse_subnet(kv.key)
                for kv in self.store.list_prefix(self.keys.subnets_prefix())[0]
            }
            for subnet in self._candidates(taken):
                lease = self._lease_record(subnet)
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
        """Free leaseable subnets (inside subnet min/max, off fixed ranges), the previous first."""
        previous = self._previous()
        if previous is not None and previous not in taken and self.config.leaseable(previous):
            yield previous
        for subnet in self.config.leaseable_subnets():
            if subnet not in taken and subnet != previous:
                yield subnet

    def _lease_record(self, subnet: IPNetwork) -> SubnetLease:
        return SubnetLease(
            subnet, self.node, self.clock(), self.public_ip, self.config.backend_data()
        )

    def _republish(self, subnet: IPNetwork, kv: KeyValue) -> None:
        """Update a held lease whose public IP or backend changed (the key stays the node's)."""
        held = SubnetLease.from_json(subnet, kv.value)
        fresh = self._lease_record(subnet)
        if (held.public_ip, held.backend) == (fresh.public_ip, fresh.backend):
            return
        moved = SubnetLease(subnet, self.node, held.since, fresh.public_ip, fresh.backend)
        try:
            if self.store.compare_and_swap(
                kv.key, moved.to_json(), kv.mod_revision, lease=kv.lease
            ):
                log.info("lease %s now publishes %s %s", subnet, moved.public_ip, moved.backend)
        except LeaseNotFound:
            pass  # it expired meanwhile: _ensure_store_lease and renewal take it from here

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
        """Refresh the store lease; if it expired, re-claim this node's subnets.

        Returns whether the store answered, which sets when to try next. A subnet another node
        took while our lease was gone is dropped (the allocator stops using it at once).
        """
        if not self._lost:
            try:
                self.store.refresh_lease(self._lease_id)
                return True
            except LeaseNotFound:
                log.error("subnet lease of node %s expired; re-acquiring", self.node)
                with self._lock:
                    self._lost += [s for s in self._subnets if s not in self._lost]
                    self._subnets = []
            except StoreError as exc:
                log.warning("lease renewal failed: %s", exc)
                return False
        try:
            self._reclaim()
        except StoreError as exc:
            log.warning("re-claiming subnets failed, will retry: %s", exc)
            return False
        return True

    def _reclaim(self) -> None:
        self._ensure_store_lease()  # a retry after a partial failure reuses the lease it granted
        for subnet in list(self._lost):
            lease = self._lease_record(subnet)
            if self.store.create(self.keys.subnet(subnet), lease.to_json(), lease=self._lease_id):
                with self._lock:
                    self._subnets.append(subnet)
                log.info("node %s re-claimed subnet %s", self.node, subnet)
            else:
                log.error("subnet %s was taken by another node while our lease was lost", subnet)
            self._lost.remove(subnet)

    def observe_deleted(self, subnet: IPNetwork) -> None:
        """A subnet key of ours vanished. With our store lease gone it expired: renewal re-claims
        it. With the lease alive someone removed it (`moorctl node remove`): stop using it; with
        no subnet left the node is not ready until it restarts and leases afresh."""
        with self._lock:
            if subnet not in self._subnets:
                return
            self._subnets.remove(subnet)
        try:
            expired = self.store.lease_ttl_remaining(self._lease_id) is None
        except StoreError:
            expired = True  # cannot tell: treat it as expiry, renewal sorts it out
        if expired:
            with self._lock:
                self._lost.append(subnet)
            log.error(
                "subnet %s of node %s expired; re-claiming at the next renewal", subnet, self.node
            )
        else:
            log.error(
                "subnet %s was removed from node %s by an admin; no longer used", subnet, self.node
            )

    def renewal_delay(self, answered: bool) -> float:
        """A third of the TTL after a renewal, so two may fail before expiry; soon after a miss."""
        interval = max(1.0, self.ttl / 3)
        return interval if answered else min(interval, RENEW_RETRY)

    def start_renewal(self) -> None:
        def loop() -> None:
            delay = self.renewal_delay(True)
            while not self._stop.wait(delay):
                delay = self.renewal_delay(self.renew_once())

        self._renewer = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._renewer.start()

    def stop(self) -> None:
        self._stop.set()
