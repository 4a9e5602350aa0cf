"""NodeIpam: the node's IPAM as one object, for the in-process CNI handlers and the gRPC service.

It composes the store, the subnet leases and the allocator, and answers the one question STATUS
asks: can this node serve ADD right now?

Callers of `allocate` and `release` hold the attachment's lock (`cni_plugin.attachments`): the CNI
verbs around their whole verb, the gRPC servicer around the call. What NodeIpam starts on its own
(the journal replay, the GC, the leak GC's release) takes the lock itself, one attachment at a
time, and re-checks under it, so it never acts on a snapshot that a verb has since changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from cni_plugin.attachments import WAIT, AttachmentBusy, AttachmentLocks
from ipamd.allocator import NodeAllocator
from ipamd.errors import NoLease, StoreRecovering
from ipamd.fixed.allocation import FixedAllocator
from ipamd.guard import StoreGuard
from ipamd.journal import ReleaseJournal
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Allocation, IPAddress, IPNetwork, Owner
from ipamd.pool import PoolStatus
from ipamd.store.base import Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


class AllocationTimer(Protocol):
    """What NodeIpam reports to (the daemon's Metrics): how long each allocation took, and why
    it failed."""

    def time_allocation(self) -> AbstractContextManager[None]: ...


@dataclass
class GarbageReport:
    """What one GC released, and one line per attachment it could not release."""

    released: list[Allocation] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class NodeIpam:
    def __init__(
        self,
        store: Store,
        node: str,
        leases: SubnetLeaseManager,
        allocator: NodeAllocator,
        metrics: AllocationTimer | None = None,
        *,
        journal: ReleaseJournal | None = None,
        store_grace: float = 30.0,
        locks: AttachmentLocks | None = None,
        guard: StoreGuard | None = None,
        fixed: FixedAllocator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fixed = fixed  # fixed IPs (reservations, sticky pods, requested fixed-range IPs)
        self.guard = guard
        self.locks = locks or AttachmentLocks()
        self.node = node
        self.leases = leases
        self.allocator = allocator
        self.metrics = metrics
        self.journal = journal
        self.store_grace = store_grace
        self.clock = clock
        self._store_down_since: float | None = None

    @property
    def network(self) -> IPNetwork:
        return self.leases.config.network

    def allocate(
        self,
        owner: Owner,
        *,
        netns: str = "",
        netns_inode: int = 0,
        host_veth: str = "",
        requested: IPAddress | None = None,
    ) -> tuple[Allocation, bool]:
        timer = self.metrics.time_allocation() if self.metrics is not None else nullcontext()
        with timer:  # a missing lease counts as an "unavailable" allocation failure
            if self.guard is not None and (why := self.guard.reason()) is not None:
                raise StoreRecovering(why)
            if not self.leases.has_lease():
                raise NoLease(f"node {self.node} holds no subnet lease")
            if self.journal is not None and owner.handle in self.journal:
                # The DEL before this ADD comes first (it needs the store, like the ADD does).
                self._release_now(owner.handle)
                self.journal.done(owner.handle)
            choice = self.fixed.choose(owner, requested) if self.fixed is not None else None
            if self.fixed is not None and choice is not None:
                claimed = self.fixed.claim(
                    owner, choice, host_veth=host_veth, netns=netns, netns_inode=netns_inode
                )
                return claimed.allocation, claimed.existed
            return self.allocator.allocate(
                owner,
                netns=netns,
                netns_inode=netns_inode,
                host_veth=host_veth,
                requested=requested,
            )

    def release(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        """Owner-checked release; while the store is unreachable, journaled and applied later."""
        handle = (network, container_id, ifname)
        try:
            alloc = self._release_now(handle)
        except StoreUnavailable:
            if self.journal is None:
                raise
            alloc = self.lookup(*handle)
            self.journal.record(handle, str(alloc.ip) if alloc else "")
            log.warning("store unreachable: release of %s journaled for retry", "/".join(handle))
            return alloc
        if self.journal is not None:
            self.journal.done(handle)
        return alloc

    def _release_now(self, handle: tuple[str, str, str]) -> Allocation | None:
        """A fixed IP the node hosts goes through its binding; any other through the allocator."""
        if self.fixed is not None and self.fixed.get(handle) is not None:
            return self.fixed.release(handle)
        return self.allocator.release(*handle)

    def replay_journal(self) -> int:
        """Apply journaled releases; stop at the first that still cannot reach the store.

        Each entry is re-read under its attachment's lock: an ADD that took the handle back (and
        applied the entry itself) or a newer DEL that journaled it again wins over this snapshot.
        An attachment busy with a verb is left for the next round. Returns how many are left.
        """
        if self.journal is None:
            return 0
        for entry in self.journal.pending():
            key = (entry.handle[1], entry.handle[2])
            try:
                self.locks.acquire(key, timeout=0)
            except AttachmentBusy:
                continue
            try:
                if self.journal.entry(entry.handle) != entry:
                    continue
                alloc = self._release_now(entry.handle)
                self.journal.done(entry.handle)
            except StoreUnavailable:
                break
            finally:
                self.locks.release(key)
            log.info(
                "journaled release of %s applied%s",
                "/".join(entry.handle),
                f": {alloc.ip} freed" if alloc else " (it held no IP any more)",
            )
        return len(self.journal)

    def release_if_unchanged(self, alloc: Allocation) -> bool:
        """Release `alloc` only if the store still holds exactly it (leak GC re-validation)."""
        with self.locks.hold(alloc.owner.attachment, WAIT):
            if self.allocator.stored(alloc) is None:
                return False
            return self._release_now(alloc.owner.handle) is not None

    def collect_garbage(
        self,
        network: str,
        keep: frozenset[tuple[str, str]] | set[tuple[str, str]],
        before_release: Callable[[str], object] | None = None,
    ) -> GarbageReport:
        """The one GC path (CNI GC and the gRPC GC): release every allocation of `network` whose
        (container ID, ifname) is not in `keep`, each owner-checked under its attachment's lock;
        `before_release(host_veth)` runs first for those with a host veth (the CNI GC deletes it).
        Goes on past failures."""
        report = GarbageReport()
        for alloc in self.allocations(network):
            if alloc.owner.attachment in keep:
                continue
            try:
                with self.locks.hold(alloc.owner.attachment, WAIT):
                    if self.lookup(*alloc.owner.handle) != alloc:
                        continue  # released or replaced while we waited
                    if before_release is not None and alloc.host_veth:
                        before_release(alloc.host_veth)
                    if self.release(*alloc.owner.handle) is not None:
                        report.released.append(alloc)
                        log.info("GC released %s of %s", alloc.ip, "/".join(alloc.owner.handle))
            except Exception as exc:  # noqa: BLE001 - GC goes on and reports every failure
                report.failures.append(f"{alloc.ip}: {exc}")
        return report

    def mark_conflict(self, ip: IPAddress, mac: str, network: str) -> None:
        """Another host answered the ARP probe for `ip`: record it, never hand `ip` out again
        until an operator clears it (`ipamd/conflicts.py`)."""
        self.allocator.mark_conflict(ip, mac, network)

    def lookup(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        handle = (network, container_id, ifname)
        fixed = self.fixed.get(handle) if self.fixed is not None else None
        return fixed or self.allocator.get(*handle)

    def allocations(self, network: str | None = None) -> list[Allocation]:
        fixed = self.fixed.allocations(network) if self.fixed is not None else []
        return self.allocator.allocations(network) + fixed

    def pools(self) -> list[PoolStatus]:
        return self.allocator.status()

    def not_ready_reason(self) -> str | None:
        """Why ADD cannot be served at all, or None. A full subnet is NOT a reason (see SPEC-NOTES).

        An unreachable store counts only after `store_grace` seconds, so an etcd leader election
        does not flap the node to NotReady (ADD still answers "try again later" meanwhile).
        """
        try:
            if self.guard is not None:
                self.guard.probe()  # the same one read, and it notices a store that lost data
            else:
                self.store.ping()
            self._store_down_since = None
        except StoreError as exc:
            now = self.clock()
            if self._store_down_since is None:
                self._store_down_since = now
            down = now - self._store_down_since
            if down >= self.store_grace:
                return f"IPAM store is unreachable (for {down:.0f} s): {exc}"
        if self.guard is not None and (why := self.guard.reason()) is not None:
            return why
        if not self.leases.has_lease():
            return f"node {self.node} holds no subnet lease"
        return None
