"""Issue 8: the Admin API, moorctl's cluster commands, and the richer network config.

Unit tests run NetworkConfig's validation and ipamd/ops.py on an in-process SQLite store. The
end-to-end tests run real moor-ipamd processes (nodes `mad`, `mad2`; bridges `madbr0`, `madbr1`;
network 10.241.0.0/16) sharing one store, SQLite or the session's etcd, and drive them with
`moorctl` as a subprocess, checking both its tables and its `--json`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ipamd.allocator import NodeAllocator
from ipamd.errors import ConfigMismatch, Conflict, NetworkExhausted, NotFound, Refused
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Owner
from ipamd.network_config import NetworkConfig
from ipamd.node_removal import MAX_TXN_KEYS
from ipamd.ops import ClusterOps
from ipamd.store.base import Put, Store
from ipamd.store.keys import Keys, covering_prefixes
from ipamd.store.open import open_store
from ipamd.store.sqlite import SqliteStore
from tests.conftest import start_daemon
from tests.helpers.clock import FakeClock
from tests.helpers.moor import REPO, Daemon, ExecRuntime, delete_netns, make_netns, plugin_config

NETWORK = "10.241.0.0/16"
NET = "madnet"  # CNI network name of every allocation here
_run_id = secrets.token_hex(3)


# ---- NetworkConfig --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"network": "10.241.0.0/33"}, "--network '10.241.0.0/33' is not a CIDR network"),
        ({"network": "fd00::/48", "subnet_len": 64}, "IPv6 pod networks are not supported"),
        ({"subnet_len": 16}, "--subnet-len 16 must be longer than the network's /16"),
        ({"subnet_len": 31}, "at most /30"),
        ({"subnet_min": "10.241.3.128/25"}, "--subnet-min 10.241.3.128/25 is not a /24 subnet"),
        ({"subnet_max": "10.242.0.0/24"}, "--subnet-max 10.242.0.0/24 is not a /24 subnet"),
        ({"subnet_min": "10.241.0.x/24"}, "--subnet-min '10.241.0.x/24' is not a CIDR"),
        (
            {"subnet_min": "10.241.9.0/24", "subnet_max": "10.241.8.0/24"},
            "--subnet-min 10.241.9.0/24 is above --subnet-max 10.241.8.0/24",
        ),
        ({"fixed_ranges": ["10.99.0.0/24"]}, "--fixed-range 10.99.0.0/24 is not inside"),
        ({"fixed_ranges": ["10.241.0.1/24"]}, "--fixed-range '10.241.0.1/24' is not a CIDR"),
        ({"backend": "udp"}, "--backend 'udp' is not one of host-gw, vxlan"),
    ],
)
def test_network_config_rejects_with_one_clear_sentence(kw: dict, needle: str) -> None:
    args = {"network": NETWORK, "subnet_len": 24, **kw}
    with pytest.raises(ValueError) as info:
        NetworkConfig.parse(args.pop("network"), args.pop("subnet_len"), **args)
    assert needle in str(info.value)


def test_network_config_json_is_backwards_compatible() -> None:
    old = NetworkConfig.from_json(b'{"network": "10.241.0.0/16", "subnetLen": 24}')
    assert old == NetworkConfig.parse(NETWORK, 24)
    assert (old.subnet_min, old.subnet_max, old.fixed_ranges, old.backend) == (
        None,
        None,
        (),
        "host-gw",
    )
    full = NetworkConfig.parse(
        NETWORK,
        26,
        subnet_min="10.241.1.0/26",
        subnet_max="10.241.9.192/26",
        fixed_ranges=["10.241.5.0/24", "10.241.7.7/32"],
        backend="vxlan",
    )
    assert NetworkConfig.from_json(full.to_json()) == full
    assert json.loads(full.to_json())["fixedRanges"] == ["10.241.5.0/24", "10.241.7.7/32"]
    assert full.backend_data("n1")["type"] == "vxlan" and "vni" in full.backend_data("n1")
    # Construction validates too, so a hand-edited store config cannot slip through.
    with pytest.raises(ValueError, match="not inside"):
        NetworkConfig.from_json(
            b'{"network": "10.241.0.0/16", "subnetLen": 24, "fixedRanges": ["10.0.0.0/8"]}'
        )


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"subnet_min": "10.241.0.32/28", "subnet_max": "10.241.2.16/28"},
        {"fixed_ranges": ["10.241.0.0/26", "10.241.1.5/32", "10.241.1.0/25", "10.241.3.250/31"]},
        {
            "subnet_min": "10.241.0.48/28",
            "subnet_max": "10.241.3.0/28",
            "fixed_ranges": ["10.241.0.0/23", "10.241.2.100/30"],
        },
        {"fixed_ranges": ["10.241.0.0/22"]},
    ],
)
def test_leaseable_subnets_agree_with_the_brute_force_definition(kw: dict) -> None:
    config = NetworkConfig.parse("10.241.0.0/22", 28, **kw)
    every = list(config.network.subnets(new_prefix=28))
    expected = [
        s
        for s in every
        if (config.subnet_min is None or s.network_address >= config.subnet_min.network_address)
        and (config.subnet_max is None or s.network_address <= config.subnet_max.network_address)
        and not any(s.overlaps(r) for r in config.fixed_ranges)
    ]
    assert list(config.leaseable_subnets()) == expected
    assert [s for s in every if config.leaseable(s)] == expected
    assert config.leaseable_count() == len(expected)


def test_leaseable_count_is_arithmetic_on_a_huge_network() -> None:
    config = NetworkConfig.parse("10.0.0.0/8", 30, fixed_ranges=["10.1.0.0/16"])
    started = time.monotonic()
    assert config.leaseable_count() == 2**22 - 2**14
    assert time.monotonic() - started < 0.1


# ---- ops.py on an in-process store ---------------------------------------------------------
class Cluster:
    """Several nodes' lease managers and allocators on one in-process SQLite store."""

    def __init__(self, tmp: Path, config: NetworkConfig, cooldown: float = 60.0) -> None:
        self.clock = FakeClock()
        self.store: Store = SqliteStore(str(tmp / "store.db"), clock=self.clock)
        self.keys = Keys("/mad")
        self.config = config
        self.cooldown = cooldown
        self.nodes: dict[str, NodeAllocator] = {}
        assert ClusterOps(self.store, self.keys).init_network(config)

    def node(self, name: str, public_ip: str = "") -> NodeAllocator:
        leases = SubnetLeaseManager(
            self.store,
            self.keys,
            name,
            self.config,
            ttl=3600,
            clock=self.clock,
            public_ip=public_ip,
        )
        leases.ensure_network_config()
        leases.acquire()
        alloc = NodeAllocator(
            self.store, self.keys, name, leases, cooldown=self.cooldown, clock=self.clock
        )
        alloc.load()
        self.nodes[name] = alloc
        return alloc

    def ops(self, node: str = "") -> ClusterOps:
        return ClusterOps(
            self.store,
            self.keys,
            node=node,
            cooldown=self.cooldown,
            local=lambda: self.nodes.get(node),
            clock=self.clock,
        )


