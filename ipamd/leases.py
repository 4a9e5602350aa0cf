"""Node subnet leases, in flannel's model with its known holes fixed.

A node claims subnets of the cluster network with create-if-absent: first the ones it already
holds (keyed by node name, never by a public IP that may change), then the one it held last
(remembered in its state file, `node_state.py`), then a free one. All of a node's subnet keys hang
on one store lease with a TTL that a background thread renews well before expiry. A node whose
subnets are full takes one more, as Calico nodes take more blocks, so a full node subnet is never
an outage.

A subnet key of ours that vanishes was either removed by an admin (`moorctl node remove` writes a
removal record first) or lost: the lease expired, or the store lost data. A removed subnet is
never used again; a lost one is claimed back (`reassert`): create-if-absent, or moved onto our
store lease if the key is there and ours; a subnet another node took meanwhile is dropped, never
used by this node again, and reported as a conflict.

Locks: `_lock` guards `_subnets`, `_lost`, `_lease_id` and `config`, held briefly and never across
a store call or a call of `on_subnets_changed` (the store follower's hook, told of every change of
`_subnets`). `_claim_lock` serialises everything that talks to the store about our leases (grant,
claim, re-claim, renewal, republish), so two threads never each grant a store lease; it is taken
before `_lock`, never while holding it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

from ipamd import schema
from ipamd.errors import ConfigMismatch, NetworkExhausted
from ipamd.model import IPNetwork, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.node_state import NodeState, NodeStateFile
from ipamd.store.base import KeyValue, LeaseNotFound, Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
CLAIM_RETRIES = 8
RENEW_RETRY = 5.0  # seconds between renewal attempts while the store does not answer
Conflict = Callable[[str, str], None]  # (kind, sentence): reported, counted, shown in status


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
        on_conflict: Conflict | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.config = config
        self.public_ip = public_ip  # published in the lease for the routing of other nodes
        self.ttl = ttl
        self.state = NodeStateFile(state_file)
        self.clock = clock
        self.on_conflict = on_conflict
        # Told (outside `_lock`) whenever `_subnets` changed: the store follower's scope follows.
        self.on_subnets_changed: Callable[[], None] | None = None
        self._lease_id = 0
        self._subnets: list[IPNetwork] = []
        self._lost: list[IPNetwork] = []  # ours until they vanished: to claim back
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # renew (and re-claim) now, not at the next interval
        self._renewer: threading.Thread | None = None

    # ---- views ----------------------------------------------------------------------------
    @property
    def subnets(self) -> list[IPNetwork]:
        with self._lock:
            return list(self._subnets)

    def has_lease(self) -> bool:
        with self._lock:
            return bool(self._subnets)

    @property
    def lease_id(self) -> int:
        with self._lock:
            return self._lease_id

    # ---- network config -------------------------------------------------------------------
    def ensure_network_config(self) -> None:
        """Write the cluster network config if absent (with a new cluster ID); refuse to run
        against a different one. A stored config without a cluster ID (older moor) gets one.

        Flags only say network and subnet length; the rest of a stored config (subnet min/max,
        fixed ranges, backend, from `moorctl network init`) is adopted.
        """
        key = self.keys.config()
        remembered = self.state.load().config
        with self._claim_lock:
            fresh = self.config if self.config.cluster_id else self.config.with_new_cluster_id()
            same = (self.config.network, self.config.subnet_len)
            if (
                remembered is not None
                and remembered.cluster_id
                and (
                    remembered.network,
                    remembered.subnet_len,
                )
                == same
            ):
                fresh = remembered  # this node's cluster, as it was: keep its identity too
            if self.store.create(key, fresh.to_json()):
                if remembered is not None and remembered.cluster_id:
                    log.error(
                        "the store had no network config, but node %s belongs to cluster %s: "
                        "the store lost its data; writing the config back",
                        self.node,
                        remembered.cluster_id,
                    )
                self._set_config(fresh)
                return
            current = self.store.get(key)
            if current is None:
                raise ConfigMismatch("network config vanished while it was being written; retry")
            current = schema.upgrade(self.store, self.keys, current, json.loads, _encode)
            stored = NetworkConfig.from_json(current.value)
            if (stored.network, stored.subnet_len) != (
                self.config.network,
                self.config.subnet_len,
            ):
                raise ConfigMismatch(
                    f"the store holds network {stored.network} /{stored.subnet_len} but this "
                    f"daemon was started with {self.config.network} /{self.config.subnet_len}"
                )
            if remembered is not None and remembered.cluster_id not in ("", stored.cluster_id):
                log.error(
                    "node %s belongs to cluster %s but the store's network is cluster %s: the "
                    "store was re-initialised or replaced; joining it",
                    self.node,
                    remembered.cluster_id,
                    stored.cluster_id or "(unnamed)",
                )
            if not stored.cluster_id:
                named = stored.with_new_cluster_id()
                if self.store.compare_and_swap(key, named.to_json(), current.mod_revision):
                    stored = named
                else:  # another node named it first: take theirs
                    latest = self.store.get(key)
                    stored = NetworkConfig.from_json(latest.value) if latest else stored
            self._set_config(stored)

    def _set_config(self, config: NetworkConfig) -> None:
        with self._lock:
            self.config = config
        self._remember()

    def adopt_cluster_id(self, cluster_id: str) -> None:
        """The store's config is ours under another cluster ID (re-initialised after a loss)."""
        with self._lock:
            self.config = dataclasses.replace(self.config, cluster_id=cluster_id)
        self._remember()

    # ---- acquisition ----------------------------------------------------------------------
    def acquire(self) -> list[IPNetwork]:
        """At start: keep every subnet this node already holds, else claim one (previous first)."""
        with self._claim_lock:
            self._clear_removal_record()
            items, _ = self.store.list_prefix(self.keys.subnets_prefix())
            own: list[tuple[IPNetwork, KeyValue]] = []
            for kv in items:
                subnet = self.keys.parse_subnet(kv.key)
                if subnet is not None and SubnetLease.from_json(subnet, kv.value).node == self.node:
                    own.append((subnet, kv))
            if own:
                with self._lock:
                    self._lease_id = self._lease_id or own[0][1].lease
                self._ensure_store_lease()
                for subnet, kv in own:
                    self._adopt(subnet, kv)
                with self._lock:
                    self._subnets = sorted(
                        (s for s, _ in own), key=lambda n: int(n.network_address)
                    )
                self._subnets_changed()
                self._remember()
                return self.subnets
            self._acquire_additional()
            return self.subnets

    def acquire_additional(self) -> IPNetwork:
        """Claim one more free subnet; NetworkExhausted when the cluster network is full."""
        with self._claim_lock:
            return self._acquire_additional()

    def _acquire_additional(self) -> IPNetwork:
        self._ensure_store_lease()
        try:
            return self._claim_free()
        except NetworkExhausted:
            if not self.has_lease():  # a node that holds nothing must not leave a lease behind
                self._revoke_store_lease()
            raise

    def _clear_removal_record(self) -> None:
        """A node starting afresh after `moorctl node remove` has taken note of it."""
        if self.store.delete(self.keys.removal(self.node)):
            log.warning("node %s was removed by an admin; it leases afresh", self.node)

    def _revoke_store_lease(self) -> None:
        with self._lock:
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
                    self.keys.subnet(subnet), lease.to_json(), lease=self.lease_id
                ):
                    with self._lock:
                        self._subnets.append(subnet)
                    self._subnets_changed()
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
        previous = [s for s in self.state.load().subnets if s.subnet_of(self.config.network)]  # type: ignore[arg-type]
        for subnet in previous[:1]:
            if subnet not in taken and self.config.leaseable(subnet):
                yield subnet
        for subnet in self.config.leaseable_subnets():
            if subnet not in taken and subnet not in previous[:1]:
                yield subnet

    def _lease_record(self, subnet: IPNetwork, since: float | None = None) -> SubnetLease:
        return SubnetLease(
            subnet,
            self.node,
            self.clock() if since is None else since,
            self.public_ip,
            self.config.backend_data(self.node),
        )

    def _adopt(self, subnet: IPNetwork, kv: KeyValue) -> bool:
        """Make our key of `subnet` current: on our store lease, publishing our public IP and
        backend. False when it changed under us (the caller looks again)."""
        held = SubnetLease.from_json(subnet, kv.value)
        fresh = self._lease_record(subnet, since=held.since)
        lease_id = self.lease_id
        if (held.public_ip, held.backend, kv.lease) == (fresh.public_ip, fresh.backend, lease_id):
            return True
        try:
            moved = self.store.compare_and_swap(
                kv.key, fresh.to_json(), kv.mod_revision, lease=lease_id
            )
        except LeaseNotFound:
            return False  # our lease expired meanwhile: renewal takes it from here
        if moved:
            log.info("lease %s now publishes %s %s", subnet, fresh.public_ip, fresh.backend)
        return moved

    def _ensure_store_lease(self) -> None:
        lease_id = self.lease_id
        if lease_id:
            try:
                self.store.refresh_lease(lease_id)
                return
            except LeaseNotFound:
                log.warning("store lease %x expired; granting a new one", lease_id)
        granted = self.store.grant_lease(self.ttl)
        with self._lock:
            self._lease_id = granted

    def _remember(self) -> None:
        """Save the config and the subnets held; holding none (yet), keep those held last."""
        with self._lock:
            subnets, config = list(self._subnets), self.config
        self.state.save(NodeState(self.node, subnets or self.state.load().subnets, config))

    # ---- loss and re-assertion --------------------------------------------------------------
    def observe_deleted(self, subnet: IPNetwork) -> None:
        """A subnet key of ours vanished (the store follower saw it). Stop using it at once;
        then either it was removed by an admin (a removal record says so) and stays removed, or
        it was lost (expiry, store loss) and is claimed back now."""
        with self._lock:
            if subnet not in self._subnets:
                return
            self._subnets.remove(subnet)
        self._subnets_changed()
        try:
            removed = self.store.get(self.keys.removal(self.node)) is not None
        except StoreError:
            removed = False  # cannot tell: claiming back is create-if-absent, so it is safe
        if removed:
            log.error(
                "subnet %s was removed from node %s by an admin; no longer used", subnet, self.node
            )
            return
        with self._lock:
            self._lost.append(subnet)
        log.error("subnet %s of node %s vanished; claiming it back", subnet, self.node)
        self._wake.set()

    def reassert(self) -> list[IPNetwork]:
        """Claim back every subnet this node holds or lost: create-if-absent on our store lease,
        or moved onto it when the key is there and ours. A subnet another node holds is dropped
        and reported. Returns the subnets held afterwards. StoreError propagates (retry)."""
        with self._claim_lock:
            self._ensure_store_lease()
            with self._lock:
                wanted = self._subnets + [s for s in self._lost if s not in self._subnets]
            for subnet in wanted:
                holder = self._claim_back(subnet)
                with self._lock:
                    if subnet in self._lost:
                        self._lost.remove(subnet)
                    if holder == self.node and subnet not in self._subnets:
                        self._subnets.append(subnet)
                    elif holder != self.node and subnet in self._subnets:
                        self._subnets.remove(subnet)
                if holder != self.node:
                    self._conflict(
                        "subnet",
                        f"subnet {subnet} of node {self.node} is now held by {holder}: "
                        "this node no longer allocates from it; its pods there keep their IPs",
                    )
            self._subnets_changed()
            if not self.has_lease():
                try:  # every subnet it had is someone else's now: serve new pods from a new one
                    self._acquire_additional()
                except NetworkExhausted as exc:
                    log.error("node %s holds no subnet and can lease none: %s", self.node, exc)
            self._remember()
            return self.subnets

    def _claim_back(self, subnet: IPNetwork) -> str:
        """Who holds `subnet` after our attempt to hold it."""
        key = self.keys.subnet(subnet)
        for _ in range(CLAIM_RETRIES):
            if self.store.create(key, self._lease_record(subnet).to_json(), lease=self.lease_id):
                log.warning("node %s put back its subnet lease %s", self.node, subnet)
                return self.node
            kv = self.store.get(key)
            if kv is None:
                continue  # deleted in between: try to create again
            holder = SubnetLease.from_json(subnet, kv.value).node
            if holder != self.node or self._adopt(subnet, kv):
                return holder
        raise StoreError(f"subnet {subnet} kept changing while being claimed back")

    def _subnets_changed(self) -> None:
        if self.on_subnets_changed is not None:
            self.on_subnets_changed()

    def _conflict(self, kind: str, sentence: str) -> None:
        if self.on_conflict is not None:
            self.on_conflict(kind, sentence)  # the store guard logs, counts and shows it
        else:
            log.error("CONFLICT: %s", sentence)

    # ---- renewal ----------------------------------------------------------------------------
    def renew_once(self) -> bool:
        """Refresh the store lease, and claim back what was lost (expiry, a vanished key).

        Returns whether the store answered, which sets when to try next.
        """
        try:
            with self._lock:
                lost = bool(self._lost)
            if not lost:
                try:
                    with self._claim_lock:
                        self.store.refresh_lease(self.lease_id)
                    return True
                except LeaseNotFound:
                    log.error(
                        "subnet lease of node %s expired; claiming its subnets back", self.node
                    )
            self.reassert()
        except StoreError as exc:
            log.warning("lease renewal failed, will retry: %s", exc)
            return False
        return True

    def renewal_delay(self, answered: bool) -> float:
        """A third of the TTL after a renewal, so two may fail before expiry; soon after a miss."""
        interval = max(1.0, self.ttl / 3)
        return interval if answered else min(interval, RENEW_RETRY)

    def start_renewal(self) -> None:
        def loop() -> None:
            delay = self.renewal_delay(True)
            while True:
                self._wake.wait(delay)
                self._wake.clear()
                if self._stop.is_set():
                    return
                delay = self.renewal_delay(self.renew_once())

        self._renewer = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._renewer.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def _encode(config: dict) -> bytes:
    return json.dumps(config).encode()
