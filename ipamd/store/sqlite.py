"""Embedded SQLite backend: the single-node default, with etcd's semantics (see base.py).

Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL before `txn` returns, so a
daemon crash (the failure that matters: OOM kill, bug, upgrade) loses nothing. A power loss can
lose the last few commits because the WAL is not fsynced per commit; that is acceptable on a
single node because a power loss also kills every pod the lost allocations belonged to, and a
release that comes back is a record whose netns is gone, which the leak GC frees. FULL would cost
an fsync per allocation.

Concurrency: one connection per store object behind a lock, so every operation is one short
transaction (`BEGIN IMMEDIATE` for writes, so the global revision counter is read and bumped
under SQLite's write lock). Several store objects or processes may open the same file; they
serialise on that write lock (with `busy_timeout`) and see each other's commits. Inside a CNI
request both waits, for the object's lock and for SQLite's write lock, are capped by the request's
deadline (base.call_timeout): a database another process keeps locked makes the request fail with
StoreUnavailable in time, never wait past its deadline.

Leases: expiry is wall time from the injected clock, persisted, so it survives restarts. Expired
leases are reaped lazily at the start of every operation, each as a normal revision with delete
events, as etcd's lessor does. A read in one process can therefore briefly return a key whose lease
another process's clock says has just expired, as with etcd's asynchronous revocation.

Watch: events live in a table trimmed to the last `history` revisions; watchers poll it, woken at
once by writes through any store object on the same file in this process, otherwise every 100 ms.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from ipamd.store.base import (
    Compare,
    Delete,
    KeyValue,
    LeaseNotFound,
    Put,
    StoreBase,
    StoreError,
    StoreIdentity,
    StoreUnavailable,
    TxnResult,
    WatchCompacted,
    WatchEvent,
    call_timeout,
    check_key,
    check_lease_id,
    check_prefixes,
    check_start_revision,
    check_txn,
    check_value,
    prefix_range_end,
    time_left,
)

SCHEMA_VERSION = 1

# etcd starts an empty cluster at revision 1; so do we, so revisions mean the same on both.
_INITIAL_REVISION = 1

_WATCH_POLL_S = 0.1
_WATCH_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cluster TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('put', 'delete')),
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
"""


class _Notifier:
    """Wakes watchers when any store object in this process writes to the same file."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def generation(self) -> int:
        with self._cond:
            return self._generation

    def bump(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until a write newer than generation `seen`, or `timeout`; no lost wake-ups."""
        with self._cond:
            if self._generation == seen:
                self._cond.wait(timeout)


_notifiers: dict[str, _Notifier] = {}
_notifiers_lock = threading.Lock()


def _notifier_for(path: str) -> _Notifier:
    if path == ":memory:" or path.startswith("file:"):
        return _Notifier()
    real = os.path.realpath(path)
    with _notifiers_lock:
        return _notifiers.setdefault(real, _Notifier())


def _b(key: str) -> bytes:
    return key.encode("utf-8")


def _s(key: bytes) -> str:
    return bytes(key).decode("utf-8")


