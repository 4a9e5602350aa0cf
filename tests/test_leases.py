"""Node subnet leases (ipamd/leases.py) on both stores: claim order, TTL, renewal, loss.

SQLite runs on an injected clock, so expiry is instant; etcd runs on real time with short TTLs
(the `elapse` helper sleeps), because etcd's lessor keeps its own clock. The lease records' own
timestamps come from the injected clock on both.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipamd.allocator import NodeAllocator
from ipamd.errors import NetworkExhausted
from ipamd.leases import RENEW_RETRY, SubnetLeaseManager
from ipamd.model import Owner, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.store.base import Store
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from ipamd.store.sqlite import SqliteStore
from tests.helpers.clock import FakeClock
from tests.helpers.etcd import EtcdServer

TTL = 2.0  # etcd's minimum; real time on etcd, so keep it short


@dataclass
class Env:
    store: Store
    keys: Keys
    clock: FakeClock
    elapse: Callable[[float], None]
    tmp: Path
    stores: list[Store]

    def manager(
        self, node: str, network: str = "10.237.0.0/16", subnet_len: int = 24, **kw: object
    ) -> SubnetLeaseManager:
        return SubnetLeaseManager(
            self.store,
            self.keys,
            node,
            NetworkConfig.parse(network, subnet_len),
            ttl=kw.pop("ttl", TTL),  # type: ignore[arg-type]
            state_file=str(self.tmp / f"lease-{node}.json"),
            clock=self.clock,
            **kw,  # type: ignore[arg-type]
        )

    def expire(self, mgr: SubnetLeaseManager) -> None:
        """Let the node's store lease run out and wait until the store has reaped it."""
        self.elapse(TTL + (0.001 if self.elapse == self.clock.advance else 0.6))
        deadline = time.monotonic() + 6
        while self.store.lease_ttl_remaining(mgr.lease_id) is not None:
            assert time.monotonic() < deadline, "lease did not expire"
            time.sleep(0.05)

    def holder(self, subnet: str) -> SubnetLease | None:
        net = ipaddress.ip_network(subnet)
        kv = self.store.get(self.keys.subnet(net))
        return None if kv is None else SubnetLease.from_json(net, kv.value)


