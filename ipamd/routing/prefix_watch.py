"""Follow one key prefix of the store as a snapshot: the input of the route reconcile.

List, then watch from the listing's revision + 1. On compaction or any error: list again and diff
by key *and value* against what was known, so an entry that changed during the gap (a peer's new
public IP or MAC under the same subnet, a fixed IP that moved) is applied; flannel's re-list
compares subnets only and loses exactly that. The whole snapshot, with the revision it is valid
at, goes to `on_change` after every change (the reconcile is level-triggered); `on_diff` hears
what changed, for logs and for the lease manager. The first listing is not a change: it is logged
as one line (a daemon of a 5000-node cluster used to log 5000 lines at every start).

Locks: the snapshot is owned by the watcher's thread (and `load`, called before it starts); the
callbacks get copies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

from ipamd.store.base import Store, StoreError

log = logging.getLogger(__name__)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PrefixWatcher(Generic[K, V]):
    def __init__(
        self,
        store: Store,
        prefix: str,
        parse_key: Callable[[str], K | None],
        parse_value: Callable[[K, bytes], V],
        *,
        what: str,
        on_change: Callable[[Mapping[K, V], int], None] = lambda snapshot, revision: None,
        on_diff: Callable[[K, V | None, V | None], None] = lambda key, old, new: None,
        on_revision: Callable[[int], None] = lambda revision: None,
        on_relist: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.parse_key = parse_key
        self.parse_value = parse_value
        self.what = what  # "lease", "fixed IP": for the log
        self.on_change = on_change  # set by the route reconcile when the node routes
        self.on_diff = on_diff  # (key, old, new): None for absent
        self.on_revision = on_revision  # the store guard's rollback detection
        self.on_relist = on_relist  # metrics
        self._items: dict[K, V] = {}
        self._raw: dict[K, bytes] = {}
        self._loaded = False
        self.revision = 0  # of the snapshot held now

    def snapshot(self) -> dict[K, V]:
        return dict(self._items)

    def load(self) -> int:
        """List the prefix; hand the snapshot over; the revision to watch after."""
        items, revision = self.store.list_prefix(self.prefix)
        fresh: dict[K, bytes] = {}
        for kv in items:
            key = self.parse_key(kv.key)
            if key is not None:
                fresh[key] = kv.value
        self._replace(fresh, revision)
        return revision

    def run(self, revision: int, stop: threading.Event) -> None:
        """Watch from `revision` + 1; re-list after any break; until `stop`."""
        backoff = BACKOFF_MIN
        while not stop.is_set():
            try:
                for event in self.store.watch(self.prefix, revision + 1, stop):
                    self.on_revision(event.revision)
                    self._apply(event.kind, event.key, event.value, event.revision)
                    revision = event.revision
                    backoff = BACKOFF_MIN
                return
            except StoreError as exc:
                log.info("%s watch interrupted (%s); listing again", self.what, exc)
            while not stop.wait(backoff):
                backoff = min(BACKOFF_MAX, backoff * 2)
                try:
                    revision = self.load()
                    self.on_relist()
                    break
                except StoreError as exc:
                    log.info("%s listing failed (%s); retrying", self.what, exc)

    def _apply(self, kind: str, key: str, value: bytes, revision: int) -> None:
        parsed = self.parse_key(key)
        if parsed is None:
            return
        fresh = dict(self._raw)
        if kind == "delete":
            fresh.pop(parsed, None)
        else:
            fresh[parsed] = value
        self._replace(fresh, revision)

    def _replace(self, fresh: dict[K, bytes], revision: int) -> None:
        """Adopt `fresh` (raw values by key) as of `revision`: report what changed, by key and
        value, then the whole snapshot."""
        self.revision = revision
        if fresh == self._raw and self._loaded:
            return
        first, self._loaded = not self._loaded, True
        old = self._items
        items: dict[K, V] = {}
        for key, value in fresh.items():
            if self._raw.get(key) == value and key in old:
                items[key] = old[key]  # unchanged: not parsed again
                continue
            try:
                items[key] = self.parse_value(key, value)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s %s is unreadable, ignored: %s", self.what, key, exc)
        if first:
            log.info("%d %s record(s) listed at revision %d", len(items), self.what, revision)
        else:
            for key in old.keys() - items.keys():
                self.on_diff(key, old[key], None)
            for key, item in items.items():
                if old.get(key) != item:
                    self.on_diff(key, old.get(key), item)
        self._raw, self._items = fresh, items
        self.on_change(dict(items), revision)
