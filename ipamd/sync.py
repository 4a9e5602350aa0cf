"""Follow the store: changes other daemons or moorctl make to this node's IPs and subnet leases.

The allocator keeps its free set in memory (an allocation is one round trip, not a scan), so a
release done elsewhere — `moorctl release`, `moorctl node remove` through another node's daemon —
must reach that memory, or the IP stays "used" here until a restart. One watch on the key prefix
does it. When the watch breaks (store unreachable, history compacted, etcd restarted) the store
guard first compares this node's memory with the store, so that records the store lost are put
back rather than taken for released (`guard.py`); then the allocator reloads from a fresh
listing and the watch resumes from there, so no change is missed.
"""

from __future__ import annotations

import logging
import threading

from ipamd.allocator import NodeAllocator
from ipamd.guard import StoreGuard
from ipamd.leases import SubnetLeaseManager
from ipamd.store.base import Store, StoreError, StoreUnavailable
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
RETRY = 1.0


class StoreFollower:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        leases: SubnetLeaseManager,
        allocator: NodeAllocator,
        guard: StoreGuard,
        stop: threading.Event,
    ) -> None:
        self.store = store
        self.keys = keys
        self.leases = leases
        self.allocator = allocator
        self.guard = guard
        self.stop = stop

    def run(self, start_revision: int) -> None:
        """Watch from `start_revision` (the revision the allocator was loaded at, + 1)."""
        revision = start_revision
        while not self.stop.is_set():
            try:
                for event in self.store.watch(self.keys.prefix + "/", revision, self.stop):
                    self.guard.saw_revision(event.revision)
                    self._apply(event.kind, event.key)
                    revision = event.revision + 1
                return
            except StoreError as exc:
                log.info("store watch interrupted (%s); verifying and reloading", exc)
            while not self.stop.wait(RETRY):
                try:
                    revision = self.guard.resync() + 1
                    break
                except StoreUnavailable:
                    continue
                except StoreError as exc:
                    log.warning("store resync not finished, retrying: %s", exc)

    def _apply(self, kind: str, key: str) -> None:
        ip = self.keys.parse_ip(key)
        if ip is not None:
            self.allocator.observe(kind, ip)
            return
        subnet = self.keys.parse_subnet(key)
        if subnet is not None and kind == "delete":
            self.leases.observe_deleted(subnet)