def pod(cid: str, namespace: str = "", name: str = "") -> Owner:
    return Owner(NET, cid, "eth0", namespace, name, f"uid-{cid}" if name else "")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, NetworkConfig.parse(NETWORK, 24))
    yield c
    c.store.close()


def test_init_network_is_create_if_absent_and_idempotent(cluster: Cluster) -> None:
    ops = cluster.ops()
    assert ops.network() == cluster.config
    assert ops.init_network(cluster.config) is False  # the same again: fine
    with pytest.raises(ConfigMismatch, match="different network config"):
        ops.init_network(NetworkConfig.parse(NETWORK, 24, backend="vxlan"))
    assert ops.network() == cluster.config


def test_listing_filters_by_node_namespace_and_pod(cluster: Cluster) -> None:
    a, b = cluster.node("mad", "203.0.113.1"), cluster.node("mad2", "203.0.113.2")
    a.allocate(pod("a1", "ns1", "web-0"))
    a.allocate(pod("a2", "ns2", "db-0"))
    b.allocate(pod("b1", "ns1", "web-1"))
    b.allocate(pod("b2", "ns2", "db-1"))
    b.allocate(pod("b3"))  # no pod owner (e.g. cnitool)
    ops = cluster.ops("mad")
    leases = ops.leases()
    assert [(lease.node, lease.public_ip) for lease in leases] == [
        ("mad", "203.0.113.1"),
        ("mad2", "203.0.113.2"),
    ]
    assert leases[0].backend == {"type": "host-gw"}
    assert {x.owner.container_id for x in ops.allocations(node="mad2")} == {"b1", "b2", "b3"}
    assert {x.owner.container_id for x in ops.allocations(namespace="ns1")} == {"a1", "b1"}
    assert [x.owner.container_id for x in ops.allocations(pod="db-1")] == ["b2"]
    assert [x.owner.container_id for x in ops.allocations(node="mad", namespace="ns2")] == ["a2"]
    assert ops.allocations(node="nobody") == []
    assert len(ops.allocations()) == 5


