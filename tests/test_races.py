"""Races found in review, each made to happen with a deliberate pause (tests/helpers/hooked.py on a
real SQLite store) so the old interleaving is forced, not hoped for. Each test failed on the code
before its fix.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cni_plugin.attachments import AttachmentLocks
from ipamd.allocator import NodeAllocator
from ipamd.config import DaemonConfig
from ipamd.daemon import Daemon
from ipamd.journal import ReleaseJournal
from ipamd.leakgc import LeakCollector
from ipamd.leases import SubnetLeaseManager
from ipamd.metrics import Metrics
from ipamd.model import Owner
from ipamd.network_config import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.store.base import StoreUnavailable
from ipamd.store.keys import Keys
from ipamd.store.sqlite import SqliteStore
from tests.helpers.clock import FakeClock
from tests.helpers.hooked import HookedStore

NETWORK = "10.223.0.0/16"
KEYS = Keys("/mrc")


@pytest.fixture
def store(tmp_path: Path) -> HookedStore:
    s = HookedStore(SqliteStore(str(tmp_path / "store.db")))
    yield s
    s.store.close()


def node(
    store: HookedStore, tmp: Path, name: str = "mrc1"
) -> tuple[SubnetLeaseManager, NodeAllocator]:
    leases = SubnetLeaseManager(
        store,  # type: ignore[arg-type]
        KEYS,
        name,
        NetworkConfig.parse(NETWORK, 24),
        ttl=60,
        state_file=str(tmp / f"lease-{name}.json"),
    )
    leases.ensure_network_config()
    leases.acquire()
    allocator = NodeAllocator(store, KEYS, name, leases, cooldown=0)  # type: ignore[arg-type]
    allocator.load()
    return leases, allocator


def run(target: object) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_journal_replay_never_frees_what_a_new_add_took(store: HookedStore, tmp_path: Path) -> None:
    """A DEL journaled while the store was away; the replay takes its snapshot; an ADD of the
    same attachment applies the DEL itself and allocates again; then the replay goes on. It must
    not release the new allocation."""
    leases, allocator = node(store, tmp_path)
    journal = ReleaseJournal(str(tmp_path / "releases.jsonl"))
    locks = AttachmentLocks()
    ipam = NodeIpam(store, "mrc1", leases, allocator, journal=journal, locks=locks)  # type: ignore[arg-type]
    owner = Owner("net", "c1", "eth0")
    ipam.allocate(owner)

    def down(*_: object) -> None:
        raise StoreUnavailable("etcd is away")

    store.before["txn"] = down
    ipam.release(*owner.handle)  # journaled
    del store.before["txn"]

    snapshot_taken, go_on = threading.Event(), threading.Event()
    real_pending = journal.pending

    def pending() -> list:
        entries = real_pending()
        snapshot_taken.set()
        go_on.wait(5)
        return entries

    journal.pending = pending  # type: ignore[method-assign]
    replay = run(ipam.replay_journal)
    assert snapshot_taken.wait(5)
    with locks.hold(("c1", "eth0"), 5):  # the CNI ADD holds its attachment's lock
        second, existed = ipam.allocate(owner)
    assert not existed
    go_on.set()
    replay.join(5)
    assert allocator.get(*owner.handle) == second
    assert store.get(KEYS.ip(second.ip)) is not None
    assert store.get(KEYS.handle(*owner.handle)) is not None


def test_expired_lease_is_granted_once_by_concurrent_renewal_and_growth(
    store: HookedStore, tmp_path: Path
) -> None:
    leases, _ = node(store, tmp_path)
    store.revoke_lease(leases.lease_id)  # expired: the subnet keys went with it
    grants: list[int] = []

    def slow_grant(*_: object) -> None:
        grants.append(1)
        time.sleep(0.3)  # long enough for the other thread to want a lease too

    store.before["grant_lease"] = slow_grant
    threads = [run(leases.renew_once), run(leases.acquire_additional)]
    for t in threads:
        t.join(10)
    assert len(grants) == 1
    for subnet in leases.subnets:
        kv = store.get(KEYS.subnet(subnet))
        assert kv is not None and kv.lease == leases.lease_id


def test_reload_waits_for_an_allocation_in_flight(store: HookedStore, tmp_path: Path) -> None:
    """The follower's reload lists the store while an allocation's txn is about to commit, and
    swaps the pools after that allocation updated memory: the allocation must not be lost."""
    _, allocator = node(store, tmp_path)
    listed, allocated = threading.Event(), threading.Event()
    pausing = True

    def before_txn(*_: object) -> None:
        if pausing:
            listed.wait(1)  # fixed code: the reload cannot list while we are in flight

    def after_list(prefix: str) -> None:
        if pausing and prefix.startswith(KEYS.ips_prefix()):
            listed.set()
            allocated.wait(1)  # old code: the allocation finishes here, before the swap

    store.before["txn"] = before_txn
    store.after["list_prefix"] = after_list
    result: list[object] = []

    def allocate() -> None:
        result.append(allocator.allocate(Owner("net", "c1", "eth0"))[0])
        allocated.set()

    a = run(allocate)
    time.sleep(0.1)  # the allocation is in its txn hook
    b = run(allocator.load)
    a.join(10)
    b.join(10)
    pausing = False
    alloc = result[0]
    assert allocator.get("net", "c1", "eth0") == alloc
    assert allocator.status()[0].used == 1


def test_a_failed_start_leaves_no_renewal_thread(tmp_path: Path) -> None:
    cfg = DaemonConfig(node_name="mrc1", state_dir=str(tmp_path), network=NETWORK)
    d = Daemon(cfg)
    d.metrics, d.keys, d.public_ip, d.locks = Metrics(), KEYS, "", AttachmentLocks()
    hooked = HookedStore(SqliteStore(str(tmp_path / "store.db")))
    d.store = hooked  # type: ignore[assignment]
    failures = [1, 1]

    def flaky(prefix: str) -> None:
        if prefix.startswith(KEYS.ips_prefix()) and failures:
            failures.pop()
            raise StoreUnavailable("etcd blinked")

    hooked.before["list_prefix"] = flaky

    def renewers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "lease-renewal" and t.is_alive())

    before = renewers()
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            d._node_ipam(cfg.network_config())  # type: ignore[arg-type]
        assert renewers() == before
    d._node_ipam(cfg.network_config())  # type: ignore[arg-type]
    assert renewers() == before + 1
    d.stop()


def test_a_failing_repair_does_not_starve_the_leak_gc() -> None:
    """Pure scheduling: the timer runs each task on its own."""
    d = Daemon(DaemonConfig(leak_gc_interval=0.05))
    swept = threading.Event()

    class Part:
        def set_serving(self, serving: bool) -> None: ...
        def not_ready_reason(self) -> None: ...
        def maintain(self) -> None:
            raise OSError("the bridge is gone and cannot be made")

        def sweep(self) -> None:
            swept.set()

    d.grpc = d.ipam = d.plugin = d.leak_gc = Part()  # type: ignore[assignment]
    timers = run(d._timers)
    try:
        assert swept.wait(5)
    finally:
        d._stop.set()
        timers.join(5)


def test_a_release_the_leak_gc_could_not_do_is_retried_without_a_new_grace(
    store: HookedStore, tmp_path: Path
) -> None:
    leases, allocator = node(store, tmp_path)
    ipam = NodeIpam(store, "mrc1", leases, allocator)  # type: ignore[arg-type]
    alloc, _ = ipam.allocate(Owner("net", "c1", "eth0"), netns=str(tmp_path / "gone"))
    clock = FakeClock(0)
    gc = LeakCollector(ipam, lambda: set(), grace=10, clock=clock)
    assert gc.sweep() == []  # a candidate from now on
    clock.advance(11)
    failing = [1]

    def once(*_: object) -> None:
        if failing:
            failing.pop()
            raise StoreUnavailable("etcd blinked")

    store.before["txn"] = once
    assert gc.sweep() == []  # its grace is over, but the release failed
    clock.advance(1)
    assert gc.sweep() == [alloc]  # retried at once, not after another grace period


def test_the_veth_reaper_takes_a_bounded_backlog() -> None:
    """DEL hands at most BACKLOG host veths to the background; past that it deletes inline, so
    what an ADD into a reused netns may have to wait for stays short."""
    from cni_plugin.reaper import BACKLOG, HostVethReaper

    reaper = HostVethReaper()
    hold, done = threading.Event(), []
    try:
        for i in range(BACKLOG):
            assert not reaper.full()
            reaper.submit(f"mrcnone{i}", lambda: done.append(1), first=lambda: hold.wait(5))
        assert reaper.full() and reaper.busy()
    finally:
        hold.set()
        assert reaper.drain(5)
        reaper.stop()
    assert len(done) == BACKLOG and not reaper.busy()