class _Writer:
    """State of one write transaction: revision allocation, events, lease reaping."""

    def __init__(self, conn: sqlite3.Connection, history: int) -> None:
        self.conn = conn
        self.history = history
        row = conn.execute("SELECT revision, compacted FROM meta WHERE id = 1").fetchone()
        self.start_rev: int = row[0]
        self.rev: int = row[0]
        self.compacted: int = row[1]
        self._step_rev: int | None = None
        self._seq = 0

    def step(self) -> None:
        """Start a logical write; its first actual change allocates its revision."""
        self._step_rev = None

    def _change_rev(self) -> int:
        if self._step_rev is None:
            self.rev += 1
            self._step_rev = self.rev
            self._seq = 0
        return self._step_rev

    def _event(self, kind: Literal["put", "delete"], key: bytes, value: bytes) -> None:
        rev = self._change_rev()
        self.conn.execute(
            "INSERT INTO events (rev, seq, kind, key, value) VALUES (?, ?, ?, ?, ?)",
            (rev, self._seq, kind, key, value),
        )
        self._seq += 1

    def put(self, key: bytes, value: bytes, lease: int) -> None:
        rev = self._change_rev()
        self.conn.execute(
            "INSERT INTO kv (key, value, create_rev, mod_rev, lease) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET"
            " value = excluded.value, mod_rev = excluded.mod_rev, lease = excluded.lease",
            (key, value, rev, rev, lease),
        )
        self._event("put", key, value)

    def delete(self, key: bytes) -> bool:
        if self.conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
            return False
        self._event("delete", key, b"")
        return True

    def mod_rev(self, key: bytes) -> int:
        row = self.conn.execute("SELECT mod_rev FROM kv WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else row[0]

    def lease_exists(self, lease_id: int) -> bool:
        q = "SELECT 1 FROM leases WHERE id = ?"
        return self.conn.execute(q, (lease_id,)).fetchone() is not None

    def revoke(self, lease_id: int) -> None:
        """Delete a lease's keys as one revision (key order, like etcd), then the lease."""
        self.step()
        keys = self.conn.execute(
            "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)
        ).fetchall()
        for (key,) in keys:
            self.delete(key)
        self.conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def reap(self, now: float) -> None:
        expired = self.conn.execute(
            "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at, id", (now,)
        ).fetchall()
        for (lease_id,) in expired:
            self.revoke(lease_id)

    def finish(self) -> None:
        """Persist the revision and trim history; nothing to do if nothing changed."""
        if self.rev == self.start_rev:
            return
        floor = self.rev - self.history
        if floor > self.compacted:
            self.conn.execute("DELETE FROM events WHERE rev <= ?", (floor,))
            self.compacted = floor
        self.conn.execute(
            "UPDATE meta SET revision = ?, compacted = ? WHERE id = 1", (self.rev, self.compacted)
        )

    @property
    def changed(self) -> bool:
        return self.rev != self.start_rev


class SqliteStore(StoreBase):
    """See the module docstring. `history` is how many revisions of watch events are kept."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        history: int = 10000,
        busy_timeout: float = 5.0,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, not {history}")
        self.path = path
        self._clock = clock
        self._history = history
        self._lock = threading.RLock()
        self._busy_timeout = busy_timeout
        self._busy_ms = int(busy_timeout * 1000)  # what the connection is set to now
        self._notifier = _notifier_for(path)
        try:
            conn = sqlite3.connect(
                path,
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=path.startswith("file:"),
            )
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open sqlite store {path!r}: {e}") from e
        self._conn: sqlite3.Connection | None = conn
        try:
            self._init_db(conn, busy_timeout)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _init_db(self, conn: sqlite3.Connection, busy_timeout: float) -> None:
        with self._errors():
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema version {version} is newer than this moor"
                        f" ({SCHEMA_VERSION}); refusing to touch it"
                    )
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (1, ?, 0)",
                    (_INITIAL_REVISION,),
                )
                conn.execute(  # a new file is a new store, as a new etcd cluster is
                    "INSERT OR IGNORE INTO identity (id, cluster) VALUES (1, ?)",
                    (uuid.uuid4().hex,),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn sqlite3 errors into the store's: operational ones are transient."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite store {self.path!r}: {e}") from e
        except sqlite3.ProgrammingError as e:
            if self._conn is None:
                raise StoreUnavailable(f"sqlite store {self.path!r} is closed") from e
            raise StoreError(f"sqlite store {self.path!r}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"sqlite store {self.path!r}: {e}") from e

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"sqlite store {self.path!r} is closed")
        return self._conn

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """`self._lock`, waited for no longer than the current request's deadline allows; then
        SQLite's busy wait capped the same way. Outside a request: the plain lock and busy_timeout.
        """
        left = time_left()
        if left is None:
            self._lock.acquire()
        elif left <= 0 or not self._lock.acquire(timeout=left):
            raise StoreUnavailable(f"sqlite store {self.path!r}: busy past the request deadline")
        try:
            # Set only when it changes: most requests have more time left than busy_timeout.
            busy_ms = int(call_timeout(self._busy_timeout) * 1000)
            if busy_ms != self._busy_ms and self._conn is not None:
                with self._errors():
                    self._conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                self._busy_ms = busy_ms
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _write(self) -> Iterator[_Writer]:
        """One IMMEDIATE transaction with expired leases reaped first; commit or roll back."""
        with self._locked(), self._errors():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                w = _Writer(conn, self._history)
                w.reap(self._clock())
                yield w
                w.finish()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if w.changed:
            self._notifier.bump()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read snapshot, after reaping expired leases (only if there are any)."""
        with self._locked():
            with self._errors():
                conn = self._connection()
                q = "SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1"
                expired = conn.execute(q, (self._clock(),)).fetchone() is not None
            if expired:
                with self._write():
                    pass
            with self._errors():
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")

    # -- core --------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kb = _b(check_key(key))
        with self._read() as conn:
            row = conn.execute(
                "SELECT value, create_rev, mod_rev, lease FROM kv WHERE key = ?", (kb,)
            ).fetchone()
        if row is None:
            return None
        return KeyValue(key, bytes(row[0]), row[1], row[2], row[3])

    def get_with_identity(self, key: str) -> tuple[KeyValue | None, StoreIdentity]:
        kb = _b(check_key(key))
        with self._read() as conn:
            row = conn.execute(
                "SELECT value, create_rev, mod_rev, lease FROM kv WHERE key = ?", (kb,)
            ).fetchone()
            rev = conn.execute("SELECT revision FROM meta WHERE id = 1").fetchone()[0]
            cluster = conn.execute("SELECT cluster FROM identity WHERE id = 1").fetchone()[0]
        kv = None if row is None else KeyValue(key, bytes(row[0]), row[1], row[2], row[3])
        return kv, StoreIdentity(cluster, rev)

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        lo = _b(prefix)
        hi = prefix_range_end(lo)
        cols = "SELECT key, value, create_rev, mod_rev, lease FROM kv"
        with self._read() as conn:
            if hi is None:
                rows = conn.execute(f"{cols} WHERE key >= ? ORDER BY key", (lo,)).fetchall()
            else:
                q = f"{cols} WHERE key >= ? AND key < ? ORDER BY key"
                rows = conn.execute(q, (lo, hi)).fetchall()
            rev = conn.execute("SELECT revision FROM meta WHERE id = 1").fetchone()[0]
        return [KeyValue(_s(k), bytes(v), c, m, ls) for k, v, c, m, ls in rows], rev

    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        check_txn(compares, ops)
        with self._write() as w:
            result = self._apply(w, compares, ops)
        return result

    @staticmethod
    def _apply(w: _Writer, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        w.step()
        for c in compares:
            if w.mod_rev(_b(c.key)) != c.mod_revision:
                return TxnResult(False, w.rev)
        for op in ops:
            if isinstance(op, Put) and op.lease and not w.lease_exists(op.lease):
                raise LeaseNotFound(f"lease {op.lease} not found (put of {op.key!r})")
        for op in ops:
            if isinstance(op, Put):
                w.put(_b(op.key), check_value(op.value), op.lease)
            else:
                w.delete(_b(op.key))
        return TxnResult(True, w.rev)

    def delete(self, key: str) -> bool:
        """Native override: one transaction instead of get + compare_and_delete."""
        kb = _b(check_key(key))
        with self._write() as w:
            w.step()
            existed = w.delete(kb)
        return existed

    def revision(self) -> int:
        with self._read() as conn:
            rev: int = conn.execute("SELECT revision FROM meta WHERE id = 1").fetchone()[0]
        return rev

    def grant_lease(self, ttl: float) -> int:
        if not isinstance(ttl, int | float) or not (ttl > 0 and math.isfinite(ttl)):
            raise ValueError(f"lease ttl must be > 0 seconds, not {ttl!r}")
        with self._write() as w:
            cur = w.conn.execute(
                "INSERT INTO leases (ttl, expires_at) VALUES (?, ?)",
                (float(ttl), self._clock() + ttl),
            )
            lease_id = cur.lastrowid
        assert lease_id is not None
        return lease_id

    def refresh_lease(self, lease_id: int) -> float:
        check_lease_id(lease_id)
        with self._write() as w:
            row = w.conn.execute("SELECT ttl FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                raise LeaseNotFound(f"lease {lease_id} not found or expired")
            ttl: float = row[0]
            w.conn.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ?", (self._clock() + ttl, lease_id)
            )
        return ttl

    def revoke_lease(self, lease_id: int) -> None:
        check_lease_id(lease_id)
        with self._write() as w:
            if not w.lease_exists(lease_id):
                raise LeaseNotFound(f"lease {lease_id} not found or expired")
            w.revoke(lease_id)

    def lease_ttl_remaining(self, lease_id: int) -> float | None:
        check_lease_id(lease_id)
        with self._read() as conn:
            q = "SELECT expires_at FROM leases WHERE id = ?"
            row = conn.execute(q, (lease_id,)).fetchone()
        if row is None:
            return None
        expires_at: float = row[0]
        return max(0.0, expires_at - self._clock())

    def compact(self, revision: int) -> None:
        """Drop watch history below `revision` now (etcd's Compact), beyond `history` trimming."""
        with self._write() as w:
            floor = min(revision - 1, w.rev)
            if floor > w.compacted:
                w.conn.execute("DELETE FROM events WHERE rev <= ?", (floor,))
                w.conn.execute("UPDATE meta SET compacted = ? WHERE id = 1", (floor,))

    def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        """One poll over the events of every prefix's key range (OR'ed), in revision order."""
        ranges = check_prefixes(prefixes)
        start_revision = check_start_revision(start_revision)
        with self._read() as conn:
            rev, compacted = conn.execute(
                "SELECT revision, compacted FROM meta WHERE id = 1"
            ).fetchone()
        start = start_revision or rev + 1
        if start <= compacted:
            raise WatchCompacted(start, compacted)
        return self._watch([_b(prefix) for prefix in ranges], start, stop)

    def _watch(
        self, prefixes: list[bytes], start: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        # Cursor: the next event is the first after (rev, seq); seq -1 = "all of rev".
        rev, seq = start, -1
        ranges: list[str] = []
        args_tail: list[bytes] = []
        for prefix in prefixes:  # disjoint ranges (check_prefixes merged the overlapping ones)
            hi = prefix_range_end(prefix)
            ranges.append("key >= ?" if hi is None else "(key >= ? AND key < ?)")
            args_tail.extend([prefix] if hi is None else [prefix, hi])
        where = f"(rev, seq) > (?, ?) AND ({' OR '.join(ranges)})"
        q = f"SELECT rev, seq, kind, key, value FROM events WHERE {where} ORDER BY rev, seq LIMIT ?"
        while not stop.is_set():
            seen = self._notifier.generation()
            try:
                with self._read() as conn:
                    current, compacted = conn.execute(
                        "SELECT revision, compacted FROM meta WHERE id = 1"
                    ).fetchone()
                    rows = conn.execute(q, (rev, seq, *args_tail, _WATCH_BATCH)).fetchall()
            except StoreUnavailable:
                if stop.is_set():
                    return
                raise
            if rev <= compacted:
                raise WatchCompacted(rev, compacted)
            for r, s, kind, key, value in rows:
                if stop.is_set():
                    return
                yield WatchEvent(kind, _s(key), bytes(value), r)
                rev, seq = r, s
            if len(rows) == _WATCH_BATCH:
                continue
            # That snapshot held everything up to `current`, and all of it has been delivered:
            # skip past it so the next poll does not rescan events outside the prefixes.
            if (current + 1, -1) > (rev, seq):
                rev, seq = current + 1, -1
            self._notifier.wait(seen, _WATCH_POLL_S)

    def ping(self) -> None:
        with self._locked(), self._errors():
            self._connection().execute("SELECT revision FROM meta WHERE id = 1").fetchone()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        self._notifier.bump()
