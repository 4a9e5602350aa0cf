"""On the simulated 3-node cluster: how fast a new node's lease becomes a route on every node, and
pod-to-pod TCP throughput beside the underlay's.

Convergence: a "join" writes a synthetic subnet lease for a node that does not exist (the JSON a
moor-ipamd writes, `ipamd.model.SubnetLease`, with a public IP on the underlay that nobody holds),
through etcd's JSON gateway from a thread inside the infra netns, timed from the request being
sent (a node's route can arrive before etcd's answer is read; from the answer is kept too). A
thread per node netns holds a netlink socket on RTMGRP_IPV4_ROUTE and stamps the RTM_NEWROUTE of
that subnet (protocol 109) as it arrives: no polling. The join's figure is the last of the three
nodes. Then the lease is deleted and the same is measured for the routes going (RTM_DELROUTE),
before the next join.

Throughput: iperf3 (TCP, one stream) from a pod on n1 to a pod on n3, and from n1's eth0 to n3's
eth0 (the underlay), alternating test by test.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from bench.cluster_probe import EtcdGateway, RouteWatch, netns_executor
from ipamd.model import SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.store.keys import Keys
from tests.helpers.cluster import Cluster
from tests.helpers.traffic import iperf3_throughput

Progress = Callable[[str], None]
JOIN_TIMEOUT = 10.0
SETTLE = 0.05  # between a leave and the next join


@dataclass
class Convergence:
    backend: str
    joins: list[float] = field(default_factory=list)  # put sent -> route on the last node
    first: list[float] = field(default_factory=list)  # put sent -> route on the first node
    after_answer: list[float] = field(default_factory=list)  # put answered -> ... last node
    put_rtt: list[float] = field(default_factory=list)  # the put itself, request to answer
    leaves: list[float] = field(default_factory=list)  # delete sent -> route gone everywhere
    failures: list[str] = field(default_factory=list)


@dataclass
class Throughput:
    backend: str
    seconds: float
    underlay: list[float] = field(default_factory=list)  # Gb/s, node1 eth0 -> node3 eth0
    pods: list[float] = field(default_factory=list)  # Gb/s, pod on n1 -> pod on n3
    pod_mtu: int = 0


def join_lease(c: Cluster, config: NetworkConfig, taken: set, i: int) -> SubnetLease:
    """Join `i`'s lease: a free subnet (cycling over 50), a free underlay address."""
    subnets = [
        s
        for s in ipaddress.ip_network(c.network).subnets(new_prefix=config.subnet_len)
        if s not in taken
    ]
    subnet = subnets[-1 - i % 50]
    node = f"mbc-join{i}"
    public_ip = f"{c.addresses.underlay}.{100 + i % 100}"
    return SubnetLease(subnet, node, time.time(), public_ip, config.backend_data(node))


def convergence(c: Cluster, joins: int, say: Progress) -> Convergence:
    fig = Convergence(c.backend)
    keys = Keys(c.key_prefix)
    taken = {ipaddress.ip_network(c.subnet_of(n)) for n in c.nodes}
    nodes = [c.nodes[n].netns for n in c.nodes]
    watch = RouteWatch(nodes)
    infra = netns_executor(c.underlay.infra)
    gateway: EtcdGateway = infra.submit(EtcdGateway, c.addresses.infra_ip).result()
    watch.start()
    try:
        raw = infra.submit(gateway.get, keys.config()).result()
        assert raw is not None, "the cluster has no network config"
        config = NetworkConfig.from_json(raw)
        for i in range(joins):
            lease = join_lease(c, config, taken, i)
            key, prefix = keys.subnet(lease.subnet), str(lease.subnet)
            watch.arm()
            sent, answered = infra.submit(gateway.put, key, lease.to_json()).result()
            if not watch.wait(partial(watch.everywhere, prefix), JOIN_TIMEOUT):
                missing = [ns for ns in nodes if prefix not in watch.seen(ns)[0]]
                fig.failures.append(
                    f"join {i} ({prefix}): no route on {missing} in {JOIN_TIMEOUT}s"
                )
            else:
                seen = [watch.seen(ns)[0][prefix] for ns in nodes]
                fig.joins.append(max(seen) - sent)
                fig.first.append(min(seen) - sent)
                fig.after_answer.append(max(seen) - answered)
                fig.put_rtt.append(answered - sent)
            watch.arm()
            sent, _ = infra.submit(gateway.delete, key).result()
            if not watch.wait(partial(watch.everywhere, prefix, True), JOIN_TIMEOUT):
                fig.failures.append(f"leave {i} ({prefix}): a route stayed for {JOIN_TIMEOUT}s")
                break  # the next join would not start from a clean table
            fig.leaves.append(max(watch.seen(ns)[1][prefix] for ns in nodes) - sent)
            time.sleep(SETTLE)
            if (i + 1) % 10 == 0:
                say(f"  {i + 1}/{joins} joins")
    finally:
        watch.stop()
        infra.submit(gateway.close).result()
        infra.shutdown()
    if watch.overflow:
        fig.failures.append(
            f"netlink notifications lost (ENOBUFS) in {sorted(set(watch.overflow))}"
        )
    return fig


def throughput(c: Cluster, rounds: int, seconds: float, say: Progress) -> Throughput:
    fig = Throughput(c.backend, seconds)
    src, dst = c.add_pods(1, ["n1", "n3"])
    fig.pod_mtu = _pod_mtu(src.name)
    n1, n3 = c.nodes["n1"], c.nodes["n3"]
    for r in range(rounds):
        order = ["underlay", "pods"] if r % 2 == 0 else ["pods", "underlay"]
        for what in order:
            if what == "underlay":
                gbps = iperf3_throughput(n1.netns, n3.netns, n3.public_ip, seconds)
                fig.underlay.append(gbps)
            else:
                gbps = iperf3_throughput(src.name, dst.name, dst.ip, seconds)
                fig.pods.append(gbps)
            say(f"  {c.backend} round {r + 1}: {what} {gbps:.2f} Gb/s")
    return fig


def _pod_mtu(netns: str) -> int:
    """The MTU the pod's eth0 got (from the backend: host-gw the underlay's, vxlan 50 less)."""
    out = subprocess.run(["ip", "-n", netns, "-json", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)[0]["mtu"])
