"""The store contract: etcd v3's data model, so SQLite and etcd backends are interchangeable.

Callers (the allocator, the lease keeper, the store follower, the cluster operations) program
against `Store` only. The model is etcd 3.4's on purpose, because that is the weakest backend we
intend to support:

* one global revision, bumped by exactly one per write transaction that changes something;
* per key a `create_revision` (revision of the put that created it) and a `mod_revision`
  (revision of its last put);
* multi-key transactions guarded by compares on `mod_revision`, where 0 means "must not exist";
* TTL leases: keys attached to a lease are deleted, as an ordinary revision, when it expires;
* watch from a revision, over one key prefix or several in one stream, bounded by compaction
  (`WatchCompacted`).

A backend implements the small core in `StoreBase` (`get`, `list_prefix`, `txn`, leases,
`watch_prefixes`, `ping`, `close`); the single-key helpers and the one-prefix `watch` here are
written on top of it so that they have the same semantics everywhere.

Request deadlines: a store call made while serving a CNI request must not outlive the request.
The daemon sets the request's expiry with `request_deadline()` around the handler (a contextvar:
each worker thread serves one request at a time; timers and replays run without one), and every
backend caps its waits with `call_timeout()`: etcd's per-RPC timeout, SQLite's wait for its lock
and its busy wait. Past the expiry a call raises StoreUnavailable at once, so ADD answers 11 and
DEL journals its release, as for any unreachable store.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, runtime_checkable

from ipamd.store.keys import covering_prefixes


class StoreError(Exception):
    """Base of every error a store raises on purpose."""


class StoreUnavailable(StoreError):
    """The backend cannot serve right now (unreachable, locked, timed out, closed).

    Transient by definition: the CNI layer maps it to code 11 ("try again later").
    """


class LeaseNotFound(StoreError):
    """The lease does not exist: never granted, revoked, or already expired."""


class WatchCompacted(StoreError):
    """The watch start revision is older than the history the backend still keeps.

    The caller must re-list (`list_prefix`) and watch again from the listed revision + 1.
    """

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(
            f"revision {requested} is compacted (history kept from {compacted + 1}); re-list"
        )
        self.requested = requested
        self.compacted = compacted


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Compare:
    """Guard of a `txn`.

    `mod_revision == 0` means "the key must not exist" (etcd's `create_revision == 0` idiom);
    `mod_revision > 0` means "the key exists and was last modified at exactly that revision".
    """

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    """Set a key. `lease=0` detaches it from any lease, as an etcd put without a lease does."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class TxnResult:
    """`revision` is the store revision after the txn (unchanged when it failed or was a no-op)."""

    succeeded: bool
    revision: int


@dataclass(frozen=True)
class StoreIdentity:
    """Which store answered and how far its history goes. A daemon remembers both: a store that
    answers under another `cluster` is not the one it wrote to, and one whose `revision` went
    below a revision already seen was rolled back (restored from an older backup)."""

    cluster: str
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """One key change. `value` is empty for deletes; `revision` is the revision of the change."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@runtime_checkable
class Store(Protocol):
    """What callers may rely on. See the module docstring for the model."""

    def get(self, key: str) -> KeyValue | None: ...

    def get_with_identity(self, key: str) -> tuple[KeyValue | None, StoreIdentity]: ...

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]: ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    def create(self, key: str, value: bytes, lease: int = 0) -> bool: ...

    def compare_and_swap(
        self, key: str, value: bytes, mod_revision: int, lease: int = 0
    ) -> bool: ...

    def compare_and_delete(self, key: str, mod_revision: int) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult: ...

    def revision(self) -> int: ...

    def grant_lease(self, ttl: float) -> int: ...

    def refresh_lease(self, lease_id: int) -> float: ...

    def revoke_lease(self, lease_id: int) -> None: ...

    def lease_ttl_remaining(self, lease_id: int) -> float | None: ...

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]: ...

    def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# The deadline of the request a store call serves (see the module docstring).

_request_expiry: ContextVar[float | None] = ContextVar("moor_store_request_deadline", default=None)


@contextmanager
def request_deadline(expiry: float | None) -> Iterator[None]:
    """Cap every store call in the body by `expiry` (a time.monotonic() value; None: no cap)."""
    token = _request_expiry.set(expiry)
    try:
        yield
    finally:
        _request_expiry.reset(token)


def time_left() -> float | None:
    """Seconds until the current request's deadline (<= 0 once passed); None outside a request."""
    expiry = _request_expiry.get()
    return None if expiry is None else expiry - time.monotonic()


def call_timeout(timeout: float) -> float:
    """`timeout` capped by the current request's deadline; StoreUnavailable once it has passed."""
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise StoreUnavailable("the request deadline passed before the store answered")
    return min(timeout, left)


# ---------------------------------------------------------------------------------------------
# Helpers shared by backends.


def check_key(key: object) -> str:
    """Reject what etcd would reject or what only a bug produces (empty, non-str, lone surrogates)."""
    if not isinstance(key, str):
        raise TypeError(f"store key must be str, not {type(key).__name__}")
    if not key:
        raise ValueError("store key must not be empty")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"store key is not valid UTF-8: {key!r}") from e
    return key


