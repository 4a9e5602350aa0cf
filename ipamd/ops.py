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
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass

from ipamd.allocator import NodeAllocator
from ipamd.errors import ConfigMismatch, Conflict, NotFound, Refused
from ipamd.model import Allocation, IPAddress, IPNetwork, NetworkConfig, SubnetLease
from ipamd.release import TXN_RETRIES, free_ip_ops, release_handle
from ipamd.store.base import Compare, Delete, KeyValue, Store
from ipamd.store.keys import Keys, covering_prefixes

log = logging.getLogger(__name__)

# etcd refuses a txn with more than 128 compares or ops (--max-txn-ops); stay well below.
MAX_TXN_KEYS = 100
NO_NETWORK = "no network config in the store: run `moorctl network init`"

Handle = tuple[str, str, str]
Group = list[
    tuple[str, int]
]  # keys deleted together, each with the mod revision it must still have


@dataclass(frozen=True)
class SubnetUsage:
    """One leased node subnet and how its addresses are used."""

    lease: SubnetLease
    allocated: int
    cooling: int

    @property
    def total(self) -> int:
        return self.lease.subnet.num_addresses

    @property
    def reserved(self) -> int:
        """Network, gateway (first host) and broadcast are never handed out."""
        return min(3, self.total)

    @property
    def free(self) -> int:
        return max(0, self.total - self.reserved - self.allocated - self.cooling)


@dataclass(frozen=True)
class Utilization:
    config: NetworkConfig
    subnets: list[SubnetUsage]
    subnets_leased: int
    subnets_free: int  # leaseable (min/max, fixed ranges honoured) and not leased
    addresses_allocated: int


@dataclass(frozen=True)
class NodeRemoval:
    node: str
    subnets: list[IPNetwork]
    ips_freed: int
    released_cleared: int


class SubnetIndex:
    """Which of a set of subnets holds an address, in O(distinct prefix lengths)."""

    def __init__(self, subnets: Iterable[IPNetwork]) -> None:
        self.by_start = {(s.prefixlen, int(s.network_address)): s for s in subnets}
        self.lengths = sorted({plen for plen, _ in self.by_start})

    def find(self, ip: IPAddress) -> IPNetwork | None:
        value, bits = int(ip), ip.max_prefixlen
        for plen in self.lengths:
            subnet = self.by_start.get((plen, value >> (bits - plen) << (bits - plen)))
            if subnet is not None and subnet.version == ip.version:
                return subnet
        return None


