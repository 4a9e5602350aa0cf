"""Follow the store: changes other daemons or moorctl make to this node's IPs and subnet leases.

The allocator keeps its free set in memory (an allocation is one round trip, not a scan), so a
release done elsewhere — `moorctl release`, `moorctl node remove` through another node's daemon —
must reach that memory, or the IP stays "used" here until a restart. One watch on the key prefix
does it. When the watch breaks (store unreachable, history compacted) the allocator is reloaded
from a fresh listing and the watch resumes from there, so no change is missed.
"""

from __future__ import annotations

import logging
import threading

from ipamd.allocator import NodeAllocator
from ipamd.leases import SubnetLeaseManager
from ipamd.store.base import Store, StoreError
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
        stop: threading.Event,
    ) -> None:
        self.store = store
        self.keys = keys
        self.leases = leases
        self.allocator = allocator
        self.stop = stop

    def run(self, start_revision: int) -> None:
        """Watch from `start_revision` (the revision the allocator was loaded at, + 1)."""
        revision = start_revision
        while not self.stop.is_set():
            try:
                for event in self.store.watch(self.keys.prefix + "/", revision, self.stop):
                    self._apply(event.kind, event.key)
                    revision = event.revision + 1
                return
            except StoreError as exc:
                log.info("store watch interrupted (%s); reloading", exc)
            while not self.stop.wait(RETRY):
                try:
                    revision = self.store.revision() + 1
                    self.allocator.load()
                    break
                except StoreError:
                    continue

    def _apply(self, kind: str, key: str) -> None:
        ip = self.keys.parse_ip(key)
        if ip is not None:
            self.allocator.observe(kind, ip)
            return
        subnet = self.keys.parse_subnet(key)
        if subnet is not None and kind == "delete":
            self.leases.observe_deleted(subnet)
