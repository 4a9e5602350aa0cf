"""Cluster-wide operations on the store: what `moorctl` asks of any node's Admin service.

One job: read and change the shared IPAM state through `Store` + `Keys` only, so every operation is
testable on an in-process store without gRPC. The rules the node daemons follow hold here too:
nothing is deleted blindly; every delete compares the mod revision it was decided on, and a release
goes through the same owner-checked transaction as `NodeAllocator.release` (`ipamd.allocator`).
A release of an IP in one of the serving daemon's own subnets goes through that daemon's allocator,
so its in-memory free set stays right.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ipamd import conflicts, schema
from ipamd.allocator import NodeAllocator
from ipamd.conflicts import AddressConflict
from ipamd.errors import ConfigMismatch, Conflict, NotFound, Refused
from ipamd.model import Allocation, IPAddress, IPNetwork, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.node_removal import NodeRemoval, remove_node
from ipamd.records import SubnetIndex, ip_records, records
from ipamd.release import free_ip_ops, release_handle
from ipamd.routing.peers import RouteState
from ipamd.store.base import Compare, Delete, KeyValue, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)

NO_NETWORK = "no network config in the store: run `moorctl network init`"

Handle = tuple[str, str, str]


@dataclass(frozen=True)
class SubnetUsage:
    """One leased node subnet and how its addresses are used."""

    lease: SubnetLease
    allocated: int
    cooling: int
    route: RouteState = RouteState("")  # as the serving node sees it; "" when it routes nothing
    conflicts: int = 0  # address conflict records (the ARP probe), not held by a pod

    @property
    def total(self) -> int:
        return self.lease.subnet.num_addresses

    @property
    def reserved(self) -> int:
        """Network, gateway (first host) and broadcast are never handed out."""
        return min(3, self.total)

    @property
    def free(self) -> int:
        return max(0, self.total - self.reserved - self.allocated - self.cooling - self.conflicts)


@dataclass(frozen=True)
class Utilization:
    config: NetworkConfig
    subnets: list[SubnetUsage]
    subnets_leased: int
    subnets_free: int  # leaseable (min/max, fixed ranges honoured) and not leased
    addresses_allocated: int


class ClusterOps:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        *,
        node: str = "",
        cooldown: float = 60.0,
        local: Callable[[], NodeAllocator | None] = lambda: None,
        route_states: Callable[[], Mapping[IPNetwork, RouteState]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`node` is the serving daemon's node (never removed; recorded as who released);
        `local` gives its allocator once it has one, for releases in its own subnets;
        `route_states` its routing's view of each subnet."""
        self.store = store
        self.keys = keys
        self.node = node
        self.cooldown = cooldown
        self.local = local
        self.route_states = route_states
        self.clock = clock

    # ---- network config ------------------------------------------------------------------------
    def network(self) -> NetworkConfig | None:
        kv = self.store.get(self.keys.config())
        return NetworkConfig.from_json(kv.value) if kv is not None else None

    def schema_version(self) -> int:
        """The store's schema version (ipamd/schema.py); 0 while it has no network config."""
        kv = self.store.get(self.keys.config())
        return schema.version_of(json.loads(kv.value)) if kv is not None else 0

    def require_network(self) -> NetworkConfig:
        config = self.network()
        if config is None:
            raise NotFound(NO_NETWORK)
        return config

    def init_network(self, config: NetworkConfig) -> bool:
        """Write the config if absent (True); False if the same one is there.

        ConfigMismatch if a different one is: the network cannot change under leased subnets.
        """
        written = config if config.cluster_id else config.with_new_cluster_id()
        if self.store.create(self.keys.config(), written.to_json()):
            log.info("network config written: %s", written.to_json().decode())
            return True
        stored = self.network()
        if stored == config:
            return False
        raise ConfigMismatch(
            f"the store already holds a different network config ({describe(stored)}); "
            "it cannot be changed while nodes use it"
        )

    # ---- listing -----------------------------------------------------------------------------
    def leases(self, node: str = "") -> list[SubnetLease]:
        """Every node subnet lease (of one node if `node`), in address order."""
        out = []
        for kv in self.store.list_prefix(self.keys.subnets_prefix())[0]:
            subnet = self.keys.parse_subnet(kv.key)
            if subnet is None:
                continue
            lease = SubnetLease.from_json(subnet, kv.value)
            if not node or lease.node == node:
                out.append(lease)
        return sorted(out, key=_subnet_order)

    def allocations(
        self, *, node: str = "", namespace: str = "", pod: str = ""
    ) -> list[Allocation]:
        """IP records, optionally those in `node`'s subnets and of one pod namespace/name."""
        subnets = [lease.subnet for lease in self.leases(node)] if node else None
        if subnets == []:
            return []
        out = []
        for ip, kv in ip_records(self.store, self.keys, subnets):
            alloc = Allocation.from_json(ip, kv.value)
            owner = alloc.owner
            if namespace and owner.pod_namespace != namespace:
                continue
            if pod and owner.pod_name != pod:
                continue
            out.append(alloc)
        return sorted(out, key=lambda a: (a.ip.version, int(a.ip)))

    # ---- utilization -------------------------------------------------------------------------
    def usage(self, node: str = "") -> list[SubnetUsage]:
        """Per leased subnet (of one node if `node`): allocated and cooling counts."""
        return self._usage(self.leases(node), whole=not node)[0]

    def utilization(self) -> Utilization:
        config = self.require_network()
        leases = self.leases()
        usage, allocated = self._usage(leases, whole=True)
        leaseable_held = sum(1 for lease in leases if config.leaseable(lease.subnet))
        return Utilization(
            config,
            usage,
            subnets_leased=len(leases),
            subnets_free=max(0, config.leaseable_count() - leaseable_held),
            addresses_allocated=allocated,
        )

    def _usage(self, leases: list[SubnetLease], *, whole: bool) -> tuple[list[SubnetUsage], int]:
        """Counts per lease, and every IP record seen (all of them when `whole`)."""
        subnets = [lease.subnet for lease in leases]
        scope = None if whole else subnets
        index = SubnetIndex(subnets)
        allocated = {s: 0 for s in subnets}
        total = 0
        # Conflict records: one range read, empty but for conflicts. An IP with one is counted
        # as a conflict (not as cooling, not as free), unless a pod holds it.
        conflicted = {c.ip for c in self.conflicts() if index.find(c.ip) is not None}
        for kv in records(self.store, self.keys, "ips", scope):
            ip = self.keys.parse_ip(kv.key)
            if ip is None:
                continue
            total += 1
            conflicted.discard(ip)
            subnet = index.find(ip)
            if subnet is not None:
                allocated[subnet] += 1
        cooling = {s: 0 for s in subnets}
        now = self.clock()
        for kv in records(self.store, self.keys, "released", scope):
            ip = self.keys.parse_released(kv.key)
            subnet = index.find(ip) if ip is not None else None
            if (
                subnet is not None
                and ip not in conflicted
                and now - _released_at(kv) < self.cooldown
            ):
                cooling[subnet] += 1
        blocked = {s: 0 for s in subnets}
        for ip in conflicted:
            blocked[index.find(ip)] += 1  # type: ignore[index]  # found above
        routes = self.route_states()
        usage = [
            SubnetUsage(
                lease,
                allocated[lease.subnet],
                cooling[lease.subnet],
                routes.get(lease.subnet, RouteState("")),
                conflicts=blocked[lease.subnet],
            )
            for lease in leases
        ]
        return usage, total

    # ---- release -----------------------------------------------------------------------------
    def _local_allocator(self, ip: IPAddress) -> NodeAllocator | None:
        """The serving daemon's allocator if `ip` is in one of its subnets."""
        local = self.local()
        if local is not None and any(ip in s for s in local.leases.subnets):
            return local
        return None

    def release_ip(self, ip: IPAddress) -> Allocation:
        """Free whatever holds `ip`, owner-checked.

        NotFound if nothing does; Conflict if the record changed between the read and the txn.
        """
        kv = self.store.get(self.keys.ip(ip))
        if kv is None:
            raise NotFound(f"no allocation holds {ip}")
        freed = self.release_record(Allocation.from_json(ip, kv.value), kv)
        if freed is None:
            raise Conflict(f"{ip} changed hands while being released; nothing freed")
        return freed

    def release_record(self, alloc: Allocation, kv: KeyValue) -> Allocation | None:
        """Free the IP record `kv` (read as `alloc`) if it is still exactly that; else None.

        Its handle goes with it when the handle points at this IP. Never retried: a record that
        changed is a new decision for the operator, not for a loop.
        """
        handle = alloc.owner.handle
        try:
            handle_key = self.keys.handle(*handle)
        except ValueError:
            handle_key = ""
        hkv = self.store.get(handle_key) if handle_key else None
        owns_handle = hkv is not None and hkv.value.decode(errors="replace") == str(alloc.ip)
        local = self._local_allocator(alloc.ip)
        if owns_handle and local is not None:
            return local.release(*handle)
        compares, ops = free_ip_ops(
            self.keys, alloc.ip, kv.mod_revision, node=self.node, now=self.clock()
        )
        if handle_key:  # the handle must still be as we saw it; it goes only if it is this IP's
            compares.append(Compare(handle_key, hkv.mod_revision if hkv is not None else 0))
            if owns_handle:
                ops.append(Delete(handle_key))
        if not self.store.txn(compares, ops).succeeded:
            return None
        if local is not None:
            log.warning(
                "released %s, which had no handle; this node forgets it at restart", alloc.ip
            )
        return alloc

    def release_handle(self, handle: Handle) -> Allocation:
        """Free what the attachment `handle` (network, container ID, ifname) holds, owner-checked."""
        hkv = self.store.get(self.keys.handle(*handle))
        if hkv is None:
            raise NotFound(f"no attachment with handle {'/'.join(handle)}")
        try:
            ip: IPAddress | None = ipaddress.ip_address(hkv.value.decode())
        except ValueError:
            ip = None
        local = self._local_allocator(ip) if ip is not None else None
        if local is not None:
            freed = local.release(*handle)
        else:
            freed = release_handle(self.store, self.keys, handle, node=self.node, clock=self.clock)
        if freed is None:
            raise Conflict(
                f"handle {'/'.join(handle)} pointed at {ip or 'no valid IP'}, which it does not "
                "hold: dropped the stale handle, nothing freed"
            )
        return freed

    # ---- address conflicts (the ARP probe) -----------------------------------------------------
    def conflicts(self) -> list[AddressConflict]:
        """Every IP another host answered the ARP probe for (cluster-wide), in address order."""
        return conflicts.listing(self.store, self.keys)

    def clear_conflict(self, ip: IPAddress) -> AddressConflict:
        """Make `ip` allocatable again: delete its conflict record (compare-guarded). The node
        owning its subnet unblocks it through its store watch; the serving daemon's own subnet
        at once, so it is allocatable when this returns."""
        cleared, revision = conflicts.clear(self.store, self.keys, ip)
        local = self._local_allocator(ip)
        if local is not None:
            local.observe_conflict("delete", ip, revision)
        log.info("address conflict of %s (MAC %s) cleared by an operator", ip, cleared.mac)
        return cleared

    # ---- node removal ------------------------------------------------------------------------
    def remove_node(self, node: str) -> NodeRemoval:
        """Free a gone node's subnet leases, records and cooldown records (`node_removal.py`);
        the serving daemon's own node is refused."""
        if node == self.node:
            raise Refused(
                f"node {node} is the node this moor-ipamd runs as; stop it and remove it "
                "through another node's daemon"
            )
        return remove_node(self.store, self.keys, node, by=self.node, clock=self.clock)


# ---- helpers ---------------------------------------------------------------------------------
def describe(config: NetworkConfig | None) -> str:
    """One line for messages: '10.244.0.0/16 /24, subnets 10.244.8.0/24..., fixed ..., host-gw'."""
    if config is None:
        return "none"
    parts = [f"network {config.network} /{config.subnet_len}"]
    if config.subnet_min is not None or config.subnet_max is not None:
        parts.append(f"subnets {config.subnet_min or '-'}..{config.subnet_max or '-'}")
    if config.fixed_ranges:
        parts.append("fixed " + ",".join(map(str, config.fixed_ranges)))
    parts.append(f"backend {config.backend}")
    return ", ".join(parts)


def _subnet_order(lease: SubnetLease) -> tuple[int, int]:
    return lease.subnet.version, int(lease.subnet.network_address)


def _released_at(kv: KeyValue) -> float:
    try:
        return float(json.loads(kv.value).get("releasedAt", 0))
    except (ValueError, AttributeError, TypeError):
        return 0.0
