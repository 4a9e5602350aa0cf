"""IPAM state store: etcd's data model over pluggable backends (see `base`).

Callers use `open_store(url)` and the `Store` contract; `Keys` is the key schema.
"""

from ipamd.store.base import (
    Compare,
    Delete,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    StoreBase,
    StoreError,
    StoreIdentity,
    StoreUnavailable,
    TxnResult,
    WatchCompacted,
    WatchEvent,
)
from ipamd.store.keys import Keys
from ipamd.store.open import open_store

__all__ = [
    "Compare",
    "Delete",
    "KeyValue",
    "Keys",
    "LeaseNotFound",
    "Put",
    "Store",
    "StoreBase",
    "StoreError",
    "StoreIdentity",
    "StoreUnavailable",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "open_store",
]
