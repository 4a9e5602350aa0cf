"""`make demo CLUSTER=3 [BACKEND=vxlan]`: a simulated N-node cluster, its pods, who reaches whom.

Built by tests/helpers/cluster.py (the same harness the tests use): network namespaces on a
private underlay, etcd in the infra netns, one moor-ipamd per node netns, two pods per node made
through `ip netns exec <node> bin/moor`. It prints each node's moor routes, `moorctl subnets`,
the pod-to-pod matrix (each cell the source address the receiver saw, so NAT would show) and
egress to an "outside" netns, then tears everything down. Exit status 0 only when every pod
reached every other one unNATed and the outside saw each pod as its node.
"""

from __future__ import annotations

import subprocess

from tests.helpers import oracle
from tests.helpers.cluster import Cluster, Pod
from tests.helpers.traffic import Reply, matrix
from tests.helpers.underlay import OUTSIDE

PODS_PER_NODE = 2


def cell(reply: Reply, expected: str) -> tuple[str, bool]:
    if not reply.ok:
        return "-", False
    return (reply.src, True) if reply.src == expected else (f"{reply.src}(!)", False)


def render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def short(pod: Pod, prefix: str) -> str:
    return pod.name.removeprefix(f"{prefix}-")


def run(nodes: int, backend: str) -> int:
    print(f"== building a {nodes}-node cluster ({backend}) in network namespaces")
    with Cluster(backend=backend, nodes=nodes) as c:
        print(f"   etcd in {c.underlay.infra} at {c.etcd.endpoint}, key prefix {c.key_prefix}")
        for name, node in c.nodes.items():
            print(f"   {name}: netns {node.netns}, public IP {node.public_ip}, "
                  f"subnet {c.subnet_of(name)}")  # fmt: skip

        print(f"\n== {PODS_PER_NODE} pods per node through `ip netns exec <node> bin/moor` (ADD)")
        pods = c.add_pods(per_node=PODS_PER_NODE)
        for pod in pods:
            print(f"   {short(pod, c.prefix)} on {pod.node}: {pod.ip}")
        c.echo(*[p.name for p in pods], c.underlay.outside)

        print("\n== moor's routes on each node (ip route show proto 109)")
        for name, node in c.nodes.items():
            shown = subprocess.run(
                ["ip", "-n", node.netns, "route", "show", "proto", "109"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            lines = [line.strip() for line in shown.splitlines()]
            print(f"   {name}: " + ("\n       ".join(lines) or "(none)"))

        print("\n== moorctl subnets (as n1 sees the cluster)")
        print("   " + "\n   ".join(c.moorctl("n1", "subnets").stdout.strip().splitlines()))

        print("\n== pod to pod (UDP echo): the source address each receiver saw; '-' no answer,")
        print("   '(!)' an address other than the sender's own pod IP")
        replies = matrix([(p.name, p.ip) for p in pods], [(p.name, p.ip) for p in pods])
        header = ["from \\ to"] + [short(p, c.prefix) for p in pods]
        rows, good, total = [], 0, 0
        for src in pods:
            row = [f"{short(src, c.prefix)} ({src.node})"]
            for dst in pods:
                if dst is src:
                    row.append("")
                    continue
                text, ok = cell(replies[(src.name, dst.name)], src.ip)
                row.append(text)
                good, total = good + ok, total + 1
            rows.append(row)
        print(render(header, rows))
        cross = sum(1 for s in pods for d in pods if s.node != d.node)
        print(f"   {good} of {total} pairs answered unNATed ({cross} of them across nodes)")

        print(f"\n== egress to the outside netns ({OUTSIDE}.2): it must see the node's address")
        out = matrix([(p.name, p.ip) for p in pods], [(c.underlay.outside, f"{OUTSIDE}.2")])
        egress_ok = 0
        for pod in pods:
            text, ok = cell(out[(pod.name, c.underlay.outside)], c.nodes[pod.node].public_ip)
            egress_ok += ok
            print(f"   {short(pod, c.prefix)} -> outside: {text}")
        print("\n== tearing down")
    left = oracle.ip_json("netns", "list")
    left = [n["name"] for n in left if n["name"].startswith(f"{c.prefix}-")]
    print(f"   netns left with prefix {c.prefix}: {left or 'none'}")
    all_green = good == total and egress_ok == len(pods) and not left
    print("ALL PATHS GREEN" if all_green else "SOME PATHS FAILED")
    return 0 if all_green else 1