@pytest.fixture(params=["sqlite", "etcd"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    clock = FakeClock()
    if request.param == "sqlite":
        store: Store = SqliteStore(str(tmp_path / "state.db"), clock=clock)
        elapse = clock.advance
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        store = open_store(server.url)

        def elapse(seconds: float) -> None:
            clock.advance(seconds)
            time.sleep(seconds)

    e = Env(store, Keys(f"/mls-{secrets.token_hex(4)}"), clock, elapse, tmp_path, [store])
    yield e
    for s in e.stores:
        s.close()


def test_claim_writes_lease_record_with_node_time_and_public_ip(env: Env) -> None:
    mgr = env.manager("mls-a", public_ip="198.51.100.7")
    mgr.ensure_network_config()
    assert mgr.acquire() == [ipaddress.ip_network("10.237.0.0/24")]
    lease = env.holder("10.237.0.0/24")
    assert lease is not None
    assert (lease.node, lease.since, lease.public_ip) == ("mls-a", env.clock(), "198.51.100.7")
    kv = env.store.get(env.keys.subnet(ipaddress.ip_network("10.237.0.0/24")))
    assert kv is not None and kv.lease == mgr.lease_id != 0
    remaining = env.store.lease_ttl_remaining(kv.lease)
    assert remaining is not None and 0 < remaining <= TTL
    state = json.loads((env.tmp / "lease-mls-a.json").read_text())
    assert (state["node"], state["subnets"]) == ("mls-a", ["10.237.0.0/24"])


def test_claim_order_own_lease_then_state_file_then_free(env: Env) -> None:
    a = env.manager("mls-a")
    a.acquire()
    b = env.manager("mls-b")
    assert b.acquire() == [ipaddress.ip_network("10.237.1.0/24")]
    # Own lease first: a restarted daemon keeps its subnet, keyed by node name.
    assert env.manager("mls-b").acquire() == [ipaddress.ip_network("10.237.1.0/24")]
    # Then the subnet it held last, from its state file, when its lease is gone.
    (env.tmp / "lease-mls-c.json").write_text('{"node": "mls-c", "subnets": ["10.237.9.0/24"]}')
    assert env.manager("mls-c").acquire() == [ipaddress.ip_network("10.237.9.0/24")]
    # Then a free one; a state-file subnet held by someone else is not taken.
    (env.tmp / "lease-mls-d.json").write_text('{"node": "mls-d", "subnets": ["10.237.1.0/24"]}')
    assert env.manager("mls-d").acquire() == [ipaddress.ip_network("10.237.2.0/24")]


def test_renewal_keeps_the_lease_past_its_ttl(env: Env) -> None:
    mgr = env.manager("mls-a")
    mgr.acquire()
    for _ in range(3):
        env.elapse(TTL * 0.6)
        assert mgr.renew_once() is True
    assert env.holder("10.237.0.0/24") is not None  # 1.8 TTLs later, still held
    assert mgr.subnets == [ipaddress.ip_network("10.237.0.0/24")]


def test_expired_lease_is_reclaimed_with_the_same_subnet(env: Env) -> None:
    mgr = env.manager("mls-a")
    mgr.acquire()
    env.expire(mgr)
    assert env.holder("10.237.0.0/24") is None  # the store reaped it with the lease
    assert mgr.renew_once() is True
    assert mgr.subnets == [ipaddress.ip_network("10.237.0.0/24")]
    lease = env.holder("10.237.0.0/24")
    assert lease is not None and lease.node == "mls-a"


def test_subnet_taken_while_lease_lost_is_never_used_again(env: Env) -> None:
    """The node whose subnet another node took while its lease was lost never allocates from it
    again: it reports the conflict and serves new pods from a subnet of its own."""
    conflicts: list[tuple[str, str]] = []
    a = env.manager("mls-a", on_conflict=lambda kind, sentence: conflicts.append((kind, sentence)))
    a.acquire()
    allocator = NodeAllocator(env.store, env.keys, "mls-a", a, cooldown=0, clock=env.clock)
    allocator.load()
    ipam = NodeIpam(env.store, "mls-a", a, allocator)
    first, _ = ipam.allocate(Owner("net", "c1", "eth0"))
    env.expire(a)
    env.manager("mls-b").acquire()  # the free subnet is the one a lost
    assert env.holder("10.237.0.0/24").node == "mls-b"  # type: ignore[union-attr]
    assert a.renew_once() is True
    assert [kind for kind, _ in conflicts] == ["subnet"] and "held by mls-b" in conflicts[0][1]
    assert a.subnets == [ipaddress.ip_network("10.237.1.0/24")]
    second, _ = ipam.allocate(Owner("net", "c2", "eth0"))
    assert second.ip in ipaddress.ip_network("10.237.1.0/24")
    assert ipam.not_ready_reason() is None


def test_concurrent_claims_get_distinct_subnets(env: Env) -> None:
    managers = [env.manager(f"mls-{i}") for i in range(8)]
    barrier = threading.Barrier(len(managers))
    got: dict[str, list[object]] = {}
    errors: list[BaseException] = []

    def claim(m: SubnetLeaseManager) -> None:
        try:
            barrier.wait()
            got[m.node] = list(m.acquire())
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    subnets = [s for held in got.values() for s in held]
    assert len(subnets) == len(set(subnets)) == 8
    for node, held in got.items():
        assert env.holder(str(held[0])).node == node  # type: ignore[union-attr]


def test_full_network_raises_network_exhausted(env: Env) -> None:
    for i in range(4):  # a /28 holds four /30s
        env.manager(f"mls-{i}", "10.237.200.0/28", 30).acquire()
    with pytest.raises(NetworkExhausted, match="no free /30"):
        env.manager("mls-9", "10.237.200.0/28", 30).acquire()


def test_renewal_schedule() -> None:
    mgr = SubnetLeaseManager(
        SqliteStore(":memory:"), Keys(), "n", NetworkConfig.parse("10.0.0.0/16", 24), ttl=86400
    )
    assert mgr.renewal_delay(True) == 28800  # a third of the TTL: two renewals may fail
    assert mgr.renewal_delay(False) == RENEW_RETRY  # the store did not answer: retry soon
    short = SubnetLeaseManager(
        SqliteStore(":memory:"), Keys(), "n", NetworkConfig.parse("10.0.0.0/16", 24), ttl=2
    )
    assert short.renewal_delay(True) == 1.0 and short.renewal_delay(False) == 1.0
