"""Issue 15, "upgrades and restarts without disruption": stopping moor-ipamd and starting the
current checkout's daemon in its place never touches running pods, on the simulated 3-node
cluster (tests/helpers/cluster.py), host-gw and vxlan.

While node 1's daemon is down and comes back (a different process, started with other, compatible
settings that make it resync routes and repair the datapath every second), a paced UDP stream
runs both ways between a pod on node 1 and one on node 2 and must lose no datagram; an ADD in the
gap answers 11 and works once the daemon is back; a DEL in the gap is spooled and replayed; and
the allocations, routes, links, addresses and iptables rules are the same before and after, but
for the pod deleted and the pod added.

SIGTERM (one-node cluster; the daemon's test-only `delay-handle-<ms>-` hook holds a request in
flight): the requests in flight get their real result and the daemon exits 0; once signalled it
takes no new request, so a DEL then is spooled and replayed, not cut off; and the drain is bounded
by the request deadline: a handler stuck past it is answered 11 by the watchdog, and the daemon
exits anyway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.conftest import require
from tests.helpers import etcd, oracle
from tests.helpers.cluster import Cluster, Node
from tests.helpers.moor import Outcome
from tests.helpers.node_snapshot import changes, markers, not_of, snapshot
from tests.helpers.routing import converged, peers, wait_until
from tests.helpers.traffic import PYTHON, in_netns
from tests.helpers.udp_stream import UdpStream

pytestmark = [pytest.mark.root, pytest.mark.netns]

BACKENDS = ["host-gw", "vxlan"]
WITHIN = 5.0  # routes converge, a replacement's resyncs come: generous for a busy machine
REPLACEMENT = ("--reconcile-interval", "1", "--leak-gc-interval", "1", "--workers", "4")
DEADLINE = 4  # --request-deadline of the SIGTERM tests' node
BROKEN = ("failed mid-request", "without a reply")  # the shim's words for a cut connection


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    ok, why = etcd.available()
    require(ok, why)


def spooled(node: Node) -> list[str]:
    """The DELs waiting in the node's spool (its `failed/` directory counts too)."""
    spool = node.daemon.spool_dir
    names = [n for n in os.listdir(spool) if not n.startswith(".")] if os.path.isdir(spool) else []
    failed = os.path.join(spool, "failed")
    return names + ([f"failed/{n}" for n in os.listdir(failed)] if os.path.isdir(failed) else [])


