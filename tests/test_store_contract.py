"""The store contract (ipamd/store/base.py), run against every backend.

Each test talks to `store` only through the contract, so the same tests pin the etcd backend
down later. To add a backend: append it to BACKENDS and add a branch in `backend()`. Time is
abstracted by `elapse`/`expire`: a backend with an injectable clock advances it (instant and
deterministic); a real one (etcd) sleeps, which is why lease TTLs here are short.

Backend-specific tests (SQLite history trimming, multi-process, locking, open_store) are at the end.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipamd.config import load_config
from ipamd.store import (
    Compare,
    Delete,
    LeaseNotFound,
    Put,
    Store,
    StoreUnavailable,
    WatchCompacted,
    WatchEvent,
    open_store,
)
from ipamd.store.etcd import EtcdStore
from ipamd.store.sqlite import SqliteStore
from tests.conftest import require
from tests.helpers.clock import FakeClock
from tests.helpers.etcd import EtcdServer, free_port, make_tls
from tests.helpers.etcd import available as etcd_available

BACKENDS = ["sqlite", "etcd"]

LEASE_TTL = 2.0  # seconds; real backends sleep for this, so keep it small


@dataclass
class Backend:
    kind: str
    store: Store
    clock: FakeClock | None  # None: real time, `elapse` sleeps
    open_peer: Callable[[], Store]  # another client on the same state (file, cluster)
    compact: Callable[[int], None]  # discard watch history below a revision
    opened: list[Store] = field(default_factory=list)


_BACKENDS_BY_STORE: dict[int, Backend] = {}


@pytest.fixture(scope="module")
def contract_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd of this module's own: the tests count revisions, so nobody else may write."""
    ok, why = etcd_available()
    require(ok, why)
    server = EtcdServer(tmp_path_factory.mktemp("contract-etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        clock = FakeClock()
        path = str(tmp_path / "state.db")
        opened: list[Store] = []

        def open_peer() -> Store:
            s = SqliteStore(path, clock=clock)
            opened.append(s)
            return s

        store = open_peer()
        assert isinstance(store, SqliteStore)
        b = Backend("sqlite", store, clock, open_peer, store.compact, opened)
    elif request.param == "etcd":
        server = request.getfixturevalue("contract_etcd")
        server.wipe()
        opened = []

        def open_peer() -> Store:
            s = open_store(server.url)
            opened.append(s)
            return s

        store = open_peer()
        assert isinstance(store, EtcdStore)
        b = Backend("etcd", store, None, open_peer, store.compact, opened)
    else:  # pragma: no cover - a backend listed without a branch here
        raise AssertionError(f"no fixture branch for backend {request.param!r}")
    _BACKENDS_BY_STORE[id(store)] = b
    yield b
    del _BACKENDS_BY_STORE[id(store)]
    for s in b.opened:
        s.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


def elapse(store: Store, seconds: float) -> None:
    """Let `seconds` of lease time pass for this backend."""
    clock = _BACKENDS_BY_STORE[id(store)].clock
    if clock is not None:
        clock.advance(seconds)
    else:
        time.sleep(seconds)


def expire(store: Store, lease: int, ttl: float) -> None:
    """Let a lease with `ttl` seconds left run out, and wait until the backend has reaped it."""
    fake = _BACKENDS_BY_STORE[id(store)].clock is not None
    elapse(store, ttl + (0.001 if fake else 0.5))
    deadline = time.monotonic() + 5.0
    while store.lease_ttl_remaining(lease) is not None:
        assert time.monotonic() < deadline, f"lease {lease} did not expire"
        time.sleep(0.05)


class Collector:
    """Drains a watch on a thread, so a test can wait for events with a deadline."""

    def __init__(self, store: Store, prefix: str | list[str], start_revision: int) -> None:
        self.stop = threading.Event()
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        if isinstance(prefix, str):
            self._it = store.watch(prefix, start_revision, self.stop)
        else:
            self._it = store.watch_prefixes(prefix, start_revision, self.stop)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._it:
                self.events.append(ev)
        except BaseException as e:  # re-raised in the test thread
            self.error = e

    def wait_for(self, n: int, timeout: float = 5.0) -> list[WatchEvent]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and self.error is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.error is not None:
            raise self.error
        assert len(self.events) >= n, f"got {len(self.events)} events, wanted {n}"
        return list(self.events[:n])

    def until(self, key: str, timeout: float = 5.0) -> list[WatchEvent]:
        """Events before the first one on `key` (a sentinel): proves nothing else came first."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.key == key:
                    return list(self.events[:i])
            if self.error is not None:
                raise self.error
            assert time.monotonic() < deadline, f"sentinel {key!r} never seen: {self.events}"
            time.sleep(0.002)

    def close(self) -> float:
        """Stop the watch; return how long the iterator took to end."""
        t0 = time.monotonic()
        self.stop.set()
        self._thread.join(2.0)
        assert not self._thread.is_alive(), "watch did not return after stop was set"
        return time.monotonic() - t0


@pytest.fixture
def watch(store: Store) -> Iterator[Callable[..., Collector]]:
    collectors: list[Collector] = []

    def start(prefix: str | list[str], start_revision: int, on: Store | None = None) -> Collector:
        c = Collector(on or store, prefix, start_revision)
        collectors.append(c)
        return c

    yield start
    for c in collectors:
        c.close()


# -- basic KV --------------------------------------------------------------------------------


def test_empty(store: Store) -> None:
    assert store.revision() >= 1
    assert store.get("/k") is None
    assert store.list_prefix("/") == ([], store.revision())
    store.ping()


def test_put_get_and_revisions(store: Store) -> None:
    r0 = store.revision()
    r1 = store.put("/k/a", b"1")
    assert r1 == r0 + 1 == store.revision()
    kv = store.get("/k/a")
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (
        "/k/a",
        b"1",
        r1,
        r1,
        0,
    )
    r2 = store.put("/k/a", b"2")
    r3 = store.put("/k/b", b"\x00\xff binary")
    assert r1 < r2 < r3 == store.revision()
    kv = store.get("/k/a")
    assert kv is not None and (kv.value, kv.create_revision, kv.mod_revision) == (b"2", r1, r2)
    kv = store.get("/k/b")
    assert kv is not None and kv.value == b"\x00\xff binary"
    assert store.put("/k/empty", b"") == r3 + 1
    assert store.get("/k/empty") is not None


def test_create_if_absent(store: Store) -> None:
    assert store.create("/c", b"first")
    rev = store.revision()
    assert not store.create("/c", b"second")
    assert store.revision() == rev  # a failed compare writes nothing
    kv = store.get("/c")
    assert kv is not None and kv.value == b"first"


def test_delete(store: Store) -> None:
    r1 = store.put("/d", b"x")
    assert store.delete("/d")
    r2 = store.revision()
    assert r2 == r1 + 1
    assert store.get("/d") is None
    assert not store.delete("/d")
    assert store.revision() == r2  # deleting nothing is not a change
    r3 = store.put("/d", b"y")
    kv = store.get("/d")
    assert kv is not None and kv.create_revision == kv.mod_revision == r3  # a new life


def test_compare_and_swap(store: Store) -> None:
    assert store.compare_and_swap("/s", b"v1", 0)  # 0: only if absent
    assert not store.compare_and_swap("/s", b"again", 0)
    kv = store.get("/s")
    assert kv is not None
    assert store.compare_and_swap("/s", b"v2", kv.mod_revision)
    assert not store.compare_and_swap("/s", b"stale", kv.mod_revision)
    now = store.get("/s")
    assert now is not None and now.value == b"v2" and now.create_revision == kv.create_revision
    assert not store.compare_and_swap("/missing", b"x", now.mod_revision)
    assert store.get("/missing") is None


def test_compare_and_delete(store: Store) -> None:
    store.put("/cd", b"1")
    kv = store.get("/cd")
    assert kv is not None
    store.put("/cd", b"2")
    assert not store.compare_and_delete("/cd", kv.mod_revision)
    assert store.get("/cd") is not None
    cur = store.get("/cd")
    assert cur is not None
    assert store.compare_and_delete("/cd", cur.mod_revision)
    assert store.get("/cd") is None
    assert not store.compare_and_delete("/cd", cur.mod_revision)
    with pytest.raises(ValueError):
        store.compare_and_delete("/cd", 0)


@pytest.mark.parametrize("bad", ["", 1, b"/bytes"])
def test_bad_keys_rejected(store: Store, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.put(bad, b"x")  # type: ignore[arg-type]


def test_str_value_rejected(store: Store) -> None:
    with pytest.raises(TypeError):
        store.put("/k", "not bytes")  # type: ignore[arg-type]


# -- transactions ----------------------------------------------------------------------------


def test_txn_all_or_nothing(store: Store) -> None:
    store.put("/t/a", b"a0")
    store.put("/t/gone", b"g")
    a = store.get("/t/a")
    assert a is not None
    store.put("/t/b", b"b0")  # now a compare "b absent" fails
    rev = store.revision()

    ops: list[Put | Delete] = [Put("/t/a", b"a1"), Put("/t/c", b"c1"), Delete("/t/gone")]
    res = store.txn([Compare("/t/a", a.mod_revision), Compare("/t/b", 0)], ops)
    assert not res.succeeded and res.revision == rev == store.revision()
    assert store.get("/t/a").value == b"a0"  # type: ignore[union-attr]
    assert store.get("/t/c") is None
    assert store.get("/t/gone") is not None

    res = store.txn([Compare("/t/a", a.mod_revision), Compare("/t/c", 0)], ops)
    assert res.succeeded and res.revision == rev + 1 == store.revision()
    for key, value in (("/t/a", b"a1"), ("/t/c", b"c1")):
        kv = store.get(key)
        assert kv is not None and kv.value == value and kv.mod_revision == res.revision
    assert store.get("/t/gone") is None


def test_txn_without_changes_keeps_revision(store: Store) -> None:
    rev = store.revision()
    res = store.txn([Compare("/nothing", 0)], [Delete("/nothing")])
    assert res.succeeded and res.revision == rev == store.revision()
    assert store.txn([], []).succeeded


def test_txn_rejects_duplicate_keys(store: Store) -> None:
    with pytest.raises(ValueError):
        store.txn([], [Put("/dup", b"1"), Delete("/dup")])
    assert store.get("/dup") is None


def test_txn_with_unknown_lease_applies_nothing(store: Store) -> None:
    rev = store.revision()
    with pytest.raises(LeaseNotFound):
        store.txn([], [Put("/ok", b"x"), Put("/leased", b"x", lease=987654321)])
    assert store.get("/ok") is None and store.revision() == rev


def test_txn_events_share_one_revision(store: Store, watch: Callable[..., Collector]) -> None:
    w = watch("/tx/", store.revision() + 1)
    res = store.txn([], [Put("/tx/1", b"1"), Put("/tx/2", b"2"), Put("/tx/3", b"3")])
    events = w.wait_for(3)
    assert [e.key for e in events] == ["/tx/1", "/tx/2", "/tx/3"]
    assert {e.revision for e in events} == {res.revision}


# -- listing ---------------------------------------------------------------------------------


def test_list_prefix_sorted_and_exact(store: Store) -> None:
    for key in ["/a/b/2", "/a/bc/1", "/a/b/1", "/a/b", "/a/b0", "/a/b/10", "/a/a/9", "/a/b/é"]:
        store.put(key, key.encode())
    kvs, rev = store.list_prefix("/a/b/")
    assert [kv.key for kv in kvs] == ["/a/b/1", "/a/b/10", "/a/b/2", "/a/b/é"]
    assert all(kv.value == kv.key.encode() for kv in kvs)
    assert rev == store.revision()
    kvs, _ = store.list_prefix("/a/b")
    assert [kv.key for kv in kvs] == [
        "/a/b",
        "/a/b/1",
        "/a/b/10",
        "/a/b/2",
        "/a/b/é",
        "/a/b0",
        "/a/bc/1",
    ]
    assert store.list_prefix("/zzz/")[0] == []


def test_list_prefix_unicode_order_matches_bytes(store: Store) -> None:
    keys = ["/u/z", "/u/é", "/u/\U0001f600", "/u/A", "/u/\uffff"]
    for k in keys:
        store.put(k, b"")
    listed = [kv.key for kv in store.list_prefix("/u/")[0]]
    assert listed == sorted(keys, key=lambda k: k.encode("utf-8")) == sorted(keys)


# -- leases ----------------------------------------------------------------------------------


def test_lease_expiry_deletes_attached_keys(store: Store) -> None:
    lease = store.grant_lease(LEASE_TTL)
    store.put("/l/a", b"a", lease=lease)
    assert store.create("/l/b", b"b", lease=lease)
    store.put("/l/free", b"f")
    kv = store.get("/l/a")
    assert kv is not None and kv.lease == lease
    remaining = store.lease_ttl_remaining(lease)
    assert remaining is not None and 0 < remaining <= LEASE_TTL

    rev = store.revision()
    expire(store, lease, LEASE_TTL)
    assert store.get("/l/a") is None and store.get("/l/b") is None
    assert store.get("/l/free") is not None
    assert store.revision() > rev  # the reaping is a revision like any other
    assert store.lease_ttl_remaining(lease) is None
    with pytest.raises(LeaseNotFound):
        store.refresh_lease(lease)
    with pytest.raises(LeaseNotFound):
        store.revoke_lease(lease)
    with pytest.raises(LeaseNotFound):
        store.put("/l/late", b"x", lease=lease)
    assert store.get("/l/late") is None


def test_lease_expiry_produces_delete_events(store: Store, watch: Callable[..., Collector]) -> None:
    lease = store.grant_lease(LEASE_TTL)
    store.put("/le/a", b"a", lease=lease)
    w = watch("/le/", store.revision() + 1)
    expire(store, lease, LEASE_TTL)
    store.put("/le/sentinel", b"")
    events = w.until("/le/sentinel")
    assert [(e.kind, e.key, e.value) for e in events] == [("delete", "/le/a", b"")]


def test_refresh_extends_lease(store: Store) -> None:
    lease = store.grant_lease(LEASE_TTL)
    store.put("/r/a", b"a", lease=lease)
    elapse(store, LEASE_TTL * 0.6)
    assert store.refresh_lease(lease) == pytest.approx(LEASE_TTL, abs=1.0)
    elapse(store, LEASE_TTL * 0.6)  # past the original expiry, within the refreshed one
    assert store.get("/r/a") is not None
    remaining = store.lease_ttl_remaining(lease)
    assert remaining is not None and remaining > 0
    expire(store, lease, remaining)
    assert store.get("/r/a") is None


def test_revoke_deletes_keys_with_events(store: Store, watch: Callable[..., Collector]) -> None:
    lease = store.grant_lease(60)
    store.put("/rv/a", b"a", lease=lease)
    store.put("/rv/b", b"b", lease=lease)
    store.put("/rv/detached", b"d", lease=lease)
    store.put("/rv/detached", b"d2")  # a put without a lease detaches the key
    w = watch("/rv/", store.revision() + 1)
    store.revoke_lease(lease)
    assert store.get("/rv/a") is None and store.get("/rv/b") is None
    assert store.get("/rv/detached") is not None
    assert store.lease_ttl_remaining(lease) is None
    with pytest.raises(LeaseNotFound):
        store.revoke_lease(lease)
    store.put("/rv/sentinel", b"")
    events = w.until("/rv/sentinel")
    assert sorted((e.kind, e.key) for e in events) == [("delete", "/rv/a"), ("delete", "/rv/b")]
    assert events[0].revision == events[1].revision  # one revoke, one revision


def test_lease_ids_are_distinct_and_unknown_is_not_found(store: Store) -> None:
    ids = {store.grant_lease(60) for _ in range(5)}
    assert len(ids) == 5 and 0 not in ids
    unknown = max(ids) + 1000
    assert store.lease_ttl_remaining(unknown) is None
    with pytest.raises(LeaseNotFound):
        store.refresh_lease(unknown)
    with pytest.raises(ValueError):
        store.grant_lease(0)


# -- watch -----------------------------------------------------------------------------------


def test_watch_replays_history_then_follows(store: Store, watch: Callable[..., Collector]) -> None:
    r_first = store.put("/w/a", b"a1")
    store.put("/x/other", b"not mine")
    store.put("/w/b", b"b1")
    store.delete("/w/a")
    w = watch("/w/", r_first)
    events = w.wait_for(3)
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("put", "/w/a", b"a1"),
        ("put", "/w/b", b"b1"),
        ("delete", "/w/a", b""),
    ]
    r_live = store.put("/w/c", b"c1")
    store.put("/x/other", b"still not mine")
    r_last = store.put("/w/sentinel", b"")
    events = w.until("/w/sentinel")
    assert events[-1] == WatchEvent("put", "/w/c", b"c1", r_live)
    revs = [e.revision for e in events] + [r_last]
    assert revs == sorted(revs) and revs[0] == r_first
    assert w.close() < 0.5


def test_watch_start_revision_filters_older(store: Store, watch: Callable[..., Collector]) -> None:
    store.put("/ws/old", b"")
    r = store.put("/ws/new", b"")
    w = watch("/ws/", r)
    assert [e.key for e in w.wait_for(1)] == ["/ws/new"]


def test_watch_from_zero_means_from_now(store: Store, watch: Callable[..., Collector]) -> None:
    store.put("/wz/old", b"")
    w = watch("/wz/", 0)
    store.put("/wz/new", b"")
    store.put("/wz/sentinel", b"")
    assert [e.key for e in w.until("/wz/sentinel")] == ["/wz/new"]


def test_watch_prefix_is_exact(store: Store, watch: Callable[..., Collector]) -> None:
    w = watch("/p/b/", store.revision() + 1)
    store.put("/p/bc/1", b"")
    store.put("/p/b", b"")
    store.put("/p/b/1", b"")
    store.put("/p/c", b"")
    store.put("/p/b/sentinel", b"")
    assert [e.key for e in w.until("/p/b/sentinel")] == ["/p/b/1"]


def test_watch_stop_ends_iterator_promptly(store: Store, watch: Callable[..., Collector]) -> None:
    w = watch("/idle/", store.revision() + 1)
    time.sleep(0.05)  # let it block
    assert w.close() < 0.4
    assert w.error is None


def test_watch_compacted(backend: Backend, store: Store) -> None:
    first = store.put("/cmp/a", b"")
    for i in range(5):
        store.put(f"/cmp/{i}", b"")
    backend.compact(store.revision())
    stop = threading.Event()
    with pytest.raises(WatchCompacted):
        for _ in store.watch("/cmp/", first, stop):  # may raise eagerly or on first next()
            pass
    stop.set()
    # From the compaction point on, history is there.
    stop = threading.Event()
    it = store.watch("/cmp/", store.revision(), stop)
    assert next(it).key == "/cmp/4"
    stop.set()


# -- watch over several prefixes ------------------------------------------------------------


def until_all(w: Collector, sentinels: list[str], timeout: float = 5.0) -> list[WatchEvent]:
    """Every event up to the last of `sentinels` (one per prefix: across prefixes, events may
    come out of revision order, so one sentinel proves nothing about the other prefixes)."""
    deadline = time.monotonic() + timeout
    while not set(sentinels) <= {e.key for e in w.events}:
        if w.error is not None:
            raise w.error
        assert time.monotonic() < deadline, f"sentinels {sentinels} not all seen: {w.events}"
        time.sleep(0.002)
    return [e for e in w.events if e.key not in sentinels]


def test_watch_prefixes_gets_every_prefix_and_nothing_else(
    store: Store, watch: Callable[..., Collector]
) -> None:
    w = watch(["/mp/a/", "/mp/b/", "/mp/c/"], store.revision() + 1)
    r1 = store.put("/mp/a/1", b"a")
    store.put("/mp/x/1", b"outside")
    store.put("/mp/ab", b"outside: the prefix is /mp/a/, not /mp/a")
    r2 = store.put("/mp/b/1", b"b")
    r3 = store.txn((), (Put("/mp/a/2", b""), Put("/mp/c/2", b""), Put("/mp/x/2", b""))).revision
    assert store.delete("/mp/a/1")
    r4 = store.revision()
    sentinels = ["/mp/a/sentinel", "/mp/b/sentinel", "/mp/c/sentinel"]
    for key in sentinels:
        store.put(key, b"")
    events = until_all(w, sentinels)
    assert sorted((e.revision, e.kind, e.key, e.value) for e in events) == [
        (r1, "put", "/mp/a/1", b"a"),
        (r2, "put", "/mp/b/1", b"b"),
        (r3, "put", "/mp/a/2", b""),
        (r3, "put", "/mp/c/2", b""),
        (r4, "delete", "/mp/a/1", b""),
    ]
    for prefix in ("/mp/a/", "/mp/b/", "/mp/c/"):  # the one order promised: per prefix
        revs = [e.revision for e in w.events if e.key.startswith(prefix)]
        assert revs == sorted(revs)


def test_watch_prefixes_start_revision_and_history(
    store: Store, watch: Callable[..., Collector]
) -> None:
    store.put("/mh/a/old", b"")
    store.put("/mh/b/old", b"")
    r = store.put("/mh/a/new", b"")
    store.put("/mh/x/new", b"")
    r_b = store.put("/mh/b/new", b"")
    w = watch(["/mh/b/", "/mh/a/"], r)
    store.put("/mh/a/live", b"")
    store.put("/mh/a/sentinel", b"")
    store.put("/mh/b/sentinel", b"")
    events = until_all(w, ["/mh/a/sentinel", "/mh/b/sentinel"])
    assert sorted(e.key for e in events) == ["/mh/a/live", "/mh/a/new", "/mh/b/new"]
    assert min(e.revision for e in events) == r
    assert [e.revision for e in events if e.key == "/mh/b/new"] == [r_b]


def test_watch_prefixes_from_zero_means_from_now(
    store: Store, watch: Callable[..., Collector]
) -> None:
    store.put("/mz/a/old", b"")
    w = watch(["/mz/a/", "/mz/b/"], 0)
    store.put("/mz/b/new", b"")
    store.put("/mz/a/sentinel", b"")
    store.put("/mz/b/sentinel", b"")
    assert [e.key for e in until_all(w, ["/mz/a/sentinel", "/mz/b/sentinel"])] == ["/mz/b/new"]


def test_watch_prefixes_overlapping_prefixes_give_each_event_once(
    store: Store, watch: Callable[..., Collector]
) -> None:
    w = watch(["/mo/a/", "/mo/", "/mo/a/", "/mo/b"], store.revision() + 1)
    store.put("/mo/a/1", b"")
    store.put("/mo/b1", b"")
    store.put("/mo/sentinel", b"")
    assert [e.key for e in w.until("/mo/sentinel")] == ["/mo/a/1", "/mo/b1"]


def test_watch_prefixes_stop_ends_iterator_promptly(
    store: Store, watch: Callable[..., Collector]
) -> None:
    w = watch(["/mi/a/", "/mi/b/", "/mi/c/"], store.revision() + 1)
    time.sleep(0.05)  # let it block
    assert w.close() < 0.4
    assert w.error is None


def test_watch_prefixes_compacted(backend: Backend, store: Store) -> None:
    first = store.put("/mc/a/0", b"")
    for i in range(5):
        store.put(f"/mc/b/{i}", b"")
    backend.compact(store.revision())
    stop = threading.Event()
    try:
        with pytest.raises(WatchCompacted):
            for _ in store.watch_prefixes(["/mc/a/", "/mc/b/"], first, stop):
                pass
    finally:
        stop.set()
    stop = threading.Event()
    try:
        it = store.watch_prefixes(["/mc/a/", "/mc/b/"], store.revision(), stop)
        assert next(it).key == "/mc/b/4"
    finally:
        stop.set()


@pytest.mark.parametrize(
    ("prefixes", "start", "error"),
    [
        ("/a/", 0, TypeError),  # one str: not taken for a sequence of one-letter prefixes
        (b"/a/", 0, TypeError),
        ([], 0, ValueError),
        (["/a/", 1], 0, TypeError),
        (["/a/\ud800"], 0, ValueError),
        (["/a/"], -1, ValueError),
        (["/a/"], "1", ValueError),
    ],
)
def test_watch_prefixes_rejects_bad_input(
    store: Store, prefixes: object, start: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        store.watch_prefixes(prefixes, start, threading.Event())  # type: ignore[arg-type]


def test_etcd_watch_prefixes_fails_at_the_call_when_etcd_is_down() -> None:
    """The watch is reported started only once etcd created every watcher: with no etcd the call
    itself raises, within the RPC timeout, rather than handing back a dead iterator."""
    with open_store(f"etcd://127.0.0.1:{free_port()}", timeout=1.0) as s:
        stop = threading.Event()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s.watch_prefixes(["/a/", "/b/"], 5, stop)
        assert time.monotonic() - t0 < 1.5


def test_etcd_watch_prefixes_unconfirmed_in_time_is_unavailable(contract_etcd: EtcdServer) -> None:
    """An etcd that takes the stream but never answers (stopped with SIGSTOP): the call gives up
    at the RPC timeout with StoreUnavailable instead of waiting for ever."""
    assert contract_etcd.proc is not None
    with open_store(contract_etcd.url, timeout=1.0) as s:
        first = s.put("/mu/a", b"")  # the channel is up before etcd freezes
        os.kill(contract_etcd.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="confirm"):
                s.watch_prefixes(["/mu/", "/mv/"], first, threading.Event())
            assert time.monotonic() - t0 < 2.5
        finally:
            os.kill(contract_etcd.proc.pid, signal.SIGCONT)
        stop = threading.Event()
        deadline = time.monotonic() + 10
        try:
            while True:  # the endpoint was marked failed: it is retried after a short pause
                try:
                    events = s.watch_prefixes(["/mu/", "/mv/"], first, stop)
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "no watch after etcd came back"
                    time.sleep(0.1)
            assert next(events).key == "/mu/a"
        finally:
            stop.set()


# -- concurrency and several clients ---------------------------------------------------------


def test_concurrent_create_each_key_once(backend: Backend, store: Store) -> None:
    """Odd threads go through a second client, so the race also crosses connections."""
    clients = [store, backend.open_peer()]
    keys = [f"/race/{i:03d}" for i in range(200)]
    start = threading.Barrier(8)
    wins: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    rev0 = store.revision()

    def worker(n: int) -> None:
        try:
            order = keys[:]
            random.Random(n).shuffle(order)
            start.wait()
            for k in order:
                if clients[n % 2].create(k, str(n).encode()):
                    wins[n].append(k)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    all_wins = [k for w in wins for k in w]
    assert sorted(all_wins) == keys  # each key created exactly once
    for n, won in enumerate(wins):
        for k in won:
            assert store.get(k).value == str(n).encode()  # type: ignore[union-attr]
    assert store.revision() == rev0 + 200


def test_peers_see_each_other(
    backend: Backend, store: Store, watch: Callable[..., Collector]
) -> None:
    peer = backend.open_peer()
    w = watch("/peer/", store.revision() + 1, on=peer)
    rev = store.put("/peer/a", b"from store")
    kv = peer.get("/peer/a")
    assert kv is not None and kv.value == b"from store" and kv.mod_revision == rev
    assert peer.revision() == rev
    assert not peer.create("/peer/a", b"from peer")
    r2 = peer.put("/peer/b", b"from peer")
    assert r2 == rev + 1 == store.revision()
    lease = store.grant_lease(60)
    peer.put("/peer/leased", b"", lease=lease)
    peer.revoke_lease(lease)
    assert store.get("/peer/leased") is None
    store.put("/peer/sentinel", b"")
    assert [(e.kind, e.key) for e in w.until("/peer/sentinel")] == [
        ("put", "/peer/a"),
        ("put", "/peer/b"),
        ("put", "/peer/leased"),
        ("delete", "/peer/leased"),
    ]


def test_identity_names_the_store_and_its_revision(backend: Backend, store: Store) -> None:
    """One read gives the key and the store's identity: stable for one store, shared by its
    peers, and a revision that moves with the writes."""
    rev = store.put("/id/k", b"v")
    kv, identity = store.get_with_identity("/id/k")
    assert kv is not None and kv.value == b"v" and kv.mod_revision == rev
    assert identity.revision == rev and identity.cluster
    missing, again = store.get_with_identity("/id/none")
    assert missing is None and again.cluster == identity.cluster
    peer = backend.open_peer()
    try:
        assert peer.get_with_identity("/id/k")[1] == identity
    finally:
        peer.close()
    later = store.put("/id/k", b"w")
    assert store.get_with_identity("/id/k")[1].revision == later > rev


def test_closed_store_is_unavailable(backend: Backend) -> None:
    s = backend.open_peer()
    s.close()
    with pytest.raises(StoreUnavailable):
        s.ping()
    with pytest.raises(StoreUnavailable):
        s.get("/k")
    s.close()  # idempotent


# -- SQLite specifics ------------------------------------------------------------------------


def test_sqlite_history_is_trimmed(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "s.db"), history=5) as s:
        first = s.put("/h/0", b"")
        for i in range(1, 10):
            s.put(f"/h/{i}", b"")
        with pytest.raises(WatchCompacted):
            s.watch("/h/", first, threading.Event())
        stop = threading.Event()
        it = s.watch("/h/", s.revision() - 4, stop)
        assert [next(it).key for _ in range(5)] == [f"/h/{i}" for i in range(5, 10)]
        stop.set()


@pytest.mark.parametrize("op", ["delete", "txn", "get"])
def test_sqlite_reaping_is_one_revision_per_lease_before_the_op(tmp_path: Path, op: str) -> None:
    clock = FakeClock()
    with SqliteStore(str(tmp_path / "s.db"), clock=clock) as s:
        l1, l2 = s.grant_lease(5), s.grant_lease(6)
        s.put("/e/l1a", b"", lease=l1)
        s.put("/e/l1b", b"", lease=l1)
        s.put("/e/l2", b"", lease=l2)
        s.put("/e/plain", b"")
        rev = s.revision()
        clock.advance(10)  # both expire; nothing has noticed yet
        if op == "delete":
            assert s.delete("/e/plain")
        elif op == "txn":
            assert s.txn([], [Delete("/e/plain")]).succeeded
        else:
            assert s.get("/e/plain") is not None
        stop = threading.Event()
        it = s.watch("/e/", rev + 1, stop)
        n = 3 if op == "get" else 4
        events = [(e.kind, e.key, e.revision) for e in (next(it) for _ in range(n))]
        stop.set()
        expected = [
            ("delete", "/e/l1a", rev + 1),
            ("delete", "/e/l1b", rev + 1),
            ("delete", "/e/l2", rev + 2),
            ("delete", "/e/plain", rev + 3),
        ]
        assert events == expected[:n]
        assert s.revision() == rev + n - 1


def test_sqlite_state_survives_reopen(tmp_path: Path) -> None:
    clock = FakeClock()
    path = str(tmp_path / "s.db")
    s = SqliteStore(path, clock=clock)
    lease = s.grant_lease(10)
    s.put("/p/leased", b"x", lease=lease)
    rev = s.put("/p/plain", b"y")
    s.close()
    s = SqliteStore(path, clock=clock)
    try:
        assert s.revision() == rev
        assert s.get("/p/plain") is not None
        assert s.lease_ttl_remaining(lease) == pytest.approx(10)
        clock.advance(11)
        assert s.get("/p/leased") is None
        assert s.grant_lease(10) > lease  # ids are never reused
    finally:
        s.close()


def test_sqlite_identity_survives_reopen_and_a_new_file_is_a_new_store(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "s.db")) as s:
        s.put("/k", b"")
        first = s.get_with_identity("/k")[1]
    with SqliteStore(str(tmp_path / "s.db")) as s:
        assert s.get_with_identity("/k")[1] == first
    (tmp_path / "s.db").unlink()
    with SqliteStore(str(tmp_path / "s.db")) as s:
        wiped = s.get_with_identity("/k")
        assert wiped[0] is None and wiped[1].cluster != first.cluster
        assert wiped[1].revision < first.revision


_WRITER = """
import sys
from ipamd.store.etcd import EtcdStore
from ipamd.store.sqlite import SqliteStore
from tests.conftest import require
from tests.helpers.clock import FakeClock
from tests.helpers.etcd import EtcdServer, free_port, make_tls
from tests.helpers.etcd import available as etcd_available
s = SqliteStore(sys.argv[1])
for i in range(20):
    assert s.create(f"/proc/{i:02d}", b"child")
s.close()
"""


def test_sqlite_two_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    s = SqliteStore(path)
    w = Collector(s, "/proc/", s.revision() + 1)
    try:
        root = Path(__file__).resolve().parent.parent
        subprocess.run([sys.executable, "-c", _WRITER, path], check=True, cwd=root, timeout=30)
        events = w.wait_for(20)  # seen by polling: no in-process wake-up crosses processes
        assert [e.key for e in events] == [f"/proc/{i:02d}" for i in range(20)]
        assert not s.create("/proc/00", b"parent")
        assert s.revision() == events[-1].revision
    finally:
        w.close()
        s.close()


def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.db")
    with SqliteStore(path, busy_timeout=0.05) as s:
        import sqlite3

        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable):
                s.put("/k", b"x")
        finally:
            other.execute("ROLLBACK")
            other.close()
        s.put("/k", b"x")


def test_open_store_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "state.db"
    s = open_store(f"sqlite://{path}")
    assert isinstance(s, SqliteStore) and isinstance(s, Store)
    s.put("/k", b"v")
    s.close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    s = open_store(f"sqlite://{path}")
    assert s.get("/k") is not None
    s.close()


def test_open_store_etcd(contract_etcd: EtcdServer) -> None:
    with open_store(contract_etcd.url) as s:
        assert isinstance(s, EtcdStore)
        s.ping()
    two = open_store(f"etcd://127.0.0.1:1,{contract_etcd.endpoint}")
    assert isinstance(two, EtcdStore)
    two.close()


@pytest.mark.parametrize(
    "url",
    [
        "etcd://",
        "etcd://host",
        "etcd://host:0",
        "etcd://host:x",
        "etcd://h:1/prefix",
        "etcd://u@h:1",
    ],
)
def test_open_store_bad_etcd_urls(url: str) -> None:
    with pytest.raises(ValueError, match="etcd"):
        open_store(url)


def test_etcd_down_is_unavailable_fast() -> None:
    """Nothing listens on the port: calls fail with StoreUnavailable within the deadline."""
    port = free_port()
    with open_store(f"etcd://127.0.0.1:{port}", timeout=1.0) as s:
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                s.get("/k")
            assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/var/lib/moor/state.db",
        "sqlite://relative.db",
        "sqlite://host/abs.db",
        "sqlite:///x.db?mode=ro",
        "sqlite:relative.db",
        "redis://localhost",
        "sqlite:///tmp/dir/",
    ],
)
def test_open_store_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


def test_etcd_outage_then_recovery(contract_etcd: EtcdServer) -> None:
    """etcd goes away: calls fail fast with StoreUnavailable; it returns: the same client works."""
    contract_etcd.wipe()
    with open_store(contract_etcd.url, timeout=1.0) as s:
        s.put("/outage/a", b"1")
        contract_etcd.stop()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    s.create("/outage/b", b"2")
                assert time.monotonic() - t0 < 1.5
        finally:
            contract_etcd.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert s.create("/outage/b", b"2")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "client did not recover after etcd returned"
                time.sleep(0.1)
        kv = s.get("/outage/a")
        assert kv is not None and kv.value == b"1"  # data survived the restart


def test_etcd_mutual_tls(tmp_path: Path) -> None:
    """--etcd-cafile/certfile/keyfile: TLS with a client certificate; without one etcd refuses."""
    ok, why = etcd_available()
    require(ok, why)
    tls = make_tls(tmp_path / "pki")
    server = EtcdServer(tmp_path / "etcd", tls=tls)
    server.start()
    try:
        url = f"etcd://{server.endpoint}"
        flags = ["--store", url, "--etcd-cafile", tls.ca]
        flags += ["--etcd-certfile", tls.client_cert, "--etcd-keyfile", tls.client_key]
        cfg = load_config(flags)  # the daemon's own path from flags to the store
        with open_store(cfg.store, **cfg.store_options()) as s:
            s.put("/tls/a", b"1")
            assert s.get("/tls/a").value == b"1"  # type: ignore[union-attr]
        with open_store(url, ca_file=tls.ca, timeout=1.0) as s, pytest.raises(StoreUnavailable):
            s.get("/tls/a")  # no client certificate
        with open_store(url, timeout=1.0) as s, pytest.raises(StoreUnavailable):
            s.get("/tls/a")  # plaintext to a TLS port
    finally:
        server.stop()
