"""What a moor-ipamd restart must leave as it was on the simulated cluster, read from the daemons,
the store and the kernel (iproute2, iptables-save), so a test compares before and after.

Each kind of state is a Counter of canonical JSON lines (sorted keys, the node or pod named in
each), so a duplicate shows as a count of 2 and a difference reads as whole records. Links carry
their ifindex: a veth, bridge or vxlan device deleted and made again under the same name differs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from typing import Any

from tests.helpers import oracle
from tests.helpers.cluster import Cluster, Pod
from tests.helpers.routing import device

Snapshot = dict[str, Counter[str]]
LINK_KINDS = ("veth", "bridge", "vxlan")
LINK_FIELDS = ("ifname", "ifindex", "address", "mtu", "master", "flags", "operstate")
COUNTERS = re.compile(r"\[\d+:\d+\]")


def snapshot(c: Cluster, pods: list[Pod]) -> Snapshot:
    """The daemons' allocations (`moorctl status`) and the store's (`moorctl ips`); per node its
    main routing table, its veths, bridge and vxlan device, every address on them, the vxlan
    neighbour and FDB entries, and the iptables rules; per pod of `pods`, its eth0 and routes."""
    state: Snapshot = {}

    def put(kind: str, where: str, items: list[dict[str, Any]]) -> None:
        lines = (json.dumps({"at": where, **item}, sort_keys=True) for item in items)
        state.setdefault(kind, Counter()).update(lines)

    any_node = next(iter(c.nodes))
    ips = c.moorctl(any_node, "ips", "--json")
    assert ips.returncode == 0, ips.stderr
    put("store", "store", json.loads(ips.stdout))
    for name, node in c.nodes.items():
        status = c.status(name)
        assert status is not None, f"{name}'s daemon does not answer"
        put("allocations", name, status["allocations"])
        put("routes", name, oracle.routes(node.netns))
        put("links", name, links(node.netns))
        put("addresses", name, addresses(node.netns))
        dev = device(1)
        put("vxlan entries", name, oracle.neighbours(dev, node.netns) + oracle.fdb(dev, node.netns))
        put("rules", name, [{"rule": line} for line in iptables(node.netns)])
    for pod in pods:
        put("pods", pod.name, addresses(pod.name) + oracle.routes(pod.name))
    return state


def links(netns: str) -> list[dict[str, Any]]:
    out = []
    for link in oracle.ip_json("-details", "link", "show", netns=netns):
        kind = link.get("linkinfo", {}).get("info_kind", "")
        if kind in LINK_KINDS:
            out.append({"kind": kind, **{f: link.get(f) for f in LINK_FIELDS}})
    return out


def addresses(netns: str) -> list[dict[str, Any]]:
    return [
        {"ifname": link["ifname"], "address": f"{a['local']}/{a['prefixlen']}"}
        for link in oracle.ip_json("addr", "show", netns=netns)
        for a in link.get("addr_info", [])
    ]


def iptables(netns: str) -> list[str]:
    """`iptables-save` inside the netns without its comments and packet counters."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-save"], capture_output=True, text=True, check=True
    )
    return [COUNTERS.sub("", line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def changes(before: Snapshot, after: Snapshot) -> tuple[Snapshot, Snapshot]:
    """(what went, what came), per kind, with multiplicity."""
    kinds = before.keys() | after.keys()
    empty: Counter[str] = Counter()
    went = {k: before.get(k, empty) - after.get(k, empty) for k in kinds}
    came = {k: after.get(k, empty) - before.get(k, empty) for k in kinds}
    return {k: v for k, v in went.items() if v}, {k: v for k, v in came.items() if v}


def markers(container_id: str, host_veth: str, ip: str) -> tuple[str, ...]:
    """The JSON fragments that tie a record to one pod: its container ID, host veth, IP."""
    return (f'"{container_id}"', f'"{host_veth}"', f'"{ip}"', f'"{ip}/')


def not_of(diff: Snapshot, marks: tuple[str, ...]) -> list[str]:
    """The lines of `diff` that belong to no pod these `markers` describe."""
    return [
        f"{kind}: {line}"
        for kind, lines in diff.items()
        for line in lines
        if not any(m in line for m in marks)
    ]
