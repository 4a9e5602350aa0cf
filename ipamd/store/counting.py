"""A `Store` wrapper that reports every StoreError its backend raises, by store method.

The daemon wraps its store in one so that `moor_store_errors_total{op}` counts failures where they
happen, without every caller counting them; the wrapper changes nothing else (it re-raises).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from ipamd.store.base import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Store,
    StoreError,
    StoreIdentity,
    TxnResult,
    WatchEvent,
)

P = ParamSpec("P")
R = TypeVar("R")


def _counted(
    method: Callable[Concatenate[CountingStore, P], R],
) -> Callable[Concatenate[CountingStore, P], R]:
    op = method.__name__

    @functools.wraps(method)
    def wrapper(self: CountingStore, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            self.on_error(op)
            raise

    wrapper.counted = True  # type: ignore[attr-defined]
    return wrapper


class CountingStore:
    """A `Store` that reports every StoreError its backend raises (by method) and re-raises it."""

    def __init__(self, store: Store, on_error: Callable[[str], None]) -> None:
        self.store = store
        self.on_error = on_error

    @_counted
    def get(self, key: str) -> KeyValue | None:
        return self.store.get(key)

    @_counted
    def get_with_identity(self, key: str) -> tuple[KeyValue | None, StoreIdentity]:
        return self.store.get_with_identity(key)

    @_counted
    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return self.store.list_prefix(prefix)

    @_counted
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self.store.put(key, value, lease)

    @_counted
    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        return self.store.create(key, value, lease)

    @_counted
    def compare_and_swap(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> bool:
        return self.store.compare_and_swap(key, value, mod_revision, lease)

    @_counted
    def compare_and_delete(self, key: str, mod_revision: int) -> bool:
        return self.store.compare_and_delete(key, mod_revision)

    @_counted
    def delete(self, key: str) -> bool:
        return self.store.delete(key)

    @_counted
    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        return self.store.txn(compares, ops)

    @_counted
    def revision(self) -> int:
        return self.store.revision()

    @_counted
    def grant_lease(self, ttl: float) -> int:
        return self.store.grant_lease(ttl)

    @_counted
    def refresh_lease(self, lease_id: int) -> float:
        return self.store.refresh_lease(lease_id)

    @_counted
    def revoke_lease(self, lease_id: int) -> None:
        self.store.revoke_lease(lease_id)

    @_counted
    def lease_ttl_remaining(self, lease_id: int) -> float | None:
        return self.store.lease_ttl_remaining(lease_id)

    @_counted
    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        return self._watch(self.store.watch(prefix, start_revision, stop))

    def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        """Counted as a `watch`: one series for the store watch, whatever its shape."""
        try:
            events = self.store.watch_prefixes(prefixes, start_revision, stop)
        except StoreError:
            self.on_error("watch")
            raise
        return self._watch(events)

    def _watch(self, events: Iterator[WatchEvent]) -> Iterator[WatchEvent]:
        try:
            yield from events
        except StoreError:
            self.on_error("watch")
            raise

    @_counted
    def ping(self) -> None:
        self.store.ping()

    @_counted
    def close(self) -> None:
        self.store.close()


# The store methods counted, for the metric's label values (one series each from the start).
STORE_OPS = tuple(
    name for name, member in vars(CountingStore).items() if getattr(member, "counted", False)
)