def check_value(value: object) -> bytes:
    """Values are bytes; a str here is almost always a forgotten `.encode()`."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"store value must be bytes, not {type(value).__name__}")


def check_lease_id(lease: object) -> int:
    if not isinstance(lease, int) or isinstance(lease, bool) or lease < 0:
        raise ValueError(f"lease id must be an int >= 0, not {lease!r}")
    return lease


def check_txn(compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> None:
    """Validate a txn up front so no backend half-applies a malformed one.

    Like etcd ("duplicate key given in txn request"), one key may appear in at most one op:
    the outcome of put-then-delete of the same key inside one revision is not well defined.
    """
    for c in compares:
        if not isinstance(c, Compare):
            raise TypeError(f"txn compare must be Compare, not {type(c).__name__}")
        check_key(c.key)
        if not isinstance(c.mod_revision, int) or c.mod_revision < 0:
            raise ValueError(f"Compare.mod_revision must be an int >= 0, not {c.mod_revision!r}")
    seen: set[str] = set()
    for op in ops:
        if isinstance(op, Put):
            check_value(op.value)
            check_lease_id(op.lease)
        elif not isinstance(op, Delete):
            raise TypeError(f"txn op must be Put or Delete, not {type(op).__name__}")
        check_key(op.key)
        if op.key in seen:
            raise ValueError(f"duplicate key in txn ops: {op.key!r}")
        seen.add(op.key)


def check_prefixes(prefixes: object) -> list[str]:
    """The key prefixes of a watch: a non-empty sequence of str (one str is refused, not taken
    for its characters), without those another one covers, so no key is watched twice."""
    if isinstance(prefixes, str | bytes) or not isinstance(prefixes, Sequence):
        raise TypeError(f"prefixes must be a sequence of str, not {type(prefixes).__name__}")
    if not prefixes:
        raise ValueError("a watch needs at least one key prefix")
    for prefix in prefixes:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prefix is not valid UTF-8: {prefix!r}") from e
    return covering_prefixes(prefixes)


def check_start_revision(start_revision: object) -> int:
    if type(start_revision) is not int or start_revision < 0:  # bool is no revision either
        raise ValueError(f"start_revision must be an int >= 0, not {start_revision!r}")
    return start_revision


def prefix_range_end(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every key starting with `prefix` (etcd's range_end).

    None means "no upper bound" (empty prefix, or a prefix of only 0xff bytes).
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return None


class StoreBase(ABC):
    """The core a backend must implement, plus the single-key helpers written on `txn`."""

    # -- core ------------------------------------------------------------------------------

    @abstractmethod
    def get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    def get_with_identity(self, key: str) -> tuple[KeyValue | None, StoreIdentity]:
        """`get`, plus the identity of the store that answered it, from one read."""

    @abstractmethod
    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Keys starting with `prefix` (plain string prefix), sorted, and the snapshot revision."""

    @abstractmethod
    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        """If every compare holds, apply every op atomically under ONE new revision.

        Otherwise apply nothing. A Put naming a lease that does not exist raises LeaseNotFound
        (and applies nothing). Deleting a missing key is not a change; a txn without changes does
        not bump the revision (etcd semantics).
        """

    @abstractmethod
    def revision(self) -> int: ...

    @abstractmethod
    def grant_lease(self, ttl: float) -> int:
        """A new lease expiring `ttl` seconds from now unless refreshed. Ids are never reused."""

    @abstractmethod
    def refresh_lease(self, lease_id: int) -> float:
        """Keepalive: push expiry to now + the granted TTL and return that TTL."""

    @abstractmethod
    def revoke_lease(self, lease_id: int) -> None:
        """Delete the lease and its keys now (one revision; one delete event per key)."""

    @abstractmethod
    def lease_ttl_remaining(self, lease_id: int) -> float | None:
        """Seconds left, or None if the lease does not exist (any more)."""

    @abstractmethod
    def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        """Changes under any of `prefixes` with revision >= `start_revision`, in one stream.

        Order: the changes of one prefix, hence of one key, come in revision order; changes
        under different prefixes may interleave out of revision order (etcd feeds one watcher
        per prefix, each at its own pace; SQLite happens to keep one global order). So the
        highest revision seen is NOT a safe point to resume from: a caller that must not miss a
        change re-lists on any break and watches from the listing's revision + 1, as the store
        follower does. Overlapping prefixes are merged (`check_prefixes`): a key comes once.

        When the call returns, the backend watches every prefix (etcd has confirmed each
        watcher). `start_revision == 0` means "from the next revision". The iterator returns when
        `stop` is set (noticed within 0.2 s). Raises WatchCompacted, eagerly or while iterating,
        when history it still needs is gone; StoreUnavailable when the backend cancels it.
        """

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        """Changes under `prefix` with revision >= `start_revision`, in revision order, blocking:
        `watch_prefixes` with one prefix (see there)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        return self.watch_prefixes([prefix], start_revision, stop)

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable if the backend cannot serve."""

    @abstractmethod
    def close(self) -> None: ...

    # -- helpers on txn ----------------------------------------------------------------------

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put; returns the new revision."""
        return self.txn((), (Put(key, value, lease),)).revision

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Create-if-absent; False (and nothing written) if the key already exists."""
        return self.txn((Compare(key, 0),), (Put(key, value, lease),)).succeeded

    def compare_and_swap(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> bool:
        """Put only if the key's mod_revision is still `mod_revision` (0: only if absent).

        `lease` is there because a put without one detaches the key from its lease.
        """
        return self.txn((Compare(key, mod_revision),), (Put(key, value, lease),)).succeeded

    def compare_and_delete(self, key: str, mod_revision: int) -> bool:
        """Delete only if the key's mod_revision is still `mod_revision`."""
        if not isinstance(mod_revision, int) or mod_revision <= 0:
            raise ValueError(f"compare_and_delete needs a mod_revision > 0, not {mod_revision!r}")
        return self.txn((Compare(key, mod_revision),), (Delete(key),)).succeeded

    def delete(self, key: str) -> bool:
        """Unconditional delete; True if the key existed.

        A get + compare_and_delete loop, because `txn` does not report what it deleted; a backend
        with a native "deleted count" should override this.
        """
        while True:
            kv = self.get(key)
            if kv is None:
                return False
            if self.compare_and_delete(key, kv.mod_revision):
                return True

    def __enter__(self) -> StoreBase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
