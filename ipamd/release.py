"""Release transactions, shared by the node's allocator and the cluster-wide Admin operations.

Every release compares revisions: the IP record must be exactly the one the decision was made on,
and it goes only when its owner matches the handle. So a stale or racing release never frees an IP
that someone else holds now.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable

from ipamd.model import Allocation, IPAddress
from ipamd.store.base import Compare, Delete, Put, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
TXN_RETRIES = 16  # attempts of a transaction that keeps losing races before giving up


def free_ip_ops(
    keys: Keys, ip: IPAddress, mod_revision: int, *, node: str, now: float
) -> tuple[list[Compare], list[Put | Delete]]:
    """The IP half of every release txn: the record is unchanged; delete it; start its cooldown."""
    return [Compare(keys.ip(ip), mod_revision)], [
        Delete(keys.ip(ip)),
        Put(keys.released(ip), json.dumps({"releasedAt": now, "node": node}).encode()),
    ]


def release_handle(
    store: Store,
    keys: Keys,
    handle: tuple[str, str, str],
    *,
    node: str,
    clock: Callable[[], float] = time.time,
) -> Allocation | None:
    """Free the IP `handle` holds in one txn comparing the handle's and the IP record's revisions.

    None if the handle held nothing. A handle whose IP now belongs to someone else loses only the
    handle, so a stale release never frees another pod's IP. `node` is who released (recorded).
    """
    handle_key = keys.handle(*handle)
    for _ in range(TXN_RETRIES):
        hkv = store.get(handle_key)
        if hkv is None:
            return None
        try:
            ip = ipaddress.ip_address(hkv.value.decode())
        except ValueError:
            ip = None
        compares = [Compare(handle_key, hkv.mod_revision)]
        ops: list[Put | Delete] = [Delete(handle_key)]
        alloc = None
        if ip is not None and (ikv := store.get(keys.ip(ip))) is not None:
            candidate = Allocation.from_json(ip, ikv.value)
            if candidate.owner.handle == handle:
                alloc = candidate
                more_compares, more_ops = free_ip_ops(
                    keys, ip, ikv.mod_revision, node=node, now=clock()
                )
                compares += more_compares
                ops += more_ops
            else:
                log.warning(
                    "handle %s points at %s, which %s now holds: dropping only the handle",
                    handle,
                    ip,
                    candidate.owner.handle,
                )
        if store.txn(compares, ops).succeeded:
            return alloc
    raise RuntimeError(f"release of {handle} kept conflicting")
