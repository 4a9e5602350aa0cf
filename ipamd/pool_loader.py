"""Rebuilding a node's in-memory pools from the store: the IP records, the cooldown records and
the conflict records of its subnets, listed by the key ranges that cover them (never the whole
cluster's records). Each pool learns the revision its records were listed at, so the store
follower can skip a change that the listing already holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ipamd.model import Allocation, IPAddress, IPNetwork
from ipamd.pool import SubnetPool, pool_for
from ipamd.store.base import KeyValue, Store
from ipamd.store.keys import Keys, covering_prefixes

Handle = tuple[str, str, str]


def read_pools(
    store: Store, keys: Keys, subnets: list[IPNetwork]
) -> tuple[dict[IPNetwork, SubnetPool], dict[Handle, Allocation]]:
    """Pools and the handle index of `subnets`, from their records in the store."""
    pools = {s: SubnetPool(s) for s in subnets}
    by_handle: dict[Handle, Allocation] = {}
    for kv in _list(store, keys.ips_prefix_for, subnets, pools):
        ip = keys.parse_ip(kv.key)
        pool = pool_for(ip, pools) if ip is not None else None
        if ip is None or pool is None:
            continue
        alloc = Allocation.from_json(ip, kv.value)
        pool.used.add(ip)
        by_handle[alloc.owner.handle] = alloc
    released: list[tuple[float, IPAddress]] = []
    for kv in _list(store, keys.released_prefix_for, subnets):
        ip = keys.parse_released(kv.key)
        if ip is not None and pool_for(ip, pools) is not None:
            released.append((float(json.loads(kv.value).get("releasedAt", 0)), ip))
    for at, ip in sorted(released):
        pool = pool_for(ip, pools)
        if pool is not None and ip not in pool.used:
            pool.push_released(ip, at)
    _read_conflicts(store, keys, pools)
    return pools, by_handle


def _read_conflicts(store: Store, keys: Keys, pools: dict[IPNetwork, SubnetPool]) -> None:
    """Block the IPs with a conflict record. Each pool learns the revision of this listing
    on its own (`conflicts_listed_at`): it is later than its IP records' listing, and the
    follower skips a change at or before the listing that holds it."""
    prefix_for = keys.conflicts_prefix_for
    for prefix in covering_prefixes(prefix_for(subnet) for subnet in pools):
        items, revision = store.list_prefix(prefix)
        for subnet, pool in pools.items():
            if prefix_for(subnet).startswith(prefix):
                pool.conflicts_listed_at = revision
        for kv in items:
            ip = keys.parse_conflict(kv.key)
            pool = pool_for(ip, pools) if ip is not None else None
            if ip is not None and pool is not None:
                pool.block(ip)


def _list(
    store: Store,
    prefix_for: Callable[[IPNetwork], str],
    subnets: list[IPNetwork],
    pools: dict[IPNetwork, SubnetPool] | None = None,
) -> list[KeyValue]:
    """Records under the key prefixes covering `subnets`: this node's part of the cluster's
    state, not all of it (callers still filter by subnet membership). Each of `pools` learns
    the revision its records were listed at."""
    found: list[KeyValue] = []
    for prefix in covering_prefixes(prefix_for(subnet) for subnet in subnets):
        items, revision = store.list_prefix(prefix)
        found += items
        for subnet, pool in (pools or {}).items():
            if prefix_for(subnet).startswith(prefix):
                pool.listed_at = revision
    return found
