"""The store guard (ipamd/guard.py) on a real SQLite store, in-process: which disappearances are
losses and which were done on purpose, what is put back, and what is a conflict.

The pods are records whose liveness the kernel would tell: an allocation with no netns path is
alive by rule (nothing says otherwise); one whose netns path does not exist and whose host veth is
not among the host's links is gone. The e2e version on etcd is tests/test_store_loss.py.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cni_plugin.attachments import AttachmentLocks
from ipamd.allocator import NodeAllocator
from ipamd.errors import StoreRecovering
from ipamd.guard import StoreGuard
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Allocation, Owner, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.ops import ClusterOps
from ipamd.store.keys import Keys
from ipamd.store.sqlite import SqliteStore
from tests.helpers.clock import FakeClock

NETWORK = "10.222.0.0/16"


@dataclass
class Node:
    name: str
    leases: SubnetLeaseManager
    allocator: NodeAllocator
    guard: StoreGuard
    ipam: NodeIpam
    conflicts: list[tuple[str, str]]
    recoveries: list[int]


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.store = SqliteStore(str(tmp / "store.db"), clock=self.clock)
        self.keys = Keys("/mgd")
        self.links: set[str] = set()

    def node(self, name: str) -> Node:
        leases = SubnetLeaseManager(
            self.store,
            self.keys,
            name,
            NetworkConfig.parse(NETWORK, 24),
            ttl=3600,
            state_file=str(self.tmp / f"lease-{name}.json"),
            clock=self.clock,
        )
        leases.ensure_network_config()
        leases.acquire()
        allocator = NodeAllocator(
            self.store, self.keys, name, leases, cooldown=60, clock=self.clock
        )
        allocator.load()
        conflicts: list[tuple[str, str]] = []
        recoveries: list[int] = []
        guard = StoreGuard(
            self.store,
            self.keys,
            leases,
            allocator,
            locks=AttachmentLocks(),
            host_links=lambda: set(self.links),
            on_recovery=lambda: recoveries.append(1),
            on_conflict=lambda kind, sentence: conflicts.append((kind, sentence)),
            clock=self.clock,
        )
        leases.on_conflict = guard.conflict
        guard.probe()
        ipam = NodeIpam(self.store, name, leases, allocator, guard=guard)
        return Node(name, leases, allocator, guard, ipam, conflicts, recoveries)

    def record(self, ip: str) -> Allocation | None:
        addr = ipaddress.ip_address(ip)
        kv = self.store.get(self.keys.ip(addr))
        return Allocation.from_json(addr, kv.value) if kv is not None else None


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    yield w
    w.store.close()


def pod(node: Node, cid: str, **kw: str) -> Allocation:
    alloc, existed = node.ipam.allocate(Owner("net", cid, "eth0", "ns", cid), **kw)  # type: ignore[arg-type]
    assert not existed
    return alloc


def test_lost_records_are_put_back_and_allocation_waits_meanwhile(world: World) -> None:
    n = world.node("mgd1")
    a, b = pod(n, "a"), pod(n, "b")
    world.store.delete(world.keys.ip(a.ip))  # the store lost a's record: no release record
    world.store.delete(world.keys.handle(*a.owner.handle))
    n.guard.verify()
    assert "the record of" in (n.guard.reason() or "")
    with pytest.raises(StoreRecovering):
        n.ipam.allocate(Owner("net", "c", "eth0"))
    assert "re-asserting" in (n.ipam.not_ready_reason() or "")
    n.guard.check()
    assert n.guard.reason() is None and n.recoveries == [1]
    assert world.record(str(a.ip)) == a and world.record(str(b.ip)) == b
    assert world.store.get(world.keys.handle(*a.owner.handle)).value == str(a.ip).encode()  # type: ignore[union-attr]
    assert pod(n, "c").ip not in (a.ip, b.ip)


def test_a_release_made_elsewhere_is_not_a_loss(world: World) -> None:
    n = world.node("mgd1")
    a = pod(n, "a")
    ClusterOps(world.store, world.keys, node="mgd-admin").release_ip(a.ip)  # writes released/
    n.guard.resync()
    assert n.guard.reason() is None and n.recoveries == []
    assert world.record(str(a.ip)) is None and n.allocator.get("net", "a", "eth0") is None


def test_a_wiped_store_gets_config_subnet_and_live_pods_back(world: World, tmp_path: Path) -> None:
    n = world.node("mgd1")
    live = pod(n, "live")
    gone = pod(n, "gone", netns=str(tmp_path / "no-such-netns"), host_veth="vethgone")
    cluster_id = n.leases.config.cluster_id
    for kv in world.store.list_prefix("/mgd/")[0]:
        world.store.delete(kv.key)
    n.guard.probe()
    assert (
        n.guard.reason()
        == "re-asserting this node's state: the network config is gone from the store"
    )
    n.guard.check()
    stored = NetworkConfig.from_json(world.store.get(world.keys.config()).value)  # type: ignore[union-attr]
    assert stored.cluster_id == cluster_id
    subnet = n.leases.subnets[0]
    lease = SubnetLease.from_json(subnet, world.store.get(world.keys.subnet(subnet)).value)  # type: ignore[union-attr]
    assert lease.node == "mgd1"
    assert world.record(str(live.ip)) == live
    assert world.record(str(gone.ip)) is None  # its pod is gone: forgotten, not put back
    assert n.allocator.get(*gone.owner.handle) is None


def test_a_subnet_another_node_took_is_a_conflict_and_never_used(world: World) -> None:
    n1 = world.node("mgd1")
    a = pod(n1, "a")
    subnet = n1.leases.subnets[0]
    world.store.delete(world.keys.subnet(subnet))  # lost...
    world.store.create(  # ... and leased by another node before mgd1 put it back
        world.keys.subnet(subnet), SubnetLease(subnet, "mgd2", world.clock()).to_json()
    )
    n1.guard.verify()
    n1.guard.check()
    assert [kind for kind, _ in n1.conflicts] == ["subnet", "subnet"]
    assert "held by mgd2" in n1.conflicts[0][1] and list(n1.guard.conflicts)
    assert f"{a.ip} of pod ns/a" in n1.conflicts[1][1]  # and which pod it leaves stranded
    assert subnet not in n1.leases.subnets and n1.leases.has_lease()  # a new one instead
    assert world.record(str(a.ip)) == a  # its pod's record still protects the IP
    assert pod(n1, "b").ip not in subnet  # never from the subnet it lost


def test_an_ip_someone_else_holds_is_a_conflict(world: World) -> None:
    n = world.node("mgd1")
    a = pod(n, "a")
    other = Allocation(a.ip, a.subnet, Owner("net", "intruder", "eth0"), "mgd9", world.clock())
    world.store.delete(world.keys.ip(a.ip))
    world.store.put(world.keys.ip(a.ip), other.to_json())
    n.guard.verify()
    n.guard.check()
    assert [kind for kind, _ in n.conflicts] == ["ip"]
    assert "intruder" in n.conflicts[0][1]


def test_an_admin_removal_is_not_a_loss(world: World) -> None:
    n1, admin = world.node("mgd1"), world.node("mgd2")
    pod(n1, "a")
    ClusterOps(world.store, world.keys, node=admin.name).remove_node("mgd1")
    n1.guard.resync()
    assert n1.guard.reason() is None and n1.recoveries == []
    assert not n1.leases.has_lease() and n1.conflicts == []
    assert json.loads(world.store.get(world.keys.removal("mgd1")).value)["by"] == "mgd2"  # type: ignore[union-attr]


def test_another_network_in_the_store_keeps_the_node_from_allocating(world: World) -> None:
    n = world.node("mgd1")
    world.store.put(
        world.keys.config(), NetworkConfig.parse("10.99.0.0/16", 24, cluster_id="x").to_json()
    )
    n.guard.check()
    assert [kind for kind, _ in n.conflicts] == ["config"]
    n.guard.check()  # reported once, however often it is retried
    assert len(n.conflicts) == 1
    assert "re-asserting" in (n.ipam.not_ready_reason() or "")
    with pytest.raises(StoreRecovering):
        n.ipam.allocate(Owner("net", "c", "eth0"))


def test_the_same_network_initialised_again_is_adopted(world: World) -> None:
    n = world.node("mgd1")
    a = pod(n, "a")
    for kv in world.store.list_prefix("/mgd/")[0]:
        world.store.delete(kv.key)
    assert ClusterOps(world.store, world.keys).init_network(NetworkConfig.parse(NETWORK, 24))
    fresh = NetworkConfig.from_json(world.store.get(world.keys.config()).value).cluster_id  # type: ignore[union-attr]
    n.guard.check()
    assert n.guard.reason() is None and n.leases.config.cluster_id == fresh
    assert world.record(str(a.ip)) == a
    remembered = json.loads((world.tmp / "lease-mgd1.json").read_text())
    assert remembered["config"]["clusterID"] == fresh


def test_a_store_that_answers_as_another_cluster_is_a_loss(world: World, tmp_path: Path) -> None:
    n = world.node("mgd1")
    a = pod(n, "a")
    other = SqliteStore(str(tmp_path / "other.db"), clock=world.clock)  # same address, new store
    n.guard.store = other
    n.guard.probe()
    assert "answers as cluster" in (n.guard.reason() or "")
    n.leases.store = n.guard.reasserter.store = other  # all of the daemon now talks to it
    n.guard.check()
    assert n.guard.reason() is None
    assert other.get(world.keys.ip(a.ip)) is not None
    other.close()