def test_node_listing_reads_only_the_nodes_key_range(tmp_path: Path) -> None:
    """`ips --node` lists `<prefix>/ips/10.241.3.`, not every record of the cluster."""
    c = Cluster(tmp_path, NetworkConfig.parse(NETWORK, 24))
    nodes = [c.node(f"mad{i}") for i in range(12)]  # 10.241.0.0/24 .. 10.241.11.0/24
    for i, n in enumerate(nodes):
        for j in range(3):
            n.allocate(pod(f"c{i}-{j}"))
    listed: list[str] = []
    real = c.store.list_prefix

    def spy(prefix: str) -> tuple[list, int]:
        listed.append(prefix)
        return real(prefix)

    c.store.list_prefix = spy  # type: ignore[method-assign]
    got = c.ops().allocations(node="mad1")
    assert {x.owner.container_id for x in got} == {"c1-0", "c1-1", "c1-2"}
    assert "/mad/ips/10.241.1." in listed and "/mad/ips/" not in listed
    assert covering_prefixes(["a.1", "a.1.", "a.10.", "b."]) == ["a.1", "b."]


def test_release_by_ip_and_by_handle_are_owner_checked(cluster: Cluster) -> None:
    a, b = cluster.node("mad"), cluster.node("mad2")
    web, _ = a.allocate(pod("a1", "ns1", "web-0"))
    db, _ = b.allocate(pod("b1", "ns1", "db-0"))
    ops = cluster.ops("mad")
    keys, store = cluster.keys, cluster.store

    # By IP, another node's: the record, its handle go; the cooldown record is written.
    assert ops.release_ip(db.ip).owner.container_id == "b1"
    assert store.get(keys.ip(db.ip)) is None
    assert store.get(keys.handle(NET, "b1", "eth0")) is None
    assert json.loads(store.get(keys.released(db.ip)).value)["node"] == "mad"  # type: ignore[union-attr]
    with pytest.raises(NotFound, match=f"no allocation holds {db.ip}"):
        ops.release_ip(db.ip)

    # By handle, the serving node's own: through its allocator, so its free set is right too.
    assert ops.release_handle((NET, "a1", "eth0")).ip == web.ip
    assert a.get(NET, "a1", "eth0") is None and a.status()[0].used == 0
    with pytest.raises(NotFound, match="no attachment with handle madnet/a1/eth0"):
        ops.release_handle((NET, "a1", "eth0"))


def test_stale_release_frees_nothing(cluster: Cluster) -> None:
    b = cluster.node("mad2")
    ops = cluster.ops("mad")
    keys, store = cluster.keys, cluster.store
    first, _ = b.allocate(pod("b1", "ns1", "web-0"))
    seen = store.get(keys.ip(first.ip))
    assert seen is not None
    # The record changes hands between the operator's read and the release txn.
    b.release(NET, "b1", "eth0")
    taken = dataclasses.replace(first, owner=pod("b2", "ns1", "web-1"))
    store.txn(
        [],
        [
            Put(keys.ip(first.ip), taken.to_json()),
            Put(keys.handle(NET, "b2", "eth0"), str(first.ip).encode()),
        ],
    )
    assert ops.release_record(first, seen) is None
    assert store.get(keys.ip(first.ip)) is not None
    assert store.get(keys.handle(NET, "b2", "eth0")) is not None
    # A handle that points at an IP its attachment does not hold: only the handle goes.
    store.put(keys.handle(NET, "stale1", "eth0"), str(first.ip).encode())
    with pytest.raises(Conflict, match="dropped the stale handle, nothing freed"):
        ops.release_handle((NET, "stale1", "eth0"))
    assert store.get(keys.handle(NET, "stale1", "eth0")) is None
    owner = json.loads(store.get(keys.ip(first.ip)).value)  # type: ignore[union-attr]
    assert owner["containerID"] == "b2"


