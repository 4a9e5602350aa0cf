"""`moorctl node remove`: free a gone node's subnet leases, IP records (with their handles) and
cooldown records, for good (flannel never frees them, flannel#954).

Nothing is deleted blindly: every batch of at most MAX_TXN_KEYS keys compares the mod revision
each key was read at, and a batch that conflicts is re-read and retried. A removal record comes
first, so a still-living daemon of that node knows its subnets went on purpose.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from ipamd.errors import Conflict, NotFound
from ipamd.model import Allocation, IPAddress, IPNetwork, SubnetLease
from ipamd.records import SubnetIndex, ip_records, records
from ipamd.release import TXN_RETRIES
from ipamd.store.base import Compare, Delete, KeyValue, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)

# etcd refuses a txn with more than 128 compares or ops (--max-txn-ops); stay well below.
MAX_TXN_KEYS = 100
Group = list[tuple[str, int]]  # keys deleted together, each with the mod revision it must have


@dataclass(frozen=True)
class NodeRemoval:
    node: str
    subnets: list[IPNetwork]
    ips_freed: int
    released_cleared: int


def remove_node(
    store: Store, keys: Keys, node: str, *, by: str, clock: Callable[[], float] = time.time
) -> NodeRemoval:
    """Remove `node` (see the module docstring); `by` is the node that asks, for the record."""
    return NodeRemover(store, keys, by, clock).remove(node)


class NodeRemover:
    def __init__(self, store: Store, keys: Keys, by: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.keys = keys
        self.by = by
        self.clock = clock

    def remove(self, node: str) -> NodeRemoval:
        """Free a gone node's subnet leases, its IP records (with handles) and cooldown records.

        A removal record first (`Keys.removal`), then records, subnet keys last, so no other
        node can lease a subnet that still has records being deleted. Every batch compares each
        key's mod revision. A daemon of that node that is still alive sees its subnets deleted
        with the removal record present, so it knows an admin removed them (it stops using them;
        without the record it would take them for lost and claim them back). The record goes
        when that node's daemon starts afresh.
        """
        subnet_kvs = self._subnet_kvs(node)
        if not subnet_kvs:
            raise NotFound(f"node {node} holds no subnet lease")
        subnets = sorted(subnet_kvs, key=lambda s: int(s.network_address))
        # First the removal record: a live daemon of `node` that sees its subnets vanish then
        # knows they were removed on purpose, not lost by the store (which it would claim back).
        record = {"at": self.clock(), "by": self.by, "subnets": [str(s) for s in subnets]}
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
        for ip, kv in ip_records(self.store, self.keys, subnets):
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
        for kv in records(self.store, self.keys, "released", subnets):
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