def reconciles(c: Cluster, name: str) -> float:
    """moor_route_reconciles_total{result="ok"} of the node's daemon (its metrics listen on
    loopback inside the node's netns)."""
    fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    node = c.nodes[name]
    proc = subprocess.run(
        in_netns(node.netns, PYTHON, "-S", "-c", fetch, node.daemon.metrics_url),
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    want = 'moor_route_reconciles_total{result="ok"} '
    return sum(
        float(line[len(want) :]) for line in proc.stdout.splitlines() if line[: len(want)] == want
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_restart_drops_no_packet_and_keeps_every_pod(backend: str) -> None:
    with Cluster(backend=backend, prefix="upg") as c:
        a, victim = c.add_pods(per_node=2, nodes=["n1"])
        b, far = c.add_pods(nodes=["n2", "n3"])
        wait_until(converged(c, peers(c).values(), c.nodes, backend=backend), WITHIN, "routes")
        n1 = c.nodes["n1"]
        late = f"{c.prefix}-n1late"  # a pod whose ADD comes in the gap
        c.underlay.add_netns([late])
        before = snapshot(c, [a, b, far])
        assert any('"protocol": "109"' in line for line in before["routes"])  # not vacuous
        assert backend == "host-gw" or before["vxlan entries"]
        old = n1.daemon.proc
        assert old is not None

        with UdpStream((a.name, a.ip), (b.name, b.ip)) as stream:
            c.stop("n1")
            assert old.returncode == 0, c.log("n1")[-2000:]

            add = c.cni_exec("ADD", "n1", late, late)
            assert (add.rc, add.code) == (1, 11) and "not reachable" in add.out["msg"], add
            dele = c.cni_exec("DEL", "n1", victim.name, victim.container_id)
            assert (dele.rc, dele.out) == (0, {}) and "spooled" in dele.stderr, dele
            assert len(spooled(n1)) == 1
            assert oracle.link(host_veth_name(late, "eth0"), n1.netns) is None

            c.start("n1", extra_args=REPLACEMENT)  # ready: replayed, routes reconciled
            new = n1.daemon.proc
            assert new is not None and new.pid != old.pid
            argv = Path(f"/proc/{new.pid}/cmdline").read_bytes().decode().split("\0")
            assert " ".join(REPLACEMENT) in " ".join(argv)
            assert spooled(n1) == []
            again = c.cni_exec("ADD", "n1", late, late)
            assert again.rc == 0, again
            runs = reconciles(c, "n1")  # two periodic runs and datapath repairs under the stream
            wait_until(lambda: [] if reconciles(c, "n1") >= runs + 2 else ["not yet"], WITHIN,
                       "the replacement's periodic resync")  # fmt: skip
            forward, back = stream.stop()

        assert forward.problems() + back.problems() == [], (forward, back)
        assert forward.sent > 1000 and back.sent > 1000, (forward, back)  # it spanned the gap
        print(
            f"\n[upgrade] {backend}: {forward.sent} + {back.sent} datagrams, none lost; longest "
            f"silence {max(forward.longest_silence_ms, back.longest_silence_ms)} ms; "
            f"{forward.reordered + back.reordered} reordered"
        )

        assert oracle.gone(host_veth_name(victim.container_id, "eth0"), n1.netns)
        assert oracle.link("eth0", victim.name) is None  # the replayed DEL cleaned the host side
        late_ip = again.out["ips"][0]["address"]
        assert oracle.addresses("eth0", late) == [late_ip]
        after = snapshot(c, [a, b, far])
        went, came = changes(before, after)
        gone = markers(victim.container_id, host_veth_name(victim.container_id, "eth0"), victim.ip)
        added = markers(late, host_veth_name(late, "eth0"), late_ip.split("/")[0])
        assert (not_of(went, gone), not_of(came, added)) == ([], [])
        for kind in ("allocations", "store", "links"):  # the DELed pod's went, the new one's came
            assert kind in went and kind in came, (kind, went, came)
        held = {r["ip"] for r in json.loads(c.moorctl("n2", "ips", "--json").stdout)}
        assert victim.ip not in held and late_ip.split("/")[0] in held
        subnet = c.status("n1")["subnets"][0]  # type: ignore[index]
        assert subnet["cooling"] == 1  # the DELed pod's IP was released, not lost


# ---- SIGTERM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single() -> Iterator[Cluster]:
    with Cluster(nodes=1, prefix="upt", daemon_args=("--request-deadline", str(DEADLINE))) as c:
        yield c


@pytest.fixture
def node1(single: Cluster) -> Iterator[Cluster]:
    """The one-node cluster, its daemon running again after each test."""
    yield single
    proc = single.nodes["n1"].daemon.proc
    if proc is None or proc.poll() is not None:
        single.start("n1")


def netns(c: Cluster, *names: str) -> list[str]:
    made = [f"{c.prefix}-{n}" for n in names]
    c.underlay.add_netns(made)
    return made


def in_flight(c: Cluster, since: int, *container_ids: str) -> None:
    """Until the daemon's log (past byte `since`) shows each request held by its delay hook."""

    def waiting() -> list[str]:
        log = c.nodes["n1"].daemon.log_path.read_bytes()[since:].decode(errors="replace")
        return [cid for cid in container_ids if f"test delay: {cid} sleeps" not in log]

    wait_until(waiting, 10.0, "requests held in the daemon")


def log_size(c: Cluster) -> int:
    return c.nodes["n1"].daemon.log_path.stat().st_size


def test_sigterm_answers_the_requests_in_flight_and_exits_0(node1: Cluster) -> None:
    c = node1
    ns_add, ns_del = netns(c, "held-add", "held-del")
    held_add, held_del = "delay-handle-1000-add", "delay-handle-1000-del"
    c.cni("ADD", "n1", ns_del, held_del)
    proc = c.nodes["n1"].daemon.proc
    assert proc is not None
    since = log_size(c)
    with ThreadPoolExecutor(2) as pool:
        add = pool.submit(c.cni_exec, "ADD", "n1", ns_add, held_add)
        dele = pool.submit(c.cni_exec, "DEL", "n1", ns_del, held_del)
        in_flight(c, since, held_add, held_del)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        added, deleted = add.result(), dele.result()
    assert added.rc == 0 and added.out["ips"], added  # its real result, not a cut connection
    assert (deleted.rc, deleted.out, deleted.stderr) == (0, {}, ""), deleted  # served, not spooled

    c.start("n1")  # the new daemon has both outcomes
    allocations = {a["containerID"]: a["ip"] for a in c.status("n1")["allocations"]}  # type: ignore[index]
    assert allocations.get(held_add) == added.out["ips"][0]["address"]
    assert held_del not in allocations and spooled(c.nodes["n1"]) == []
    assert oracle.addresses("eth0", ns_add) == [added.out["ips"][0]["address"]]
    assert oracle.gone(host_veth_name(held_del, "eth0"), c.nodes["n1"].netns)
    c.cni("DEL", "n1", ns_add, held_add)


def broken(outcome: Outcome) -> bool:
    return any(words in outcome.out.get("msg", "") for words in BROKEN)


def test_sigterm_takes_no_new_request_so_a_del_in_the_drain_is_spooled(node1: Cluster) -> None:
    c = node1
    pod = c.add_pod("n1", "")
    ns_held, ns_late = netns(c, "drain-held", "drain-late")
    held = "delay-handle-2500-drain"
    proc = c.nodes["n1"].daemon.proc
    assert proc is not None
    since = log_size(c)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(c.cni_exec, "ADD", "n1", ns_held, held)
        in_flight(c, since, held)
        proc.send_signal(signal.SIGTERM)
        socket = c.nodes["n1"].daemon.cni_socket
        wait_until(lambda: [socket] if os.path.exists(socket) else [], 10.0, "the socket to go")
        dele = c.cni_exec("DEL", "n1", pod.name, pod.container_id)
        late = c.cni_exec("ADD", "n1", ns_late, "drain-late")
        answered_while_draining = proc.poll() is None
        code = proc.wait(30)
        held_answer = answer.result()
    assert (dele.rc, dele.out) == (0, {}), dele  # spooled, as with the daemon down
    assert late.code == 11 and not broken(late), late
    assert answered_while_draining  # not left waiting until the daemon is gone
    assert held_answer.rc == 0 and code == 0, (held_answer, code)

    c.start("n1")  # replays the spooled DEL
    allocations = {a["containerID"] for a in c.status("n1")["allocations"]}  # type: ignore[index]
    assert pod.container_id not in allocations and spooled(c.nodes["n1"]) == []
    c.cni("DEL", "n1", ns_held, held)


def test_sigterm_drain_is_bounded_by_the_request_deadline(node1: Cluster) -> None:
    c = node1
    (ns,) = netns(c, "stuck")
    stuck = "delay-handle-10000-stuck"  # far past the deadline
    proc = c.nodes["n1"].daemon.proc
    assert proc is not None
    since = log_size(c)

    def timed_add() -> tuple[Outcome, float]:
        started = time.monotonic()
        return c.cni_exec("ADD", "n1", ns, stuck), time.monotonic() - started

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(timed_add)
        in_flight(c, since, stuck)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        exited = time.monotonic() - signalled
        (outcome, took) = answer.result()
    # correctness bounds, generous: the deadline's answer (11), then an exit, long before 10 s
    assert outcome.code == 11 and not broken(outcome), outcome
    assert took < DEADLINE + 2, f"answered after {took:.1f} s"
    assert exited < DEADLINE + 3 and code == 0, (exited, code)
    c.start("n1")
    assert all(a["containerID"] != stuck for a in c.status("n1")["allocations"])  # type: ignore[index]
