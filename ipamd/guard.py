"""Store-loss guard: tell a store that lost data from one changed on purpose, and put back what
this node knows to be live, so that no IP a running pod holds is ever handed out again.

A store can lose data under a running cluster: an etcd restored from an older backup, a wiped
data dir, another cluster behind the same address. Without this guard a daemon takes every
vanished record for "released elsewhere" and hands the IPs out again. Signals of a loss:
- `probe` (every timer tick and every CNI STATUS; the one read that used to be a ping): the
  network config is gone, or names another cluster ID than the one this node remembers; the
  store answers as another cluster; its revision went below one already seen (rolled back);
- `verify` (when the store follower lost its watch, before it reloads): a subnet key of ours gone
  without a removal record (`moorctl node remove` writes one), or an IP record of ours gone
  without a release record newer than the allocation (`moorctl release` writes one).

On a loss the node stops allocating (ADD answers 11, STATUS 50 saying why) and re-asserts, each
step create-if-absent (`reassert.py`): the network config, its subnet leases
(`SubnetLeaseManager.reassert`), then the allocation of every pod whose netns or host veth still
exists, with its owner. An allocation whose pod is gone is forgotten (the leak GC would free it
anyway). What another node holds by now is a conflict: logged loudly, counted, listed in `moorctl
status`, and never allocated from. Then the node serves again. At start, a daemon also puts back
what the host veths record and the store lost while it was down (`restore_from_kernel`).

Locks: `_lock` guards the loss state, the identity seen and the conflict list (held briefly);
`_recovery` serialises verify, recovery and the follower's reload (the timer thread and the
follower thread both come here). Allocations are re-asserted under their attachment's lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from cni_plugin.attachments import AttachmentLocks
from cni_plugin.kernel_record import AttachmentRecord
from ipamd.allocator import NodeAllocator
from ipamd.fixed.allocation import FixedAllocator
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Allocation, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.reassert import Reasserter
from ipamd.store.base import Store, StoreError, StoreIdentity, StoreUnavailable
from ipamd.store.keys import Keys, covering_prefixes

log = logging.getLogger(__name__)
KEEP_CONFLICTS = 50


class StoreGuard:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        leases: SubnetLeaseManager,
        allocator: NodeAllocator,
        *,
        locks: AttachmentLocks,
        host_links: Callable[[], set[str]],
        kernel_records: Callable[[], dict[str, AttachmentRecord]] = dict,
        on_recovery: Callable[[], None] = lambda: None,
        on_conflict: Callable[[str, str], None] = lambda kind, sentence: None,
        fixed: FixedAllocator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.leases = leases
        self.allocator = allocator
        self.locks = locks
        self.on_recovery = on_recovery
        self.on_conflict = on_conflict
        self.clock = clock
        self._lock = threading.Lock()
        self._recovery = threading.Lock()
        self._lost: str | None = None
        self._identity: StoreIdentity | None = None
        self._max_revision = 0
        self.conflicts: deque[str] = deque(maxlen=KEEP_CONFLICTS)
        self.reasserter = Reasserter(
            store,
            keys,
            leases,
            allocator,
            locks=locks,
            host_links=host_links,
            kernel_records=kernel_records,
            conflict=self.conflict,
            fixed=fixed,
            clock=clock,
        )

    @property
    def node(self) -> str:
        return self.leases.node

    # ---- state ------------------------------------------------------------------------------
    def reason(self) -> str | None:
        """Why the node does not allocate right now, or None."""
        with self._lock:
            lost = self._lost
        return None if lost is None else f"re-asserting this node's state: {lost}"

    def conflict(self, kind: str, sentence: str) -> None:
        """Record a conflict (also those the lease manager meets): status, metrics, log."""
        log.error("CONFLICT: %s", sentence)
        with self._lock:
            self.conflicts.append(sentence)
        self.on_conflict(kind, sentence)

    def _flag(self, why: str) -> None:
        with self._lock:
            first = self._lost is None
            self._lost = self._lost or why
        if first:
            log.error("STORE LOSS on node %s: %s; allocation stops until it is re-asserted",
                      self.node, why)  # fmt: skip

    def saw_revision(self, revision: int) -> None:
        with self._lock:
            self._max_revision = max(self._max_revision, revision)

    # ---- detection --------------------------------------------------------------------------
    def probe(self) -> StoreIdentity:
        """One read of the network config with the store's identity, which it returns.
        StoreError propagates (the caller counts an unreachable store); a loss is flagged, not
        recovered here."""
        with self._lock:  # before the read: every revision seen so far is at most the read's
            known, highest = self._identity, self._max_revision
        kv, identity = self.store.get_with_identity(self.keys.config())
        with self._lock:
            self._identity = self._identity or identity
            self._max_revision = max(self._max_revision, identity.revision)
        if known is not None and identity.cluster != known.cluster:
            self._flag(f"the store answers as cluster {identity.cluster}, not {known.cluster}")
        elif identity.revision < highest:
            self._flag(
                f"the store's revision went back from {highest} to {identity.revision} "
                "(restored from an older backup?)"
            )
        ours = self.leases.config.cluster_id
        if kv is None:
            self._flag("the network config is gone from the store")
        elif (stored := NetworkConfig.from_json(kv.value).cluster_id) and stored != ours:
            self._flag(f"the store's network config is cluster {stored}, this node's is {ours}")
        return identity

    def verify(self) -> None:
        """Compare this node's subnets and allocations with the store's records (before the
        follower reloads from the store, which would take them for released)."""
        removal = self.store.get(self.keys.removal(self.node))
        subnets = self.leases.subnets
        for subnet in subnets:
            kv = self.store.get(self.keys.subnet(subnet))
            holder = SubnetLease.from_json(subnet, kv.value).node if kv is not None else None
            if holder != self.node:
                if holder is None and removal is not None:
                    self.leases.observe_deleted(subnet)  # an admin removed it: stays removed
                else:
                    self._flag(
                        f"subnet lease {subnet} is {'held by ' + holder if holder else 'gone'}"
                    )
        held = self.leases.subnets  # without any an admin removed just now
        # Memory first, then the store: an allocation committed after this snapshot cannot be
        # missed by the listing and taken for lost; one committed before is in it.
        known = [
            a
            for a in self.allocator.allocations()
            if a.subnet in held and not self.allocator.in_flight(a.ip)
        ]
        records = {
            kv.key: kv
            for prefix in covering_prefixes(self.keys.ips_prefix_for(s) for s in held)
            for kv in self.store.list_prefix(prefix)[0]
        }
        for alloc in known:
            kv = records.get(self.keys.ip(alloc.ip))
            if kv is None and not self._released_since(alloc):
                self._flag(f"the record of {alloc.ip} ({'/'.join(alloc.owner.handle)}) is gone")
            elif kv is not None and Allocation.from_json(alloc.ip, kv.value).owner != alloc.owner:
                self._flag(f"the record of {alloc.ip} names another owner than this node's pod")

    def _released_since(self, alloc: Allocation) -> bool:
        """A release record newer than the allocation: someone released it on purpose."""
        kv = self.store.get(self.keys.released(alloc.ip))
        if kv is None:
            return False
        try:
            return float(json.loads(kv.value).get("releasedAt", 0)) >= alloc.since
        except (ValueError, TypeError, AttributeError):
            return False

    # ---- entry points -----------------------------------------------------------------------
    def check(self) -> None:
        """The timer's tick: probe, and re-assert if anything says the store lost data. An
        unreachable store is not news here (STATUS and health count it); a re-assertion that
        cannot finish yet is retried at the next tick."""
        with self._recovery:
            try:
                self.probe()
                self._recover_if_lost()
            except StoreUnavailable as exc:
                log.debug("store check: %s", exc)
            except StoreError as exc:
                log.warning("re-assertion of node %s not finished: %s", self.node, exc)

    def resync(self) -> int:
        """The store follower lost its watch: verify, re-assert if needed, then reload the
        allocator from the store. Returns the revision to watch from (exclusive)."""
        with self._recovery:
            revision = self.probe().revision  # changes after it come through the watch
            self.verify()
            self._recover_if_lost()
            self.allocator.load()
            return revision

    def restore_from_kernel(self) -> int:
        """At start, after the allocator loaded the store: put back every allocation the host's
        veths record and the store does not hold (it lost them while the daemon was down, so no
        memory knows them either). Returns how many; the caller reloads the allocator."""
        with self._recovery:
            restored = self.reasserter.from_kernel()
        if restored:
            self.on_recovery()
        return restored

    # ---- re-assertion -----------------------------------------------------------------------
    def _recover_if_lost(self) -> None:
        with self._lock:
            why = self._lost
        if why is None:
            return
        log.warning("node %s re-asserts its state: %s", self.node, why)
        self.reasserter.config()
        self.leases.reassert()
        pending = self.reasserter.allocations()
        if pending:
            raise StoreError(f"{pending} allocation(s) busy or failing; re-asserting again soon")
        _, identity = self.store.get_with_identity(self.keys.config())
        with self._lock:
            self._identity, self._max_revision, self._lost = identity, identity.revision, None
        log.warning("node %s re-asserted its state after: %s; allocating again", self.node, why)
        self.on_recovery()