class ClusterOps:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        *,
        node: str = "",
        cooldown: float = 60.0,
        local: Callable[[], NodeAllocator | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`node` is the serving daemon's node (never removed; recorded as who released);
        `local` gives its allocator once it has one, for releases in its own subnets."""
        self.store = store
        self.keys = keys
        self.node = node
        self.cooldown = cooldown
        self.local = local
        self.clock = clock

    # ---- network config ------------------------------------------------------------------------
    def network(self) -> NetworkConfig | None:
        kv = self.store.get(self.keys.config())
        return NetworkConfig.from_json(kv.value) if kv is not None else None

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

    def _records(self, kind: str, subnets: list[IPNetwork] | None) -> Iterator[KeyValue]:
        """IP (`kind` "ips") or cooldown ("released") records: all, or just the key ranges of
        `subnets` (a /24's records share the text `10.244.3.`), which the caller still filters by
        membership. This is what keeps `moorctl ips --node` fast on a store of 200k records."""
        if kind == "ips":
            root, prefix_for = self.keys.ips_prefix(), self.keys.ips_prefix_for
        else:
            root, prefix_for = self.keys.released_prefix(), self.keys.released_prefix_for
        if subnets is None:
            yield from self.store.list_prefix(root)[0]
            return
        for prefix in covering_prefixes(prefix_for(s) for s in subnets):
            yield from self.store.list_prefix(prefix)[0]

    def _ip_records(self, subnets: list[IPNetwork] | None) -> Iterator[tuple[IPAddress, KeyValue]]:
        """Every IP record, or those inside `subnets` only."""
        index = SubnetIndex(subnets or [])
        for kv in self._records("ips", subnets):
            ip = self.keys.parse_ip(kv.key)
            if ip is not None and (subnets is None or index.find(ip) is not None):
                yield ip, kv

    def allocations(
        self, *, node: str = "", namespace: str = "", pod: str = ""
    ) -> list[Allocation]:
        """IP records, optionally those in `node`'s subnets and of one pod namespace/name."""
        subnets = [lease.subnet for lease in self.leases(node)] if node else None
        if subnets == []:
            return []
        out = []
        for ip, kv in self._ip_records(subnets):
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
        for kv in self._records("ips", scope):
            ip = self.keys.parse_ip(kv.key)
            if ip is None:
                continue
            total += 1
            subnet = index.find(ip)
            if subnet is not None:
                allocated[subnet] += 1
        cooling = {s: 0 for s in subnets}
        now = self.clock()
        for kv in self._records("released", scope):
            ip = self.keys.parse_released(kv.key)
            subnet = index.find(ip) if ip is not None else None
            if subnet is not None and now - _released_at(kv) < self.cooldown:
                cooling[subnet] += 1
        usage = [
            SubnetUsage(lease, allocated[lease.subnet], cooling[lease.subnet]) for lease in leases
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

    # ---- node removal ------------------------------------------------------------------------
    def remove_node(self, node: str) -> NodeRemoval:
        """Free a gone node's subnet leases, its IP records (with handles) and cooldown records.

        A removal record first (`Keys.removal`), then records, subnet keys last, so no other
        node can lease a subnet that still has records being deleted. Every batch compares each
        key's mod revision. A daemon of that node that is still alive sees its subnets deleted
        with the removal record present, so it knows an admin removed them (it stops using them;
        without the record it would take them for lost and claim them back). The record goes
        when that node's daemon starts afresh.
        """
        if node == self.node:
            raise Refused(
                f"node {node} is the node this moor-ipamd runs as; stop it and remove it "
                "through another node's daemon"
            )
        subnet_kvs = self._subnet_kvs(node)
        if not subnet_kvs:
            raise NotFound(f"node {node} holds no subnet lease")
        subnets = sorted(subnet_kvs, key=lambda s: int(s.network_address))
        # First the removal record: a live daemon of `node` that sees its subnets vanish then
        # knows they were removed on purpose, not lost by the store (which it would claim back).
        record = {"at": self.clock(), "by": self.node, "subnets": [str(s) for s in subnets]}
        self.store.put(self.keys.removal(node), json.dumps(record).encode())
        ips = self._delete_in_batches(self._ip_groups(subnets), self._rebuild_ip_group)
        released = self._delete_in_batches(
            [[(kv.key, kv.mod_revision)] for kv in self._released_kvs(subnets)],
            self._rebuild_single,
        )
        self._delete_in_batches(
            [[(kv.key, kv.mod_revision)] for kv in subnet_kvs.values()],
            lambda g: self._rebuild_subnet(g, node),
        )
        log.warning("removed node %s: subnets %s, %d IPs freed", node, subnets, ips)
        return NodeRemoval(node, subnets, ips, released)

    def _subnet_kvs(self, node: str) -> dict[IPNetwork, KeyValue]:
        out = {}
        for kv in self.store.list_prefix(self.keys.subnets_prefix())[0]:
            subnet = self.keys.parse_subnet(kv.key)
            if subnet is not None and SubnetLease.from_json(subnet, kv.value).node == node:
                out[subnet] = kv
        return out

    def _ip_group(self, ip: IPAddress, kv: KeyValue) -> Group:
        """An IP record and, if it points back at the IP, its handle."""
        group = [(kv.key, kv.mod_revision)]
        owner = Allocation.from_json(ip, kv.value).owner
        with suppress(ValueError):
            handle_key = self.keys.handle(*owner.handle)
            hkv = self.store.get(handle_key)
            if hkv is not None and hkv.value.decode(errors="replace") == str(ip):
                group.append((handle_key, hkv.mod_revision))
        return group

    def _ip_groups(self, subnets: list[IPNetwork]) -> list[Group]:
        groups, seen = [], set()
        for ip, kv in self._ip_records(subnets):
            group = [(k, r) for k, r in self._ip_group(ip, kv) if k not in seen]
            seen.update(k for k, _ in group)
            groups.append(group)
        return groups

    def _rebuild_ip_group(self, group: Group) -> Group | None:
        kv = self.store.get(group[0][0])
        ip = self.keys.parse_ip(group[0][0])
        return self._ip_group(ip, kv) if kv is not None and ip is not None else None

    def _released_kvs(self, subnets: list[IPNetwork]) -> list[KeyValue]:
        index = SubnetIndex(subnets)
        out = []
        for kv in self._records("released", subnets):
            ip = self.keys.parse_released(kv.key)
            if ip is not None and index.find(ip) is not None:
                out.append(kv)
        return out

    def _rebuild_single(self, group: Group) -> Group | None:
        kv = self.store.get(group[0][0])
        return [(kv.key, kv.mod_revision)] if kv is not None else None

    def _rebuild_subnet(self, group: Group, node: str) -> Group | None:
        kv = self.store.get(group[0][0])
        subnet = self.keys.parse_subnet(group[0][0])
        if kv is None or subnet is None or SubnetLease.from_json(subnet, kv.value).node != node:
            return None  # gone, or re-leased by another node meanwhile: not ours to delete
        return [(kv.key, kv.mod_revision)]

    def _delete_in_batches(
        self, groups: list[Group], rebuild: Callable[[Group], Group | None]
    ) -> int:
        """Delete every group, in txns of at most MAX_TXN_KEYS keys, each guarded on the mod
        revisions; a batch that conflicts is re-read (`rebuild`; None drops a group) and retried.
        Returns how many groups were deleted."""
        deleted = 0
        start = 0
        while start < len(groups):
            batch, size = [], 0
            while start < len(groups) and (not batch or size + len(groups[start]) <= MAX_TXN_KEYS):
                batch.append(groups[start])
                size += len(groups[start])
                start += 1
            deleted += self._delete_batch(batch, rebuild)
        return deleted

    def _delete_batch(self, batch: list[Group], rebuild: Callable[[Group], Group | None]) -> int:
        for _ in range(TXN_RETRIES):
            if not batch:
                return 0
            keys = [(k, r) for group in batch for k, r in group]
            result = self.store.txn([Compare(k, r) for k, r in keys], [Delete(k) for k, _ in keys])
            if result.succeeded:
                return len(batch)
            batch = [g for g in (rebuild(group) for group in batch) if g is not None]
        raise Conflict(f"the store kept changing under a batch of {len(batch)} deletions; retry")


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
