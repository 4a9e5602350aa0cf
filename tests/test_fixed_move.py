"""Issue 14: a fixed IP follows its pod to another node, on the simulated 3-node cluster, for
host-gw and vxlan.

`prod/db-0`, under a sticky rule for `prod/db-[0-9]+`, takes a fixed IP on node 1; a pod on node 3
reaches it. db-0 is recreated on node 2
(new pod UID) while node 1 has not run its DEL yet (the DEL is held back until after node 2's
ADD, the race every peer has shipped a duplicate-IP bug from). Every node filters reverse paths
strictly (rp_filter=1). Node 2 takes the IP over: node 3's
traffic reaches the new pod within 2 s (the old and the new pod serve different ports, so a reply
says which one answered), node 1 routes the IP to node 2 and keeps no route to its old pod, and
node 1's late DEL frees nothing.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import require
from tests.helpers import etcd
from tests.helpers.cluster import Cluster
from tests.helpers.traffic import EchoServer, Probe, probe

pytestmark = [pytest.mark.root, pytest.mark.netns]

FIXED_RANGE = "10.201.250.0/24"
DB_IP = "10.201.250.1"  # the lowest free IP of the fixed range: the sticky rule's pick
OLD_PORT, NEW_PORT = 7101, 7102
MOVE_WITHIN = 2.0


def db0(uid: str) -> str:
    return f"K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID={uid}"


def serve(c: Cluster, netns: str, port: int) -> None:
    server = EchoServer(netns, port)
    c.servers.append(server)
    c.processes.append(server.proc)
    server.wait_ready()


def routes_to(c: Cluster, node: str, ip: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", c.nodes[node].netns, "-j", "route", "show", ip],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out or "[]")


def neighbours_of(c: Cluster, node: str, ip: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", c.nodes[node].netns, "-j", "neigh", "show", "to", ip],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [n for n in json.loads(out or "[]") if "FAILED" not in n.get("state", [])]


def wait_for(what: str, check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_a_fixed_ip_follows_its_pod_and_a_late_del_frees_nothing(backend: str) -> None:
    ok, why = etcd.available()
    require(ok, why)
    with Cluster(backend=backend, reconcile_interval=1, fixed_ranges=(FIXED_RANGE,)) as c:
        for node in c.nodes.values():  # strict reverse-path filtering everywhere
            subprocess.run(["ip", "netns", "exec", node.netns, "sysctl", "-qw",
                            "net.ipv4.conf.all.rp_filter=1"], check=True)  # fmt: skip
        rule = c.moorctl("n1", "sticky", "add", "--namespace", "prod", "--pod-regex", "db-[0-9]+")
        assert rule.returncode == 0, rule.stderr
        client = c.add_pods(per_node=1, nodes=["n3"])[0]
        old = c.add_pod("n1", db0("uid-1"))
        assert old.ip == DB_IP
        serve(c, old.name, OLD_PORT)
        wait_for("node 3 to reach db-0 on node 1",
                 lambda: probe(client.name, [Probe(DB_IP, port=OLD_PORT, timeout=0.3)])[0].ok)  # fmt: skip

        # Recreated on node 2 while node 1 has not run its DEL yet.
        new = c.add_pod("n2", db0("uid-2"))
        added = time.monotonic()
        assert new.ip == DB_IP
        serve(c, new.name, NEW_PORT)
        reply = None
        while time.monotonic() - added < MOVE_WITHIN + 5:
            reply = probe(client.name, [Probe(DB_IP, port=NEW_PORT, timeout=0.2, tries=1)])[0]
            if reply.ok:
                break
        assert reply is not None and reply.ok, reply
        assert reply.src == client.ip
        moved_in = time.monotonic() - added
        assert moved_in < MOVE_WITHIN + 1.0, f"traffic reached the moved pod after {moved_in:.2f} s"

        # Node 1 routes the IP to node 2 now, never to its old pod's veth.
        old_veth = old.result["interfaces"][0]["name"]
        wait_for("node 1 to route the IP away",
                 lambda: all(r.get("dev") != old_veth for r in routes_to(c, "n1", DB_IP)))  # fmt: skip
        (route,) = routes_to(c, "n1", DB_IP)
        assert route["protocol"] == "109"
        n2 = c.nodes["n2"].public_ip
        if backend == "host-gw":
            assert route["gateway"] == n2
        else:
            assert route["dev"] == "moor.1" and route["gateway"] == c.subnet_of("n2").split("/")[0]
        (here,) = routes_to(c, "n2", DB_IP)
        assert here["dev"] == new.result["interfaces"][0]["name"] and here["scope"] == "link"
        # ... and knows the new pod's MAC for good: it never waits on an ARP answer for it.
        (entry,) = neighbours_of(c, "n2", DB_IP)
        assert (entry["dev"], entry["lladdr"], entry["state"]) == (
            here["dev"], new.result["interfaces"][1]["mac"], ["PERMANENT"],
        )  # fmt: skip
        assert not probe(client.name, [Probe(DB_IP, port=OLD_PORT, timeout=0.3)])[0].ok
        wait_for("node 1 to forget its old pod's neighbour entry",
                 lambda: neighbours_of(c, "n1", DB_IP) == [])  # fmt: skip

        assert f"AUDIT move ip={DB_IP} pod=prod/db-0 node=n2 uid=uid-2" in c.log("n2")
        assert "replaces=uid-1 was_on=n1" in c.log("n2")
        assert f"AUDIT moved-away ip={DB_IP} pod=prod/db-0 node=n1 to=n2" in c.log("n1")

        # Node 1's late DEL frees nothing: node 2's pod keeps the IP and its traffic.
        c.delete_pod(old)
        fixed = json.loads(c.moorctl("n3", "ips", "--json").stdout)
        holders = [a for a in fixed if a["ip"] == DB_IP]
        assert [(a["node"], a["containerID"]) for a in holders] == [("n2", new.container_id)]
        assert probe(client.name, [Probe(DB_IP, port=NEW_PORT)])[0].ok
        time.sleep(1.5)  # a resync later, nothing moved back
        (route,) = routes_to(c, "n1", DB_IP)
        assert route.get("gateway") in (n2, c.subnet_of("n2").split("/")[0])
