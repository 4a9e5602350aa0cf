"""Each daemon's store watch covers only its own node's records (ipamd/sync.py), on real etcd.

A daemon that watched the whole key prefix would get every pod change of the cluster; it must
get only the IP records of its own subnets (and, for now, the subnet leases), yet still see a
release of one of its IPs made through another node's daemon, also in a subnet it leased after
its watch started (the follower re-scopes its watch), and miss nothing while it switches.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cni_plugin.attachments import AttachmentLocks
from ipamd.allocator import NodeAllocator
from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from ipamd.guard import StoreGuard
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Owner
from ipamd.network_config import NetworkConfig
from ipamd.ops import ClusterOps
from ipamd.store import Store, open_store
from ipamd.store.keys import Keys
from ipamd.sync import StoreFollower
from tests.conftest import start_daemon
from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import Daemon

NETWORK = "10.200.0.0/16"
# /28 subnets from 10.200.0.240: the first (key text "10.200.0.2...") does not cover the second,
# 10.200.1.0/28 or 10.200.1.16/28 ("10.200.1."), so taking one more widens the watch.
SMALL = NetworkConfig.parse(NETWORK, 28, subnet_min="10.200.0.240/28")


def unique_prefix() -> str:
    return f"/mws-{secrets.token_hex(4)}"


def eventually(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- real daemons ---------------------------------------------------------------------------
@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(n: int, **kw: object) -> Daemon:
        d = start_daemon(tmp_path / f"mws{n}", f"mws{n}", NETWORK, f"mwsbr{n}", cooldown=0, **kw)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.cleanup_host()


def allocate(d: Daemon, cid: str, requested: str = "") -> str:
    stub = ipam_pb2_grpc.IpamStub(grpc.insecure_channel(f"unix:{d.grpc_socket}"))
    owner = ipam_pb2.Owner(network="mws", container_id=cid, ifname="eth0")
    r = stub.Allocate(ipam_pb2.AllocateRequest(owner=owner, requested_ip=requested), timeout=10)
    return r.allocation.ip.split("/")[0]


def release(d: Daemon, cid: str) -> None:
    stub = ipam_pb2_grpc.IpamStub(grpc.insecure_channel(f"unix:{d.grpc_socket}"))
    stub.Release(ipam_pb2.ReleaseRequest(handle=handle(cid)), timeout=10)


def handle(cid: str) -> ipam_pb2.Handle:
    return ipam_pb2.Handle(network="mws", container_id=cid, ifname="eth0")


def metric(d: Daemon, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(d.metrics_url, timeout=10).read().decode()
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def ip_events(d: Daemon) -> float:
    return metric(d, "moor_store_watch_events_total", key="ip")


def restarts(d: Daemon) -> tuple[float, float]:
    return (
        metric(d, "moor_store_watch_restarts_total", reason="error"),
        metric(d, "moor_store_watch_restarts_total", reason="rescope"),
    )


def held_ips(d: Daemon) -> list[str]:
    return [a["ip"].split("/")[0] for a in d.status()["allocations"]]


def settled(what: str, read: Callable[[], float], want: float) -> None:
    """`read` reaches `want` and stays there (a count that went past it would show here)."""
    eventually(what, lambda: read() >= want)
    time.sleep(0.5)
    assert read() == want, what


def test_a_node_watches_only_its_own_ips_yet_sees_their_release_elsewhere(
    daemons: Callable[..., Daemon], etcd_server: EtcdServer
) -> None:
    prefix = unique_prefix()
    a = daemons(1, store_url=etcd_server.url, key_prefix=prefix)
    b = daemons(2, store_url=etcd_server.url, key_prefix=prefix)
    assert [s["subnet"] for s in b.status()["subnets"]] == ["10.200.1.0/24"]
    mine = [allocate(b, f"b{i}") for i in range(2)]
    settled("b's own two allocations", lambda: ip_events(b), 2)

    for i in range(10):  # churn on a's subnet: 10 allocations, 5 releases
        allocate(a, f"a{i}")
    for i in range(5):
        release(a, f"a{i}")
    allocate(b, "b-sentinel")  # the one change b must see after a's fifteen
    settled("b to see its own allocation and none of a's", lambda: ip_events(b), 3)
    assert ip_events(a) >= 15  # a does see its own (the counter counts)

    r = a.moorctl("release", "--ip", mine[0])
    assert r.returncode == 0, r.stderr
    eventually("b to forget the IP released through a", lambda: mine[0] not in held_ips(b))
    assert ip_events(b) == 4  # the release came by b's watch ...
    assert restarts(b) == (0, 0)  # ... not by a re-sync
    assert allocate(b, "again", requested=mine[0]) == mine[0]  # cooldown 0: free at once


def test_after_taking_a_second_subnet_a_node_follows_it_too(
    daemons: Callable[..., Daemon], etcd_server: EtcdServer
) -> None:
    prefix = unique_prefix()
    with open_store(etcd_server.url) as store:  # what `moorctl network init` writes
        assert store.create(Keys(prefix).config(), SMALL.with_new_cluster_id().to_json())
    b = daemons(4, store_url=etcd_server.url, key_prefix=prefix, subnet_len=28)
    a = daemons(3, store_url=etcd_server.url, key_prefix=prefix, subnet_len=28)
    assert [s["subnet"] for s in b.status()["subnets"]] == ["10.200.0.240/28"]
    assert [s["subnet"] for s in a.status()["subnets"]] == ["10.200.1.0/28"]
    first = [allocate(b, f"b{i}") for i in range(13)]  # .242 to .254: the first subnet is full
    assert first[-1] == "10.200.0.254"
    assert restarts(b) == (0, 0)

    new_ip = allocate(b, "b-next")
    assert new_ip == "10.200.1.18"  # from 10.200.1.16/28, the next free one
    eventually("b to re-scope its watch", lambda: restarts(b) == (0, 1))
    before = ip_events(b)

    r = a.moorctl("release", "--ip", new_ip)
    assert r.returncode == 0, r.stderr
    eventually("b to forget the IP released through a", lambda: new_ip not in held_ips(b))
    # By the re-scoped watch (the release came after the re-sync's listing, and no other re-sync
    # followed). The count may also hold b-next's own change, replayed from the re-sync revision.
    assert restarts(b) == (0, 1)
    assert ip_events(b) > before
    assert allocate(b, "again", requested=new_ip) == new_ip


# ---- in process: a release inside the switch from one watch to the next ---------------------
@dataclass
class Node:
    leases: SubnetLeaseManager
    allocator: NodeAllocator
    guard: StoreGuard
    follower: StoreFollower
    restarted: list[str]
    observed: list[tuple[str, str]]  # (kind, ip) of every change the follower applied


@pytest.fixture
def store(etcd_server: EtcdServer) -> Iterator[Store]:
    with open_store(etcd_server.url) as s:
        yield s


@pytest.fixture
def node(store: Store, tmp_path: Path) -> Iterator[Node]:
    keys = Keys(unique_prefix())
    leases = SubnetLeaseManager(
        store, keys, "mws5", SMALL, ttl=3600, state_file=str(tmp_path / "lease-mws5.json")
    )
    leases.ensure_network_config()
    leases.acquire()
    allocator = NodeAllocator(store, keys, "mws5", leases, cooldown=0)
    guard = StoreGuard(
        store, keys, leases, allocator, locks=AttachmentLocks(), host_links=lambda: set()
    )
    guard.probe()
    revision = store.revision()
    allocator.load()
    stop = threading.Event()
    restarted: list[str] = []
    observed: list[tuple[str, str]] = []
    real_observe = allocator.observe

    def observe(
        kind: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, revision: int = 0
    ) -> None:
        observed.append((kind, str(ip)))
        real_observe(kind, ip, revision)

    allocator.observe = observe  # type: ignore[method-assign]
    follower = StoreFollower(
        store, keys, leases, allocator, guard, stop, on_restart=restarted.append
    )
    leases.on_subnets_changed = follower.subnets_changed
    thread = threading.Thread(target=follower.run, args=(revision + 1,), daemon=True)
    thread.start()
    try:
        yield Node(leases, allocator, guard, follower, restarted, observed)
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive(), "the follower did not stop"


@pytest.mark.parametrize("moment", ["before_probe", "before_listing", "before_new_watch"])
def test_a_release_during_the_re_scope_is_not_missed(node: Node, store: Store, moment: str) -> None:
    """The 14th pod takes a second subnet; in the follower's switch to the wider watch, another
    node releases that pod's IP at a chosen moment (a deliberate pause there). Whichever moment,
    the node's memory frees the IP."""
    for i in range(13):
        node.allocator.allocate(Owner("mws", f"p{i}", "eth0"))
    allocated = threading.Event()
    released: list[str] = []
    victim = Owner("mws", "victim", "eth0")

    def release_elsewhere() -> None:
        assert allocated.wait(10), "the allocation that took the second subnet did not return"
        alloc = node.allocator.get(*victim.handle)
        assert alloc is not None
        ClusterOps(store, node.leases.keys, node="mws6").release_ip(alloc.ip)
        released.append(str(alloc.ip))

    hooked(node, moment, release_elsewhere)
    alloc, _ = node.allocator.allocate(victim)
    assert alloc.subnet == ipaddress.ip_network("10.200.1.0/28")
    allocated.set()
    eventually("the follower to re-scope", lambda: node.restarted == ["rescope"])
    assert released == [str(alloc.ip)]
    # A barrier: the watch brings the changes of one key range in revision order, so once this
    # allocation's own change is applied, every earlier one of the new subnet is too.
    barrier, _ = node.allocator.allocate(Owner("mws", "barrier", "eth0"))
    assert barrier.subnet == alloc.subnet
    eventually(
        "the barrier to come by the watch", lambda: ("put", str(barrier.ip)) in node.observed
    )
    assert node.allocator.get(*victim.handle) is None
    # Which way the release arrived shows the pause hit the window it names: before the probe
    # it is in the listing only; after the probe the new watch brings it (too).
    came_by_watch = ("delete", str(alloc.ip)) in node.observed
    assert came_by_watch == (moment != "before_probe")
    again, existed = node.allocator.allocate(Owner("mws", "again", "eth0"), requested=alloc.ip)
    assert (again.ip, existed) == (alloc.ip, False)
    assert node.restarted == ["rescope"]


