"""Pod IP allocation from the node's subnets: one store transaction per IP, the free set in memory.

Policy:
- never the network, gateway (first host) or broadcast address;
- fresh addresses first, in ascending order; released addresses go to the back of a FIFO and are
  reused only after a cooldown, so firewalls, DNS and monitoring keyed on a just-freed IP do not see
  it on another pod at once;
- when the node's subnets hold no fresh or cooled-off address, lease one more subnet; only when the
  cluster network is full is a still-cooling address reused (oldest first), and only when there is
  none of those either does allocation fail.

Every claim is create-if-absent on the IP key plus the handle key in one transaction. Every release
compares the IP record's owner and revision, so a stale release never frees an IP someone else holds.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable

from ipamd import conflicts
from ipamd.errors import NetworkExhausted, RequestedIPUnavailable
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Allocation, IPAddress, IPNetwork, Owner
from ipamd.pool import PoolStatus, SubnetPool, pool_for
from ipamd.pool_loader import read_pools
from ipamd.release import TXN_RETRIES, release_handle
from ipamd.rwlock import SharedExclusiveLock
from ipamd.store.base import Compare, Delete, Put, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)


class NodeAllocator:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        node: str,
        leases: SubnetLeaseManager,
        *,
        cooldown: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.leases = leases
        self.cooldown = cooldown
        self.clock = clock
        # `_lock` guards _pools (and every SubnetPool in it) and _by_handle, held briefly.
        # `_gate` keeps a reload from swapping the pools under an allocation or release in
        # flight: those hold it shared from their pick to their memory update, a reload holds it
        # exclusive from its listing to its swap. `_grow_lock` lets one caller lease a subnet.
        self._lock = threading.Lock()
        self._gate = SharedExclusiveLock()
        self._grow_lock = threading.Lock()
        self._pools: dict[IPNetwork, SubnetPool] = {}
        self._by_handle: dict[tuple[str, str, str], Allocation] = {}

    # ---- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the in-memory free sets and handle index from the store (at start, and when
        the store follower lost track); waits for allocations and releases in flight."""
        with self._gate.exclusive:
            self._load()

    def _load(self) -> None:
        pools, by_handle = read_pools(self.store, self.keys, self.leases.subnets)
        with self._lock:
            self._pools = pools
            self._by_handle = by_handle

    def _adopt_new_subnets(self) -> None:
        """Pools for subnets the lease manager holds but the allocator has none for yet (one it
        claimed while re-asserting, or just leased), read from their records in the store."""
        held = self.leases.subnets
        with self._lock:
            missing = [s for s in held if s not in self._pools]
        if not missing:
            return
        pools, by_handle = read_pools(self.store, self.keys, missing)
        with self._lock:
            for subnet, pool in pools.items():
                if subnet not in self._pools:
                    self._pools[subnet] = pool
                    self._by_handle.update(
                        (h, a) for h, a in by_handle.items() if a.subnet == subnet
                    )

    @staticmethod
    def _pool_for(ip: IPAddress, pools: dict[IPNetwork, SubnetPool]) -> SubnetPool | None:
        return pool_for(ip, pools)

    # ---- allocation ------------------------------------------------------------------------
    def allocate(
        self,
        owner: Owner,
        *,
        netns: str = "",
        netns_inode: int = 0,
        host_veth: str = "",
        requested: IPAddress | None = None,
    ) -> tuple[Allocation, bool]:
        """Claim an IP for `owner`; returns (allocation, existed). Idempotent per handle."""
        with self._gate.shared:
            return self._allocate(owner, netns, netns_inode, host_veth, requested)

    def _allocate(
        self,
        owner: Owner,
        netns: str,
        netns_inode: int,
        host_veth: str,
        requested: IPAddress | None,
    ) -> tuple[Allocation, bool]:
        self._adopt_new_subnets()
        with self._lock:
            existing = self._by_handle.get(owner.handle)
        if existing is not None:
            return existing, True
        handle_key = self.keys.handle(*owner.handle)
        for _ in range(TXN_RETRIES):
            ip, pool = self._pick(requested)
            alloc = Allocation(
                ip, pool.subnet, owner, self.node, self.clock(), netns, netns_inode, host_veth
            )
            ip_key = self.keys.ip(ip)
            try:
                result = self.store.txn(
                    [Compare(ip_key, 0), Compare(handle_key, 0)],
                    [
                        Put(ip_key, alloc.to_json()),
                        Put(handle_key, str(ip).encode()),
                        Delete(self.keys.released(ip)),
                    ],
                )
            except BaseException:
                self._unpend(pool, ip, requeue=True)
                raise
            if result.succeeded:
                with self._lock:
                    pool.pending.discard(ip)
                    pool.used.add(ip)
                    self._by_handle[owner.handle] = alloc
                return alloc, False
            self._unpend(pool, ip, requeue=False)
            found = self._load_handle(owner)
            if found is not None:
                return found, True
            taken = self.store.get(ip_key)
            if taken is not None:
                with self._lock:
                    pool.used.add(ip)
            if requested is not None:
                raise RequestedIPUnavailable(f"requested IP {requested} is already allocated")
        raise NetworkExhausted(f"gave up after {TXN_RETRIES} conflicting allocation attempts")

    def _unpend(self, pool: SubnetPool, ip: IPAddress, *, requeue: bool) -> None:
        with self._lock:
            pool.pending.discard(ip)
            if requeue:
                pool.push_released(ip, 0.0, front=True)

    def _pick(self, requested: IPAddress | None) -> tuple[IPAddress, SubnetPool]:
        if requested is not None:
            with self._lock:
                return self._pick_requested(requested)
        got = self._pick_available()
        if got is not None:
            return got
        with self._grow_lock:  # one caller leases the next subnet; the others then find it
            got = self._pick_available()
            if got is not None:
                return got
            try:
                subnet = self.leases.acquire_additional()
            except NetworkExhausted:
                got = self._pick_available(force_cooling=True)
                if got is not None:
                    log.warning(
                        "cluster network full: reusing %s before its cooldown ended", got[0]
                    )
                    return got
                raise
            self._adopt_new_subnets()
            got = self._pick_available()
        if got is None:
            raise NetworkExhausted(f"new subnet {subnet} has no usable address")
        return got

    def _pick_available(self, force_cooling: bool = False) -> tuple[IPAddress, SubnetPool] | None:
        """A fresh address, else a cooled-off released one (any cooling one when forced).

        Only from subnets the node still leases: one lost to another node is never handed out.
        """
        held = set(self.leases.subnets)
        with self._lock:
            now = self.clock()
            pools = [p for p in self._pools.values() if p.subnet in held]
            for pool in pools:
                ip = pool.take_fresh()
                if ip is not None:
                    pool.pending.add(ip)
                    return ip, pool
            for pool in pools:
                ip = pool.take_released(now, self.cooldown, force=force_cooling)
                if ip is not None:
                    pool.pending.add(ip)
                    return ip, pool
        return None

    def _pick_requested(self, ip: IPAddress) -> tuple[IPAddress, SubnetPool]:
        pool = self._pool_for(ip, self._pools)
        if pool is None or not pool.usable(ip):
            raise RequestedIPUnavailable(
                f"requested IP {ip} is not a pod address of this node's subnets"
            )
        if ip in pool.used or ip in pool.pending:
            raise RequestedIPUnavailable(f"requested IP {ip} is already allocated")
        if ip in pool.blocked:
            raise RequestedIPUnavailable(
                f"requested IP {ip} is in use by another host (address conflict; "
                f"`moorctl conflicts clear {ip}` once it is not)"
            )
        pool.take_specific(ip)
        return ip, pool

    def _load_handle(self, owner: Owner) -> Allocation | None:
        """The allocation a concurrent call made for this handle, if any."""
        kv = self.store.get(self.keys.handle(*owner.handle))
        if kv is None:
            return None
        ip = ipaddress.ip_address(kv.value.decode())
        rec = self.store.get(self.keys.ip(ip))
        if rec is None:
            return None
        alloc = Allocation.from_json(ip, rec.value)
        if alloc.owner.handle != owner.handle:
            return None
        with self._lock:
            self._by_handle[owner.handle] = alloc
        return alloc

    # ---- release ---------------------------------------------------------------------------
    def release(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        """Free the IP held by this handle, comparing owner and revision; None if it held none."""
        with self._gate.shared:
            return self._release((network, container_id, ifname))

    def _release(self, handle: tuple[str, str, str]) -> Allocation | None:
        with self._lock:  # pending: the delete event the store watch echoes back is ours
            known = self._by_handle.get(handle)
            if known is not None:
                self._pool_pending(known.ip, add=True)
        try:
            alloc = release_handle(self.store, self.keys, handle, node=self.node, clock=self.clock)
        except BaseException:
            with self._lock:
                if known is not None:
                    self._pool_pending(known.ip, add=False)
            raise
        with self._lock:
            if known is not None:
                self._pool_pending(known.ip, add=False)
            self._by_handle.pop(handle, None)
            if alloc is not None:
                pool = self._pool_for(alloc.ip, self._pools)
                if pool is not None:
                    pool.used.discard(alloc.ip)
                    pool.push_released(alloc.ip, self.clock())
        return alloc

    def _pool_pending(self, ip: IPAddress, *, add: bool) -> None:
        pool = self._pool_for(ip, self._pools)
        if pool is not None:
            if add:
                pool.pending.add(ip)
            else:
                pool.pending.discard(ip)

    # ---- changes made by others (admin release, node remove) ---------------------------------
    def observe(self, kind: str, ip: IPAddress, revision: int = 0) -> None:
        """Follow a change of an IP record made elsewhere, so the free set matches the store.

        Our own allocations and releases come back here too: an IP that is pending (our txn in
        flight) is left alone, and the rest is idempotent. A change at or before the revision the
        pool was listed at is in memory already: after a re-sync the watch replays from before
        the listing, and replaying an old delete of an IP allocated again since would drop its
        new holder from memory.
        """
        with self._lock:
            pool = self._pool_for(ip, self._pools)
            if pool is None or ip in pool.pending or 0 < revision <= pool.listed_at:
                return
            if kind == "put":
                pool.used.add(ip)
                return
            if ip not in pool.used:
                return
            pool.used.discard(ip)
            pool.push_released(ip, self.clock())
            for handle, alloc in list(self._by_handle.items()):
                if alloc.ip == ip:
                    del self._by_handle[handle]
        log.warning("%s was released outside this node (moorctl?): forgotten here too", ip)

    # ---- address conflicts (the ARP probe) ------------------------------------------------
    def mark_conflict(self, ip: IPAddress, mac: str, network: str) -> None:
        """Write the conflict record of `ip` and block it here at once (the follower's echo of
        the write, at the same revision, is then skipped)."""
        found = conflicts.AddressConflict(ip, mac, self.node, self.clock(), network)
        self.observe_conflict("put", ip, conflicts.record(self.store, self.keys, found))

    def observe_conflict(self, kind: str, ip: IPAddress, revision: int) -> None:
        """Follow a change of `ip`'s conflict record: blocked while it exists. Changes of one
        key arrive in revision order, but a write of our own or the admin's clear is applied
        before its echo: one at or before the last applied (or listed) is old news."""
        with self._lock:
            pool = self._pool_for(ip, self._pools)
            if pool is None:
                return
            if revision <= max(pool.conflicts_listed_at, pool.conflict_seen.get(ip, 0)):
                return
            pool.conflict_seen[ip] = revision
            if kind == "put":
                pool.block(ip)
            else:
                pool.unblock(ip)
        log.warning(
            "%s %s (address conflict record)", ip, "blocked" if kind == "put" else "unblocked"
        )

    def forget(self, alloc: Allocation) -> bool:
        """Drop an allocation whose record the store lost and whose pod is gone: memory only.
        Its IP waits out the cooldown like any released one. False if it changed meanwhile."""
        with self._lock:
            if self._by_handle.get(alloc.owner.handle) != alloc:
                return False
            del self._by_handle[alloc.owner.handle]
            pool = self._pool_for(alloc.ip, self._pools)
            if pool is not None and alloc.ip in pool.used:
                pool.used.discard(alloc.ip)
                pool.push_released(alloc.ip, self.clock())
        return True

    def in_flight(self, ip: IPAddress) -> bool:
        """A transaction about `ip` is running now (its record may be about to change)."""
        with self._lock:
            pool = self._pool_for(ip, self._pools)
            return pool is not None and ip in pool.pending

    # ---- views -----------------------------------------------------------------------------
    def get(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        with self._lock:
            return self._by_handle.get((network, container_id, ifname))

    def allocations(self, network: str | None = None) -> list[Allocation]:
        with self._lock:
            items = list(self._by_handle.values())
        return sorted(
            (a for a in items if network is None or a.owner.network == network),
            key=lambda a: (a.subnet.version, int(a.ip)),
        )

    def stored(self, alloc: Allocation) -> Allocation | None:
        """Re-read an allocation from the store (for GC re-validation); None if it changed hands."""
        kv = self.store.get(self.keys.ip(alloc.ip))
        if kv is None:
            return None
        current = Allocation.from_json(alloc.ip, kv.value)
        return current if current.owner == alloc.owner and current.since == alloc.since else None

    def status(self) -> list[PoolStatus]:
        now = self.clock()
        with self._lock:
            return [
                PoolStatus(
                    p.subnet,
                    p.gateway,
                    p.total,
                    len(p.used),
                    p.cooling(now, self.cooldown),
                    p.conflicts(),
                )
                for p in sorted(self._pools.values(), key=lambda p: int(p.subnet.network_address))
            ]