def test_remove_node_frees_its_subnets_records_and_cooldowns_in_batches(tmp_path: Path) -> None:
    c = Cluster(tmp_path, NetworkConfig.parse("10.241.0.0/22", 24))
    a, b = c.node("mad"), c.node("mad2")
    count = MAX_TXN_KEYS  # two keys each (record + handle): several batches
    for i in range(count):
        b.allocate(pod(f"b{i}"))
    b.release(NET, "b0", "eth0")
    a.allocate(pod("a1"))
    b_subnets = b.leases.subnets
    ops = c.ops("mad")
    with pytest.raises(Refused, match="the node this moor-ipamd runs as"):
        ops.remove_node("mad")
    removed = ops.remove_node("mad2")
    assert (removed.subnets, removed.ips_freed, removed.released_cleared) == (
        b_subnets,
        count - 1,
        1,
    )
    assert [lease.node for lease in ops.leases()] == ["mad"]
    handles = c.store.list_prefix(c.keys.handles_prefix())[0]
    assert [kv.key for kv in handles] == [c.keys.handle(NET, "a1", "eth0")]
    assert len(c.store.list_prefix(c.keys.ips_prefix())[0]) == 1
    assert c.store.list_prefix(c.keys.released_prefix())[0] == []
    with pytest.raises(NotFound, match="node mad2 holds no subnet lease"):
        ops.remove_node("mad2")
    # Its subnet is free again: the next node leases it.
    assert c.node("mad3").leases.subnets == b_subnets


def test_utilization_counts(tmp_path: Path) -> None:
    config = NetworkConfig.parse(
        "10.241.0.0/24",
        28,
        subnet_max="10.241.0.224/28",
        fixed_ranges=["10.241.0.16/28", "10.241.0.100/32"],
    )
    c = Cluster(tmp_path, config, cooldown=30)
    a = c.node("mad")
    for i in range(4):
        a.allocate(pod(f"a{i}"))
    a.release(NET, "a0", "eth0")
    a.release(NET, "a1", "eth0")
    c.clock.advance(31)  # their cooldown is over: free again, not cooling
    a.allocate(pod("a4"))  # a fresh address
    a.release(NET, "a2", "eth0")  # cooling
    c.node("mad2")
    u = c.ops().utilization()
    # 16 /28s; 15 up to the max; 10.241.0.16/28 and the one holding .100 are fixed: 13 leaseable.
    assert (u.subnets_leased, u.subnets_free, u.addresses_allocated) == (2, 11, 2)
    first = u.subnets[0]
    assert str(first.lease.subnet) == "10.241.0.0/28" and first.lease.node == "mad"
    assert (first.total, first.reserved, first.allocated, first.cooling, first.free) == (
        16,
        3,
        2,
        1,
        10,
    )
    assert str(u.subnets[1].lease.subnet) == "10.241.0.32/28"  # .16/28 is fixed: skipped
    assert c.ops().usage("mad2")[0].free == 13


def test_subnet_min_max_bound_what_nodes_lease(tmp_path: Path) -> None:
    config = NetworkConfig.parse(
        "10.241.0.0/24", 26, subnet_min="10.241.0.64/26", subnet_max="10.241.0.128/26"
    )
    c = Cluster(tmp_path, config)
    assert c.node("mad").leases.subnets == [ipaddress.ip_network("10.241.0.64/26")]
    assert c.node("mad2").leases.subnets == [ipaddress.ip_network("10.241.0.128/26")]
    with pytest.raises(NetworkExhausted):
        c.node("mad3")


def test_a_held_lease_republishes_a_changed_public_ip(cluster: Cluster) -> None:
    first = cluster.node("mad", "203.0.113.1").leases.subnets
    again = cluster.node("mad", "203.0.113.9")
    assert again.leases.subnets == first
    lease = cluster.ops().leases("mad")[0]
    assert (lease.public_ip, lease.backend) == ("203.0.113.9", {"type": "host-gw"})


def test_daemon_flags_validate_through_network_config() -> None:
    from ipamd.config import load_config

    assert load_config(["--network", ""]).network_config() is None
    assert load_config(["--network", NETWORK]).network_config() == NetworkConfig.parse(NETWORK, 24)
    for argv, needle in (
        (["--network", "10.241.0.0/33"], "not a CIDR"),
        (["--public-ip", "nope"], "--public-ip 'nope'"),
    ):
        with pytest.raises(ValueError, match=needle):
            load_config(argv)