def hooked(node: Node, moment: str, action: Callable[[], None]) -> None:
    """Run `action` once, at `moment` of the follower's next re-sync: after the old watch ended
    and before the guard's probe reads the revision to watch from; between that probe and the
    allocator's listing; or after the listing, before the new watch starts."""
    done = threading.Event()

    def once(real: Callable[[], object], before: bool) -> Callable[[], object]:
        def call() -> object:
            first = not done.is_set()
            done.set()
            if first and before:
                action()
            result = real()
            if first and not before:
                action()
            return result

        return call

    if moment == "before_probe":
        node.guard.resync = once(node.guard.resync, before=True)  # type: ignore[method-assign]
    elif moment == "before_listing":
        node.allocator.load = once(node.allocator.load, before=True)  # type: ignore[method-assign]
    else:
        node.allocator.load = once(node.allocator.load, before=False)  # type: ignore[method-assign]


def test_a_replayed_change_from_before_the_listing_is_not_applied_again(
    store: Store, tmp_path: Path
) -> None:
    """After a re-sync the watch replays from the probe revision, before the listing. A delete
    of an IP that was allocated again before the listing must not drop the new holder from
    memory; a delete after the listing must."""
    keys = Keys(unique_prefix())
    leases = SubnetLeaseManager(
        store, keys, "mws6", SMALL, ttl=3600, state_file=str(tmp_path / "lease-mws6.json")
    )
    leases.ensure_network_config()
    leases.acquire()
    allocator = NodeAllocator(store, keys, "mws6", leases, cooldown=0)
    first, _ = allocator.allocate(Owner("mws", "old", "eth0"))
    deleted_at = store.revision() + 1
    allocator.release("mws", "old", "eth0")
    again, _ = allocator.allocate(Owner("mws", "new", "eth0"), requested=first.ip)
    assert again.ip == first.ip
    allocator.load()  # the re-sync's listing: the IP is held by "new"
    allocator.observe("delete", first.ip, deleted_at)  # the replayed old delete
    assert allocator.get("mws", "new", "eth0") == again
    allocator.observe("delete", first.ip, store.revision() + 1)  # a delete after the listing
    assert allocator.get("mws", "new", "eth0") is None
