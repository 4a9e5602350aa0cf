"""The store's schema version: what a daemon may read, and moving an older store forward once.

The network config carries `schemaVersion`. A config without one is version 1 (moor before fixed
IPs and vxlan settings). A daemon refuses a store whose schema is newer than it knows (a clear
line, exit 1: a rolled-back daemon must not half-understand a newer layout), and moves an older
one forward, once, in place: under a store lock (`<prefix>/locks/schema`, create-if-absent on a
short store lease, so a daemon that dies mid-way frees it), it re-reads the config and writes it
back with the new version by compare-and-swap. Every step from one version to the next is a
function here; 1 -> 2 adds keys only (fixed/, sticky/, conflicts/, the vxlan settings with their
defaults), so it rewrites nothing but the version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ipamd.errors import ConfigMismatch
from ipamd.network_config import SCHEMA_VERSION
from ipamd.store.base import KeyValue, Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
LOCK_TTL = 30.0
LOCK_WAIT = 30.0

# version -> what moves a store from it to the next (none needed beyond the version yet)
STEPS: dict[int, Callable[[Store, Keys], None]] = {1: lambda store, keys: None}


def version_of(config: dict) -> int:
    value = config.get("schemaVersion", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigMismatch(f"the store's network config has a bad schemaVersion {value!r}")
    return value


def require_known(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigMismatch(
            f"the store's schema is version {version}, this moor-ipamd knows up to "
            f"{SCHEMA_VERSION}: run a newer moor-ipamd (a store is never moved back)"
        )


def upgrade(
    store: Store, keys: Keys, current: KeyValue, decode: Callable[[bytes], dict],
    encode: Callable[[dict], bytes], *, clock: Callable[[], float] = time.monotonic,
) -> KeyValue:  # fmt: skip
    """The config record, moved to SCHEMA_VERSION if it was older (under the lock)."""
    version = version_of(decode(current.value))
    require_known(version)
    if version == SCHEMA_VERSION:
        return current
    lock = keys.prefix + "/locks/schema"
    lease = store.grant_lease(LOCK_TTL)
    deadline = clock() + LOCK_WAIT
    try:
        while not store.create(lock, b"schema upgrade", lease=lease):
            if clock() > deadline:
                raise StoreError("another daemon has held the schema upgrade lock for too long")
            time.sleep(0.2)
        for _ in range(8):
            kv = store.get(keys.config())
            if kv is None:
                raise StoreError("the network config vanished during the schema upgrade")
            data = decode(kv.value)
            found = version_of(data)
            require_known(found)
            if found == SCHEMA_VERSION:  # another daemon did it while we waited
                return kv
            for step in range(found, SCHEMA_VERSION):
                STEPS[step](store, keys)
            data["schemaVersion"] = SCHEMA_VERSION
            if store.compare_and_swap(kv.key, encode(data), kv.mod_revision):
                log.warning("moved the store's schema from version %d to %d", found,
                            SCHEMA_VERSION)  # fmt: skip
                moved = store.get(keys.config())
                if moved is not None:
                    return moved
        raise StoreError("the network config kept changing during the schema upgrade")
    finally:
        store.delete(lock)
        try:
            store.revoke_lease(lease)
        except StoreError:
            pass
