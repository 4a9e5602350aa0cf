"""The simulated multi-node cluster itself (tests/helpers/cluster.py), proven without moor's routing.

- host-gw topology, 3 daemons, 2 pods per node made through `ip netns exec <node> bin/moor`:
  pods on one node reach each other unNATed; with host-gw routes programmed BY HAND (proto 109,
  exactly what moor's daemon is to install) the whole cross-node matrix works unNATed; egress to
  the outside netns is masqueraded to the node address (outside has no route to the pods).
- the routed topology (node 3 behind a router, on another L3 subnet) builds, node 3 reaches etcd
  through the router, and the underlay routes node to node without NAT, not directly.
- nothing is left behind, after success, after a failure inside the block, and after a build
  that fails half-way: no netns with the run prefix, no link on the host, no process, no temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import etcd, oracle
from tests.helpers.cluster import Cluster
from tests.helpers.traffic import ECHO_PORT, Probe, iperf3_throughput, matrix, probe, unexpected
from tests.helpers.underlay import OUTSIDE, ROUTED, ROUTER_IP, UNDERLAY

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:  # module scope: before the module's shared cluster is built
    ok, why = etcd.available()
    require(ok, why)
    require(shutil.which("iperf3") is not None, "iperf3 missing (`make apt` installs it)")


def host_links() -> set[str]:
    return {item["ifname"] for item in oracle.ip_json("link", "show")}


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that carry `text` (a cluster's temp dir is in every
    daemon's and etcd's argv, so this also finds grandchildren the harness never saw)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def assert_nothing_left(c: Cluster, links_before: set[str]) -> None:
    assert c.underlay.leftovers() == [], "netns left behind"
    assert [p.args for p in c.processes if p.poll() is None] == [], "processes left running"
    assert processes_mentioning(str(c.workdir)) == []
    assert not c.workdir.exists(), "temp dir left behind"
    ours = {"ul0", "eth1", "moor0", "moor.1"}  # names inside the cluster's netns
    leaked = [n for n in host_links() - links_before if n.startswith(c.prefix) or n in ours]
    assert leaked == [], "links left on the host"


def test_host_gw_cluster_by_hand() -> None:
    links_before = host_links()
    with Cluster(backend="host-gw") as c:
        assert sorted(c.nodes) == ["n1", "n2", "n3"]
        assert len(c.processes) == 4  # etcd and three daemons, each inside its netns
        pods = c.add_pods(per_node=2)
        assert {p.node for p in pods} == set(c.nodes) and len(pods) == 6
        c.echo(*[p.name for p in pods], c.underlay.outside)
        pod_ip = {p.name: p.ip for p in pods}
        subnet = {n: c.subnet_of(n) for n in c.nodes}
        for p in pods:  # each pod's address is in its own node's subnet, given by its daemon
            assert oracle.addresses("eth0", netns=p.name) == [f"{p.ip}/24"]
            assert p.ip.rsplit(".", 1)[0] == subnet[p.node].rsplit(".", 1)[0]

        for node in c.nodes:  # same node: over the node's bridge, not NATed
            local = [(p.name, p.ip) for p in pods if p.node == node]
            assert unexpected(matrix(local, local), pod_ip) == []

        for node in c.nodes:  # host-gw by hand, in the form the daemon will use
            cmds = [
                f"route replace {subnet[peer]} via {c.nodes[peer].public_ip} dev eth0 proto 109"
                for peer in c.nodes
                if peer != node
            ]
            subprocess.run(
                ["ip", "-n", c.nodes[node].netns, "-batch", "-"],
                input="\n".join(cmds) + "\n",
                text=True,
                check=True,
            )
            got = {
                (r["dst"], r["gateway"], r["dev"]) for r in oracle.moor_routes(c.nodes[node].netns)
            }
            want = {(subnet[q], c.nodes[q].public_ip, "eth0") for q in c.nodes if q != node}
            assert got == want

        every = [(p.name, p.ip) for p in pods]
        assert unexpected(matrix(every, every), pod_ip) == []
        tcp = probe(pods[0].name, [Probe(pods[-1].ip, proto="tcp", size=100_000)])[0]
        assert (tcp.ok, tcp.src, tcp.length) == (True, pods[0].ip, 100_000), tcp
        # The bench's tool: iperf3 between pods on two nodes gives a figure (its size is the
        # bench's business, not a test's).
        assert iperf3_throughput(pods[0].name, pods[-1].name, pods[-1].ip, seconds=1) > 0

        # Egress to outside: masqueraded to the node's address; outside cannot route to pods.
        out = [(c.underlay.outside, f"{OUTSIDE}.2")]
        node_ip = {p.name: c.nodes[p.node].public_ip for p in pods}
        assert unexpected(matrix(every, out), node_ip) == []
        assert not any(
            r.get("dst", "").startswith("10.") for r in oracle.routes(c.underlay.outside)
        )

        def allocated(node: str) -> set[str]:
            status = c.status(node)
            assert status is not None
            return {a["ip"].split("/")[0] for a in status["allocations"]}

        gone = pods[0]  # DEL through the same exec path frees the IP on its node
        assert gone.ip in allocated(gone.node)
        c.delete_pod(gone)
        assert gone.ip not in allocated(gone.node)
        assert not oracle.netns_exists(gone.name)
    assert_nothing_left(c, links_before)


def test_routed_topology_builds_and_reaches_etcd() -> None:
    links_before = host_links()
    with Cluster(backend="vxlan", routed=True) as c:  # built = every daemon ready, n3's too
        n1, n3 = c.nodes["n1"], c.nodes["n3"]
        assert n3.public_ip == f"{ROUTED}.13"
        health = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                n3.netns,
                "etcdctl",
                f"--endpoints=http://{UNDERLAY}.1:2379",
                "endpoint",
                "health",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        assert health.returncode == 0, health.stderr
        leases = {s["node"]: s["publicIP"] for s in c.subnets("n1")}
        assert leases == {"n1": f"{UNDERLAY}.11", "n2": f"{UNDERLAY}.12", "n3": f"{ROUTED}.13"}

        # The underlay routes n1 <-> n3 through the router, not NATed, and not directly (the
        # case host-gw must refuse).
        route = oracle.ip_json("route", "get", n3.public_ip, netns=n1.netns)[0]
        assert route.get("gateway") == ROUTER_IP
        c.echo(n1.netns, n3.netns)
        there = probe(n1.netns, [Probe(n3.public_ip, port=ECHO_PORT)])[0]
        back = probe(n3.netns, [Probe(n1.public_ip, port=ECHO_PORT)])[0]
        assert (there.ok, there.src) == (True, n1.public_ip), there
        assert (back.ok, back.src) == (True, n3.public_ip), back
    assert_nothing_left(c, links_before)


def test_teardown_after_a_failure_inside_the_block() -> None:
    links_before = host_links()
    with pytest.raises(RuntimeError, match="the test failed here"):
        with Cluster(nodes=2) as c:
            c.add_pods(per_node=1)
            c.echo(c.underlay.outside)
            assert len(c.underlay.leftovers()) == 6  # infra, outside, two nodes, two pods
            raise RuntimeError("the test failed here")
    assert_nothing_left(c, links_before)


def test_teardown_of_a_cluster_that_fails_to_build() -> None:
    links_before = host_links()
    c = Cluster(nodes=2, daemon_args=("--no-such-flag",))
    with pytest.raises(RuntimeError, match="moor-ipamd exited"):
        with c:
            pass
    assert c.etcd.proc is None and len(c.processes) == 3  # etcd and both daemons had started
    assert_nothing_left(c, links_before)