# ---- end to end: moorctl against real daemons ----------------------------------------------
def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return d.moorctl(*args)


def ctl_json(d: Daemon, *args: str) -> object:
    proc = d.moorctl(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def fails(proc: subprocess.CompletedProcess, needle: str) -> bool:
    """moorctl's error contract: exit 1, nothing on stdout, one line `moorctl: ...` on stderr."""
    lines = proc.stderr.strip().splitlines()
    return (
        proc.returncode == 1
        and proc.stdout == ""
        and len(lines) == 1
        and lines[0].startswith("moorctl: ")
        and needle in lines[0]
    )


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def factory() -> str:
        name = f"mad-{_run_id}-{len(made)}"
        made.append(name)
        return make_netns(name)

    yield factory
    for name in made:
        delete_netns(name)


@pytest.fixture(params=["sqlite", "etcd"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store URL, key prefix) that several daemons share."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/shared.db", "/moor"
    server = request.getfixturevalue("etcd_server")
    return server.url, f"/mad-{_run_id}-{secrets.token_hex(3)}"


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts, cleaned up (process, bridge, nat chain) even on failure."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.cleanup_host()


def grpc_owner(cid: str, namespace: str, name: str) -> object:
    from ipamd.api.v1 import ipam_pb2

    return ipam_pb2.Owner(
        network=NET, container_id=cid, ifname="eth0", pod_namespace=namespace, pod_name=name
    )


def allocate(d: Daemon, cid: str, namespace: str, name: str) -> str:
    """One allocation through the node's Ipam.Allocate; its IP."""
    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    with grpc.insecure_channel(f"unix:{d.grpc_socket}") as ch:
        reply = ipam_pb2_grpc.IpamStub(ch).Allocate(
            ipam_pb2.AllocateRequest(owner=grpc_owner(cid, namespace, name)), timeout=10
        )
    return reply.allocation.ip.partition("/")[0]


def health(d: Daemon) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{d.grpc_socket}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return reply.status


@pytest.mark.netns
def test_daemon_without_network_waits_for_network_init(
    tmp_path: Path, daemons: list[Daemon], netns: Callable[[], str]
) -> None:
    from grpc_health.v1 import health_pb2

    d = start_daemon(tmp_path / "mad", "mad", "", "madbr0")  # --network "": from the store
    daemons.append(d)
    rt = ExecRuntime()
    conf = plugin_config(NET, "1.1.0", d.plugin())
    status = rt.call("STATUS", conf)
    assert status.code == 50 and "moorctl network init" in status.out["msg"]
    add = rt.add(conf, netns(), "madwait0", cni_args="K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=w0")
    assert add.code == 11 and "moorctl network init" in add.out["msg"]
    assert health(d) == health_pb2.HealthCheckResponse.NOT_SERVING
    st = d.status()
    assert not st["ready"] and "moorctl network init" in st["reason"] and st["subnets"] == []
    assert fails(ctl(d, "network", "show"), "no network config in the store")
    assert ctl_json(d, "subnets") == []

    # Bad input is refused before anything is written.
    assert fails(ctl(d, "network", "init", "--network", "10.241.0.0/33"), "not a CIDR")
    assert fails(
        ctl(d, "network", "init", "--network", "10.241.0.0/16", "--fixed-range", "10.99.0.0/30"),
        "--fixed-range 10.99.0.0/30 is not inside",
    )
    # A /29 of /30s has two subnets; the fixed range takes the first, so one pod IP in all.
    init = [
        "network",
        "init",
        "--network",
        "10.241.0.0/29",
        "--subnet-len",
        "30",
        "--fixed-range",
        "10.241.0.0/30",
    ]
    written = ctl(d, *init)
    assert written.returncode == 0 and written.stdout.startswith("network config written")
    assert ctl_json(d, *init)["created"] is False  # idempotent
    assert fails(ctl(d, *init[:-1], "10.241.0.0/31"), "different network config")
    shown = ctl(d, "network", "show")
    assert "fixed-ranges  10.241.0.0/30" in shown.stdout and "backend       host-gw" in shown.stdout
    shown_json = ctl_json(d, "network", "show")
    assert len(shown_json.pop("clusterID")) == 32  # named when first written
    assert shown_json == {
        "network": "10.241.0.0/29",
        "subnetLen": 30,
        "subnetMin": "",
        "subnetMax": "",
        "fixedRanges": ["10.241.0.0/30"],
        "backend": "host-gw",
    }

    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not d.status()["ready"]:
        time.sleep(0.2)
    assert d.status()["ready"], d.log_path.read_text()[-2000:]
    assert health(d) == health_pb2.HealthCheckResponse.SERVING
    assert [s["subnet"] for s in ctl_json(d, "subnets")] == ["10.241.0.4/30"]
    assert rt.call("STATUS", conf).rc == 0
    path = netns()
    add = rt.add(conf, path, "madwait1", cni_args="K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=w1")
    assert add.rc == 0 and add.out["ips"][0]["address"] == "10.241.0.6/30"
    full = rt.add(conf, netns(), "madwait2")
    assert full.code == 100  # the fixed range is never leased, even with the network full
    ips = ctl_json(d, "ips")
    assert [(a["ip"], a["pod"]) for a in ips] == [("10.241.0.6", "ns1/w1")]
    assert rt.delete(conf, path, "madwait1").rc == 0


@pytest.mark.netns
def test_cluster_views_release_and_node_remove(
    tmp_path: Path,
    shared_store: tuple[str, str],
    daemons: list[Daemon],
    netns: Callable[[], str],
) -> None:
    url, prefix = shared_store
    common = {"store_url": url, "key_prefix": prefix}
    mad = start_daemon(
        tmp_path / "mad", "mad", NETWORK, "madbr0", extra_args=["--iface", "lo"], **common
    )
    daemons.append(mad)
    mad2 = start_daemon(
        tmp_path / "mad2",
        "mad2",
        NETWORK,
        "madbr1",
        extra_args=["--public-ip", "203.0.113.5"],
        **common,
    )
    daemons.append(mad2)

    # A real pod through CNI ADD (CNI_ARGS carry its name), the rest over Ipam.Allocate.
    rt = ExecRuntime()
    conf = plugin_config(NET, "1.1.0", mad.plugin())
    path = netns()
    add = rt.add(conf, path, "madpod1", cni_args="K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0")
    assert add.rc == 0, add.out
    ip = {"web-0": add.out["ips"][0]["address"].partition("/")[0]}
    for d, cid, ns, name in (
        (mad, "madc1", "ns1", "web-1"),
        (mad, "madc2", "ns2", "db-0"),
        (mad2, "mad2c1", "ns1", "web-2"),
        (mad2, "mad2c2", "ns2", "db-1"),
        (mad2, "mad2c3", "ns2", "db-2"),
    ):
        ip[name] = allocate(d, cid, ns, name)

    # subnets: both nodes, their public IPs (detected from lo / given), use counts.
    subnets = ctl_json(mad2, "subnets")
    assert [(s["node"], s["publicIP"], s["allocated"]) for s in subnets] == [
        ("mad", "127.0.0.1", 3),
        ("mad2", "203.0.113.5", 3),
    ]
    assert all(s["backend"] == {"type": "host-gw"} and s["free"] == 250 for s in subnets)
    table = ctl(mad, "subnets").stdout.splitlines()
    assert table[0].split() == [
        "SUBNET",
        "NODE",
        "PUBLIC",
        "IP",
        "SINCE",
        "USED",
        "FREE",
        "COOLING",
        "ROUTE",
    ]
    # neither node routes: lo is no wire, 203.0.113.5 is no address of this host
    assert "203.0.113.5" in table[2] and table[2].split()[-4:] == ["3", "250", "0", "-"]
    mad2_subnet = ipaddress.ip_network(subnets[1]["subnet"])

    # ips, filtered.
    by_node = ctl_json(mad, "ips", "--node", "mad2")
    assert {a["pod"] for a in by_node} == {"ns1/web-2", "ns2/db-1", "ns2/db-2"}
    assert all(ipaddress.ip_address(a["ip"]) in mad2_subnet for a in by_node)
    assert {a["pod"] for a in ctl_json(mad, "ips", "--namespace", "ns2")} == {
        "ns2/db-0",
        "ns2/db-1",
        "ns2/db-2",
    }
    one = ctl_json(mad, "ips", "--namespace", "ns1", "--pod", "web-0")
    assert [(a["ip"], a["handle"], a["node"]) for a in one] == [
        (ip["web-0"], f"{NET}/madpod1/eth0", "mad")
    ]
    rows = ctl(mad, "ips", "--pod", "web-2").stdout.splitlines()
    assert rows[0].split() == ["IP", "NODE", "POD", "HANDLE", "SINCE"]
    assert rows[1].split()[:4] == [ip["web-2"], "mad2", "ns1/web-2", f"{NET}/mad2c1/eth0"]

    # release by IP, another node's; by handle, the serving node's own (its memory follows).
    out = ctl(mad, "release", "--ip", ip["db-1"])
    assert out.returncode == 0
    assert out.stdout.strip() == (
        f"released {ip['db-1']} (pod ns2/db-1, handle {NET}/mad2c2/eth0, node mad2)"
    )
    assert ctl_json(mad, "ips", "--pod", "db-1") == []
    freed = ctl_json(mad, "release", "--handle", f"{NET}/madc2/eth0")
    assert freed["released"]["ip"] == ip["db-0"]
    assert "madc2" not in {a["containerID"] for a in mad.status()["allocations"]}
    assert mad.status()["subnets"][0]["cooling"] == 1
    assert fails(ctl(mad, "release", "--handle", f"{NET}/madc2/eth0"), "no attachment")
    assert fails(ctl(mad, "release", "--ip", "10.241.200.9"), "no allocation holds 10.241.200.9")
    assert fails(ctl(mad, "release", "--handle", "nonsense"), "NETWORK/CONTAINER-ID/IFNAME")
    assert fails(ctl(mad, "release", "--ip", "10.241.0.x"), "does not appear to be an IPv4")

    # A stale handle (it points at an IP another attachment holds) frees nothing.
    store = open_store(url)
    keys = Keys(prefix)
    try:
        store.put(keys.handle(NET, "madstale", "eth0"), ip["web-2"].encode())
        assert fails(ctl(mad, "release", "--handle", f"{NET}/madstale/eth0"), "nothing freed")
        still = ctl_json(mad, "ips", "--pod", "web-2")
        assert [a["handle"] for a in still] == [f"{NET}/mad2c1/eth0"]

        u = ctl_json(mad, "utilization")
        assert (u["subnetsLeased"], u["subnetsFree"], u["addressesAllocated"]) == (2, 254, 4)
        assert [(s["allocated"], s["cooling"], s["reserved"], s["free"]) for s in u["subnets"]] == [
            (2, 1, 3, 250),
            (2, 1, 3, 250),
        ]
        assert ctl(mad, "utilization").stdout.startswith(
            "network 10.241.0.0/16 /24: subnets leased 2, free 254; addresses allocated 4"
        )

        # node remove: never the serving node itself; a stopped node's subnet and IPs are freed.
        assert fails(ctl(mad, "node", "remove", "mad"), "the node this moor-ipamd runs as")
        mad2.stop()
        removed = ctl_json(mad, "node", "remove", "mad2")
        assert removed == {
            "node": "mad2",
            "subnets": [str(mad2_subnet)],
            "ipsFreed": 2,
            "releasedCleared": 1,
        }
        assert [s["node"] for s in ctl_json(mad, "subnets")] == ["mad"]
        assert ctl_json(mad, "ips", "--node", "mad2") == []
        assert store.get(keys.handle(NET, "mad2c1", "eth0")) is None
        assert store.get(keys.ip(ipaddress.ip_address(ip["web-2"]))) is None
        assert fails(ctl(mad, "node", "remove", "mad2"), "node mad2 holds no subnet lease")
        assert {a["pod"] for a in ctl_json(mad, "ips")} == {"ns1/web-0", "ns1/web-1"}
    finally:
        store.close()
    assert rt.delete(conf, path, "madpod1").rc == 0


def test_moorctl_without_a_daemon_is_one_clear_line(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for args in (["subnets"], ["ips", "--node", "x"], ["status"], ["network", "show"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ipamd.cli", "--socket", sock, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert fails(proc, f"cannot reach moor-ipamd at {sock}: is it running?"), proc.stderr


@pytest.mark.netns
def test_iface_without_an_address_fails_start_clearly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--iface madnoif0: no IPv4 address"):
        start_daemon(tmp_path / "mad", "mad", NETWORK, "madbr2", extra_args=["--iface", "madnoif0"])
