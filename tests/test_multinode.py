"""Issue 13: pods on different nodes reach each other over moor's host-gw and vxlan routes,
reconciled from the etcd leases, on the simulated 3-node cluster (tests/helpers/cluster.py).

Each test runs for host-gw and for vxlan. The read-only ones share one cluster per backend (2 pods
per node, echo servers in every pod and in the outside netns); the deleted-object repairs use it
too and leave it as they found it (their check is that it is); the rest build their own.
The kernel is read with iproute2 (tests/helpers/routing.py has the desired state). Every daemon
runs with `--reconcile-interval 1` except where a test must rule the periodic resync out.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require
from tests.helpers import etcd, oracle
from tests.helpers.cluster import Cluster, Pod
from tests.helpers.routing import Peer, converged, device, peers, wait_until
from tests.helpers.traffic import Probe, matrix, probe, unexpected
from tests.helpers.underlay import OUTSIDE, ROUTED, UNDERLAY

pytestmark = [pytest.mark.root, pytest.mark.netns]

BACKENDS = ["host-gw", "vxlan"]
RESYNC = 1.0  # --reconcile-interval
WITHIN = 5.0  # "within one resync / one watch event", with a generous margin for a busy machine
LONG = 600.0  # a reconcile interval no test waits for: only the watch or the start can act
TTL = 3.0  # --lease-ttl where a lease must expire


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:  # module scope: before the module's shared cluster is built
    ok, why = etcd.available()
    require(ok, why)


@pytest.fixture(scope="module", params=BACKENDS)
def shared(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, list[Pod]]]:
    with Cluster(backend=request.param, reconcile_interval=RESYNC) as c:
        pods = c.add_pods(per_node=2)
        c.echo(*[p.name for p in pods], c.underlay.outside)
        wait_until(converged(c, peers(c).values(), c.nodes, backend=c.backend), WITHIN, "routes")
        yield c, pods


def serve(c: Cluster, per_node: int = 1) -> list[Pod]:
    pods = c.add_pods(per_node=per_node)
    c.echo(*[p.name for p in pods])
    return pods


def pairs(pods: list[Pod]) -> list[tuple[str, str]]:
    return [(p.name, p.ip) for p in pods]


def reach(sources: list[Pod], targets: list[Pod], **probe: object) -> list[str]:
    """Who failed to reach whom, or was seen from another address than its own pod IP."""
    return unexpected(
        matrix(pairs(sources), pairs(targets), **probe), {p.name: p.ip for p in sources}
    )


def converge(
    c: Cluster, want: list[Peer], nodes: list[str], timeout: float = WITHIN, what: str = ""
) -> None:
    wait_until(converged(c, want, nodes, backend=c.backend), timeout, what or "routes converge")


# ---- the shared cluster: state, traffic -------------------------------------------------------
def test_routes_match_the_leases(shared: tuple[Cluster, list[Pod]]) -> None:
    c, _ = shared
    leases = peers(c)
    assert sorted(leases) == ["n1", "n2", "n3"]
    converge(c, list(leases.values()), list(c.nodes))
    for name in c.nodes:
        rows = {r["node"]: r for r in c.subnets(name)}
        states = {n: r["route"]["state"] for n, r in rows.items()}
        assert states == {n: "local" if n == name else "routed" for n in c.nodes}, name
        if c.backend == "vxlan":  # the lease publishes the MAC the device really has
            backend = rows[name]["backend"]
            assert (backend["type"], backend["vni"]) == ("vxlan", 1)
            assert backend["vtepMAC"].lower() == leases[name].mac


def test_udp_matrix_both_ways_and_tcp(shared: tuple[Cluster, list[Pod]]) -> None:
    c, pods = shared
    assert reach(pods, pods) == []  # every pod to every other, so every pair both ways
    n1, n3 = (next(p for p in pods if p.node == n) for n in ("n1", "n3"))
    tcp = probe(n1.name, [Probe(n3.ip, proto="tcp", size=200_000)])[0]
    assert (tcp.ok, tcp.src, tcp.length) == (True, n1.ip, 200_000), tcp


def test_mtu_end_to_end_with_df(shared: tuple[Cluster, list[Pod]]) -> None:
    c, pods = shared
    mtu = 1500 - (50 if c.backend == "vxlan" else 0)
    assert {oracle.link("eth0", p.name)["mtu"] for p in pods} == {mtu}  # type: ignore[index]
    across = [p for p in pods if p.node in ("n1", "n3")]
    assert reach(across, across, size=1400, df=True) == []
    assert reach(across, across, size=mtu - 28, df=True) == []  # the largest that fits
    too_big = probe(pods[0].name, [Probe(pods[-1].ip, size=mtu - 27, df=True)])[0]
    assert not too_big.ok and "Message too long" in too_big.error, too_big  # DF really is set


def test_egress_to_outside_is_masqueraded(shared: tuple[Cluster, list[Pod]]) -> None:
    c, pods = shared
    replies = matrix(pairs(pods), [(c.underlay.outside, f"{OUTSIDE}.2")])
    assert unexpected(replies, {p.name: c.nodes[p.node].public_ip for p in pods}) == []


def test_deleted_objects_are_restored(shared: tuple[Cluster, list[Pod]]) -> None:
    c, pods = shared
    leases = peers(c)
    n2 = leases["n2"]
    ns = c.nodes["n1"].netns
    deletions = {"route": ["ip", "-n", ns, "route", "del", n2.subnet, "proto", "109"]}
    if c.backend == "vxlan":
        dev = device(1)
        deletions |= {
            "neighbour": ["ip", "-n", ns, "neigh", "del", n2.vtep_ip, "dev", dev],
            "fdb entry": [
                "bridge",
                "-n",
                ns,
                "fdb",
                "del",
                n2.mac,
                "dev",
                dev,
                "dst",
                n2.ip,
                "self",
            ],
            "device": ["ip", "-n", ns, "link", "del", dev],
        }
    for what, argv in deletions.items():
        subprocess.run(argv, check=True, capture_output=True)
        converge(c, list(leases.values()), ["n1"], what=f"{what} deleted on n1, restored")
        on = [p for p in pods if p.node in ("n1", "n2")]
        assert reach(on, on) == [], f"after the {what} came back"


# ---- clusters of their own -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_peer_restarts_with_a_new_public_ip(backend: str) -> None:
    with Cluster(backend=backend, reconcile_interval=RESYNC) as c:
        pods = serve(c)
        before = peers(c)
        converge(c, list(before.values()), list(c.nodes))
        c.stop("n2")
        if backend == "vxlan":  # a reboot: the device is gone too, and must come back the same
            subprocess.run(["ip", "-n", c.nodes["n2"].netns, "link", "del", device(1)])
            assert oracle.link(device(1), c.nodes["n2"].netns) is None
        c.set_public_ip("n2", f"{UNDERLAY}.22")
        c.start("n2")
        after = {**before, "n2": before["n2"].moved(f"{UNDERLAY}.22")}  # same subnet, same MAC
        converge(c, list(after.values()), list(c.nodes), what="n2 at its new address")
        assert peers(c) == after
        assert reach(pods, pods) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_expired_peer_is_dropped_and_comes_back(backend: str) -> None:
    with Cluster(backend=backend, reconcile_interval=RESYNC, lease_ttl=TTL) as c:
        pods = serve(c)
        leases = peers(c)
        converge(c, list(leases.values()), list(c.nodes))
        c.kill("n2")
        rest = [p for n, p in leases.items() if n != "n2"]
        converge(c, rest, ["n1", "n3"], timeout=TTL + 10, what="n2's lease expired")
        assert "n2" not in {r["node"] for r in c.subnets("n1")}

        c.start("n2")
        assert c.subnet_of("n2") == leases["n2"].subnet  # its pods keep their addresses
        converge(c, list(leases.values()), list(c.nodes), what="n2 back")
        assert reach(pods, pods) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_remove_drops_the_peer_at_once(backend: str) -> None:
    with Cluster(backend=backend, reconcile_interval=LONG) as c:  # 24 h leases, no resync
        leases = peers(c)
        converge(c, list(leases.values()), list(c.nodes))
        c.kill("n2")
        removed = c.moorctl("n1", "node", "remove", "n2")
        assert removed.returncode == 0, removed.stderr
        rest = [p for n, p in leases.items() if n != "n2"]
        converge(c, rest, ["n1", "n3"], what="n2 removed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_peer_left_while_down_is_removed_before_ready(backend: str) -> None:
    with Cluster(backend=backend, reconcile_interval=LONG) as c:
        leases = peers(c)
        converge(c, list(leases.values()), list(c.nodes))
        c.kill("n1")  # a crash: what it programmed stays in its kernel
        c.kill("n3")
        assert c.moorctl("n2", "node", "remove", "n3").returncode == 0
        rest = [p for n, p in leases.items() if n != "n3"]
        converge(c, rest, ["n2"], what="n3 removed, seen by n2")
        stale = [
            r for r in oracle.moor_routes(c.nodes["n1"].netns) if r["dst"] == leases["n3"].subnet
        ]
        assert stale, "n1 should still hold n3's route while it is down"

        c.start("n1")  # ready; then at once, with no resync due for 10 minutes:
        assert converged(c, rest, ["n1"], backend=backend)() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_lease_change_during_a_compacted_watch_gap(backend: str) -> None:
    """n1 is frozen; etcd restarts (so n1's watch stream is broken, not merely buffered), n2
    moves to a new address, etcd compacts and defragments; n1 resumes. Its watch cannot resume
    from where it was: it must re-list and diff by value. No periodic resync is due meanwhile."""
    with Cluster(backend=backend, reconcile_interval=LONG) as c:
        leases = peers(c)
        converge(c, list(leases.values()), list(c.nodes))
        c.signal("n1", signal.SIGSTOP)
        try:
            c.restart_store()
            c.stop("n2")
            c.set_public_ip("n2", f"{UNDERLAY}.22")
            c.start("n2")
            after = {**leases, "n2": leases["n2"].moved(f"{UNDERLAY}.22")}
            converge(c, list(after.values()), ["n3"], timeout=20, what="n3 sees n2's new address")
            c.compact_store()
        finally:
            c.signal("n1", signal.SIGCONT)
        converge(c, list(after.values()), ["n1"], timeout=20, what="n1 applies the change")


def test_host_gw_peer_on_another_l3_subnet_is_unreachable() -> None:
    with Cluster(backend="host-gw", routed=True, reconcile_interval=RESYNC) as c:
        leases = peers(c)
        assert leases["n3"].ip == f"{ROUTED}.13"
        near = [leases["n1"], leases["n2"]]
        converge(c, near, ["n1", "n2"], what="n1 and n2 route to each other")
        assert oracle.moor_routes(c.nodes["n3"].netns) == []
        for name in c.nodes:  # as each node sees each peer
            routes = {r["node"]: r["route"] for r in c.subnets(name)}
            for peer, route in routes.items():
                far = peer != name and "n3" in (peer, name)
                want = "local" if peer == name else "unreachable" if far else "routed"
                assert route["state"] == want, (name, peer, route)
                assert route["reason"] or not far, (name, peer, route)  # and it says why
        time.sleep(3 * RESYNC)  # several resyncs: the complaint is logged once, not each time
        complaints = [
            line
            for line in c.log("n1").splitlines()
            if re.search(r" (WARNING|ERROR) ", line) and leases["n3"].ip in line
        ]
        assert len(complaints) == 1, complaints


def test_vxlan_across_l3_subnets_on_another_vni_and_port() -> None:
    with Cluster(
        backend="vxlan", routed=True, vni=7, vxlan_port=4790, reconcile_interval=RESYNC
    ) as c:
        pods = serve(c)
        leases = peers(c, vni=7)
        wait_until(
            converged(c, leases.values(), c.nodes, backend="vxlan", vni=7, port=4790),
            WITHIN,
            "vxlan moor.7",
        )
        assert reach(pods, pods) == []
        assert reach(pods, pods, size=1400, df=True) == []
