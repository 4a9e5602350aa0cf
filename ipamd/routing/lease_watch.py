"""The two watchers the route reconcile feeds on: every node's subnet leases and every fixed-IP
binding (`prefix_watch.py` does the listing, watching and diffing).

A lease of this node's own that vanishes is reported to the lease manager (`on_own_deleted`),
which tells an admin's removal from a loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ipamd.fixed.model import FixedBinding
from ipamd.model import IPAddress, IPNetwork, SubnetLease
from ipamd.routing.prefix_watch import PrefixWatcher
from ipamd.store.base import Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)

LeaseWatcher = PrefixWatcher[IPNetwork, SubnetLease]
FixedWatcher = PrefixWatcher[IPAddress, FixedBinding]


def lease_watcher(
    store: Store,
    keys: Keys,
    node: str,
    *,
    on_own_deleted: Callable[[IPNetwork], None] = lambda subnet: None,
    on_revision: Callable[[int], None] = lambda revision: None,
    on_relist: Callable[[], None] = lambda: None,
) -> LeaseWatcher:
    def diff(subnet: IPNetwork, old: SubnetLease | None, new: SubnetLease | None) -> None:
        if new is None:
            assert old is not None
            log.info("lease %s of node %s is gone", subnet, old.node)
            if old.node == node:
                on_own_deleted(subnet)
        elif old is None:
            log.info("lease %s: node %s at %s", subnet, new.node, new.public_ip or "-")
        else:
            log.info("lease %s changed: node %s at %s %s", subnet, new.node, new.public_ip,
                     new.backend)  # fmt: skip

    return PrefixWatcher(
        store, keys.subnets_prefix(), keys.parse_subnet, SubnetLease.from_json, what="lease",
        on_diff=diff, on_revision=on_revision, on_relist=on_relist,
    )  # fmt: skip


def fixed_watcher(
    store: Store,
    keys: Keys,
    *,
    on_revision: Callable[[int], None] = lambda revision: None,
    on_relist: Callable[[], None] = lambda: None,
) -> FixedWatcher:
    def diff(ip: IPAddress, old: FixedBinding | None, new: FixedBinding | None) -> None:
        if new is None or (old is not None and (old.node, old.handle) == (new.node, new.handle)):
            return
        if new.held:
            log.info("fixed IP %s of %s is on node %s", ip, new.identity.text, new.node)

    return PrefixWatcher(
        store, keys.fixed_prefix(), keys.parse_fixed, FixedBinding.from_json, what="fixed IP",
        on_diff=diff, on_revision=on_revision, on_relist=on_relist,
    )  # fmt: skip
