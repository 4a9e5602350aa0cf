"""Every node's subnet leases, followed from the store: the input of the route reconcile.

List, then watch from the listing's revision + 1. On compaction or any error: list again and diff
by key *and value* against what was known, so a lease that changed during the gap (a peer's new
public IP or MAC under the same subnet) is applied; flannel's re-list compares subnets only and
loses exactly that. The whole snapshot goes to the reconcile after every change (it is
level-triggered); the diff is for the log. A lease of this node's that vanished is reported to
the lease manager (`on_own_deleted`), which tells an admin's removal from a loss.

Locks: the snapshot is owned by the watcher's thread (and `load`, called before it starts); the
callbacks get copies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from ipamd.model import IPNetwork, SubnetLease
from ipamd.store.base import Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


class LeaseWatcher:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        node: str,
        *,
        on_change: Callable[[Mapping[IPNetwork, SubnetLease]], None] = lambda snapshot: None,
        on_own_deleted: Callable[[IPNetwork], None] = lambda subnet: None,
        on_revision: Callable[[int], None] = lambda revision: None,
        on_relist: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.on_change = on_change  # set by the route reconcile when the node routes
        self.on_own_deleted = on_own_deleted
        self.on_revision = on_revision  # the store guard's rollback detection
        self.on_relist = on_relist  # metrics
        self._leases: dict[IPNetwork, SubnetLease] = {}
        self._raw: dict[IPNetwork, bytes] = {}

    def snapshot(self) -> dict[IPNetwork, SubnetLease]:
        return dict(self._leases)

    def load(self) -> int:
        """List every lease; hand the snapshot over; the revision to watch after."""
        items, revision = self.store.list_prefix(self.keys.subnets_prefix())
        fresh: dict[IPNetwork, bytes] = {}
        for kv in items:
            subnet = self.keys.parse_subnet(kv.key)
            if subnet is not None:
                fresh[subnet] = kv.value
        self._replace(fresh)
        return revision

    def run(self, revision: int, stop: threading.Event) -> None:
        """Watch from `revision` + 1; re-list after any break; until `stop`."""
        backoff = BACKOFF_MIN
        while not stop.is_set():
            try:
                for event in self.store.watch(self.keys.subnets_prefix(), revision + 1, stop):
                    self.on_revision(event.revision)
                    self._apply(event.kind, event.key, event.value)
                    revision = event.revision
                    backoff = BACKOFF_MIN
                return
            except StoreError as exc:
                log.info("lease watch interrupted (%s); listing again", exc)
            while not stop.wait(backoff):
                backoff = min(BACKOFF_MAX, backoff * 2)
                try:
                    revision = self.load()
                    self.on_relist()
                    break
                except StoreError as exc:
                    log.info("lease listing failed (%s); retrying", exc)

    def _apply(self, kind: str, key: str, value: bytes) -> None:
        subnet = self.keys.parse_subnet(key)
        if subnet is None:
            return
        fresh = dict(self._raw)
        if kind == "delete":
            fresh.pop(subnet, None)
        else:
            fresh[subnet] = value
        self._replace(fresh)

    def _replace(self, fresh: dict[IPNetwork, bytes]) -> None:
        """Adopt `fresh` (raw values by subnet): log and report what changed, by key and value."""
        if fresh == self._raw and self._leases:
            return
        old = self._leases
        leases: dict[IPNetwork, SubnetLease] = {}
        for subnet, value in fresh.items():
            if self._raw.get(subnet) == value and subnet in old:
                leases[subnet] = old[subnet]  # unchanged: not parsed again
                continue
            try:
                leases[subnet] = SubnetLease.from_json(subnet, value)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("lease %s is unreadable, ignored: %s", subnet, exc)
        for subnet in old.keys() - leases.keys():
            log.info("lease %s of node %s is gone", subnet, old[subnet].node)
            if old[subnet].node == self.node:
                self.on_own_deleted(subnet)
        for subnet, lease in leases.items():
            if subnet not in old:
                log.info("lease %s: node %s at %s", subnet, lease.node, lease.public_ip or "-")
            elif old[subnet] != lease:
                log.info(
                    "lease %s changed: node %s at %s %s", subnet, lease.node, lease.public_ip,
                    lease.backend,
                )  # fmt: skip
        self._raw, self._leases = fresh, leases
        self.on_change(dict(leases))
