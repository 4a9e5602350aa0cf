"""What moor's multi-node routing must have put into a node's kernel (issue 13), and the check.

The desired state is a function of the peers' leases, as the daemon-side contract says:
- host-gw: per peer `<subnet> via <publicIP> dev eth0 proto 109`, nothing else with proto 109;
- vxlan: device `moor.<vni>` (vxlan id, dstport, nolearning, MTU = underlay MTU - 50, the own
  subnet's `.0/32`), and per peer a permanent neighbour `<peer .0>` -> VTEP MAC, one FDB entry
  VTEP MAC -> publicIP (self, permanent), and `<subnet> via <peer .0> dev moor.<vni> onlink proto
  109`. Nothing more: an entry for a gone peer, an old MAC or an old address is a difference.
Everything is read with iproute2 (oracle.py), never through moor.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from tests.helpers import oracle
from tests.helpers.cluster import Cluster

VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class Peer:
    node: str
    subnet: str
    ip: str  # its publicIP
    mac: str = ""  # its VTEP MAC (vxlan), lower case

    @property
    def vtep_ip(self) -> str:
        """The subnet's network address: the peer's VTEP address and the route's gateway."""
        return str(ipaddress.ip_network(self.subnet).network_address)

    def moved(self, ip: str) -> Peer:
        return replace(self, ip=ip)


def device(vni: int) -> str:
    return f"moor.{vni}"


def peers(c: Cluster, vni: int = 1) -> dict[str, Peer]:
    """Every node's lease as the store has it (asked through a live node). The VTEP MAC is the
    one the node's own vxlan device has (the lease's `vtepMAC` when the device is not there):
    whether the lease tells it truly is a test of its own."""
    live = next(
        n for n, node in c.nodes.items() if node.daemon.proc and node.daemon.proc.poll() is None
    )
    out = {}
    for row in c.subnets(live):
        node = c.nodes.get(row["node"])
        link = oracle.link(device(vni), node.netns) if node else None
        mac = link["address"] if link else row["backend"].get("vtepMAC", "")
        out[row["node"]] = Peer(row["node"], row["subnet"], row["publicIP"], mac.lower())
    return out


def differences(
    c: Cluster, node: str, want: Iterable[Peer], *, backend: str, vni: int = 1, port: int = 8472
) -> list[str]:
    """How the node's kernel differs from what `want` (every live lease, its own included) asks."""
    ns, dev = c.nodes[node].netns, device(vni)
    want = list(want)
    others = [p for p in want if p.node != node]
    problems: list[str] = []

    def compare(what: str, got: set, expected: set) -> None:
        if got != expected:
            problems.append(
                f"{node} {what}: missing {expected - got or '-'}, extra {got - expected or '-'}"
            )

    routes = oracle.moor_routes(ns)
    if backend == "host-gw":
        got = {(r["dst"], r.get("gateway", ""), r.get("dev", "")) for r in routes}
        compare("routes", got, {(p.subnet, p.ip, "eth0") for p in others})
        return problems

    got = {
        (r["dst"], r.get("gateway", ""), r.get("dev", ""), "onlink" in r.get("flags", []))
        for r in routes
    }
    compare("routes", got, {(p.subnet, p.vtep_ip, dev, True) for p in others})
    neigh = {
        (n["dst"], n.get("lladdr", "").lower(), "PERMANENT" in n.get("state", []))
        for n in oracle.neighbours(dev, ns)
    }
    compare("neighbours", neigh, {(p.vtep_ip, p.mac, True) for p in others})
    fdb = {
        (e["mac"].lower(), e.get("dst", ""), e.get("state", ""), "self" in e.get("flags", []))
        for e in oracle.fdb(dev, ns)
    }
    compare("fdb", fdb, {(p.mac, p.ip, "permanent", True) for p in others})
    own = next(p for p in want if p.node == node)
    return problems + device_differences(c, node, own, vni, port)


def device_differences(c: Cluster, node: str, own: Peer, vni: int, port: int) -> list[str]:
    """The vxlan device: kind, VNI, learning off, MTU = underlay - 50, dstport, the own subnet's
    `.0/32`, and (when `own.mac` is known) its MAC."""
    dev = device(vni)
    ns = c.nodes[node].netns
    link, underlay = oracle.link(dev, ns), oracle.link("eth0", ns)
    if link is None or underlay is None:
        return [f"{node}: no device {dev}"]
    data = link.get("linkinfo", {}).get("info_data", {})
    got = (link["linkinfo"].get("info_kind"), data.get("id"), data.get("learning"), link["mtu"])
    want = ("vxlan", vni, False, underlay["mtu"] - VXLAN_OVERHEAD)
    problems = (
        [f"{node} {dev}: (kind, id, learning, mtu) {got}, want {want}"] if got != want else []
    )
    if data.get("port") != port:
        problems.append(f"{node} {dev}: dstport {data.get('port')}, want {port}")
    addrs = oracle.addresses(dev, netns=c.nodes[node].netns)
    if addrs != [f"{own.vtep_ip}/32"]:
        problems.append(f"{node} {dev}: addresses {addrs}, want {own.vtep_ip}/32")
    if own.mac and link["address"].lower() != own.mac:
        problems.append(f"{node} {dev}: MAC {link['address']}, want {own.mac}")
    return problems


def wait_until(check: Callable[[], list[str]], timeout: float, what: str) -> float:
    """Poll `check` (a list of problems) until it is empty; the seconds it took. AssertionError
    with the last problems after `timeout`."""
    start = time.monotonic()
    while True:
        problems = check()
        if not problems:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s:\n  " + "\n  ".join(problems))
        time.sleep(0.05)


def converged(
    c: Cluster, want: Iterable[Peer], nodes: Iterable[str], **kw: object
) -> Callable[[], list[str]]:
    """A check for `wait_until`: each of `nodes` has exactly what `want` asks (`kw`: backend,
    vni, port as for `differences`)."""
    want, nodes = list(want), list(nodes)
    return lambda: [d for n in nodes for d in differences(c, n, want, **kw)]  # type: ignore[arg-type]
