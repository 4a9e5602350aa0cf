"""Issue 13: the routing backends against a real kernel, one netns at a time.

The backends run in-process on a thread inside a test netns (tests/helpers/netns_thread.py); the
kernel is checked with `ip -json` / `bridge -json`, never with moor's own readers. The simulated
3-node cluster with real daemons and traffic is tests/test_multinode.py; this file pins down the
rules: what is owned, what is left alone, what is replaced, in what state each peer ends up.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from cni_plugin.datapath.monitor import DeletionMonitor
from cni_plugin.datapath.routes import MOOR_RTPROTO, Underlay, underlay_for
from cni_plugin.datapath.rtnl_codec import RouteMsg
from ipamd.model import SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.routing.backend import plan_routes
from ipamd.routing.hostgw import HostGw
from ipamd.routing.peers import (
    LOCAL,
    REFUSED,
    ROUTED,
    UNREACHABLE,
    FixedPlan,
    RemoteSubnet,
    remote_subnets,
)
from ipamd.routing.vxlan import Vxlan
from tests.conftest import require
from tests.helpers.netns_thread import in_netns

NET = ipaddress.ip_network("10.204.0.0/16")
OWN_IP, PEER_IP, PEER2_IP = "192.168.204.11", "192.168.204.12", "192.168.204.13"
_run = secrets.token_hex(2)


def subnet(i: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.204.{i}.0/24")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout


def kernel(ns: str, *args: str) -> list[dict]:
    out = sh("ip", "-n", ns, "-j", *args)
    return json.loads(out) if out.strip() else []


def moor_routes(ns: str) -> dict[str, dict]:
    return {r["dst"]: r for r in kernel(ns, "route", "show", "proto", str(MOOR_RTPROTO))}


def fdb(ns: str, dev: str) -> list[tuple[str, str]]:
    out = sh("bridge", "-n", ns, "-j", "fdb", "show", "dev", dev)
    return sorted((e["mac"], e.get("dst", "")) for e in json.loads(out or "[]"))


@pytest.fixture
def node_ns() -> Iterator[str]:
    """A netns with an underlay veth `u0` (192.168.204.11/24) whose peer stays in it, up."""
    require(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
            "needs root")  # fmt: skip
    name = f"mrt-{_run}-{secrets.token_hex(2)}"
    sh("ip", "netns", "add", name)
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
            ["addr", "add", f"{OWN_IP}/24", "dev", "u0"],
            ["link", "set", "u0", "up"],
            ["link", "set", "u1", "up"],
        ):
            sh("ip", "-n", name, *cmd)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


# ---- pure logic ------------------------------------------------------------------------------
def lease(i: int, node: str, ip: str, **backend: object) -> SubnetLease:
    return SubnetLease(subnet(i), node, 0.0, ip, dict(backend))


def test_remote_subnets_refuses_what_cannot_be_routed_and_says_why() -> None:
    cfg = NetworkConfig(NET, 24, backend="vxlan", vni=4, vxlan_port=4790)
    good = {"type": "vxlan", "vni": 4, "port": 4790, "vtepMAC": "02:00:00:00:00:01"}
    leases = [
        lease(1, "me", OWN_IP, **good),
        lease(2, "p2", PEER_IP, **good),
        lease(3, "p3", PEER2_IP, **{**good, "vni": 1}),
        lease(4, "p4", PEER2_IP, **{**good, "port": 8472}),
        lease(5, "p5", "", **good),
        lease(6, "p6", OWN_IP, **good),
        lease(7, "p7", PEER2_IP, **{**good, "vtepMAC": "nope"}),
        lease(8, "p8", PEER2_IP, type="host-gw"),
    ]
    remotes, states = remote_subnets(leases, "me", cfg, OWN_IP)
    assert remotes == [RemoteSubnet(subnet(2), "p2", PEER_IP, "02:00:00:00:00:01")]
    assert states[subnet(1)].state == LOCAL
    reasons = {s: states[subnet(s)].reason for s in range(3, 9)}
    assert all(states[subnet(s)].state == REFUSED for s in range(3, 9))
    assert (
        "VNI 1" in reasons[3] and "port 8472" in reasons[4] and "no usable public IP" in reasons[5]
    )
    assert "own public IP" in reasons[6] and "VTEP MAC" in reasons[7] and "host-gw" in reasons[8]


def test_plan_routes_touches_only_owned_routes() -> None:
    ours = RouteMsg("10.204.2.0", 24, PEER_IP, 3, proto=MOOR_RTPROTO)
    moved = RouteMsg("10.204.3.0", 24, PEER_IP, 3, proto=MOOR_RTPROTO)
    left = RouteMsg("10.204.9.0", 24, PEER_IP, 3, proto=MOOR_RTPROTO)
    admin = RouteMsg("10.204.4.0", 24, "192.168.204.99", 3, proto=4)
    desired = {
        r.prefix: r
        for r in (ours, RouteMsg("10.204.3.0", 24, PEER2_IP, 3, proto=MOOR_RTPROTO),
                  RouteMsg("10.204.4.0", 24, PEER2_IP, 3, proto=MOOR_RTPROTO))
    }  # fmt: skip
    plan = plan_routes(desired, [ours, moved, left, admin])
    assert plan.stale == [left]  # moved is changed in place by REPLACE, not deleted first
    assert [r.prefix for r in plan.missing] == ["10.204.3.0/24"]
    assert plan.taken == {"10.204.4.0/24": admin}


# ---- host-gw against the kernel ---------------------------------------------------------------
def test_host_gw_routes_direct_peers_only_and_leaves_foreign_routes(node_ns: str) -> None:
    sh("ip", "-n", node_ns, "route", "add", "192.168.99.0/24", "via", PEER2_IP)  # a routed net
    sh("ip", "-n", node_ns, "route", "add", str(subnet(5)), "via", PEER2_IP)  # an admin's route
    stale = RouteMsg("10.204.9.0", 24, PEER_IP)
    sh("ip", "-n", node_ns, "route", "add", stale.prefix, "via", PEER_IP, "proto", "109")
    remotes = [
        RemoteSubnet(subnet(2), "p2", PEER_IP),
        RemoteSubnet(subnet(3), "p3", "192.168.99.7"),  # behind a router: no route
        RemoteSubnet(subnet(4), "p4", "192.168.77.7"),  # no route at all
        RemoteSubnet(subnet(5), "p5", PEER2_IP),
    ]

    def run() -> dict:
        return HostGw(underlay_for(OWN_IP)).reconcile(remotes, FixedPlan())

    states = in_netns(node_ns, run)
    assert states[subnet(2)].state == ROUTED
    assert states[subnet(3)].state == UNREACHABLE and "192.168.99.7" in states[subnet(3)].reason
    assert states[subnet(4)].state == UNREACHABLE and "no route" in states[subnet(4)].reason
    assert states[subnet(5)].state == REFUSED and "another owner" in states[subnet(5)].reason
    routes = moor_routes(node_ns)
    assert set(routes) == {str(subnet(2))}, routes  # the stale 10.204.9.0/24 is gone
    assert routes[str(subnet(2))]["gateway"] == PEER_IP and routes[str(subnet(2))]["dev"] == "u0"
    admin = [r for r in kernel(node_ns, "route", "show", str(subnet(5)))]
    assert admin and admin[0]["gateway"] == PEER2_IP and admin[0].get("protocol") != "109"

    # A peer with a new public IP: the route changes in place; a second run changes nothing.
    remotes[0] = RemoteSubnet(subnet(2), "p2", PEER2_IP)
    in_netns(node_ns, run)
    assert moor_routes(node_ns)[str(subnet(2))]["gateway"] == PEER2_IP
    before = sh("ip", "-n", node_ns, "route")
    in_netns(node_ns, run)
    assert sh("ip", "-n", node_ns, "route") == before


# ---- vxlan against the kernel ------------------------------------------------------------------
def test_vxlan_device_entries_order_and_replacement(node_ns: str) -> None:
    cfg = NetworkConfig(NET, 24, backend="vxlan", vni=7, vxlan_port=4790, cluster_id="c1")
    mac2, mac2b, mac3 = "02:00:00:00:02:02", "02:00:00:00:02:0b", "02:00:00:00:03:03"
    backend: list[Vxlan] = []

    def run(*remotes: RemoteSubnet) -> dict:
        if not backend:
            backend.append(Vxlan(underlay_for(OWN_IP), cfg, "me", lambda: [subnet(1)]))
        return backend[0].reconcile(list(remotes), FixedPlan())

    p2, p3 = (
        RemoteSubnet(subnet(2), "p2", PEER_IP, mac2),
        RemoteSubnet(subnet(3), "p3", "192.168.55.5", mac3),
    )
    states = in_netns(node_ns, lambda: run(p2, p3))
    assert {states[subnet(2)].state, states[subnet(3)].state} == {ROUTED}
    (link,) = kernel(node_ns, "-d", "link", "show", "moor.7")
    info = link["linkinfo"]["info_data"]
    assert (info["id"], info["port"], info["learning"], link["mtu"]) == (7, 4790, False, 1450)
    assert link["address"] == cfg.vtep_mac("me") and link["operstate"] in ("UNKNOWN", "UP")
    addrs = [
        (a["local"], a["prefixlen"])
        for a in kernel(node_ns, "addr", "show", "moor.7")[0]["addr_info"]
        if a["family"] == "inet"
    ]
    assert addrs == [("10.204.1.0", 32)]
    neigh = {n["dst"]: n["lladdr"] for n in kernel(node_ns, "neigh", "show", "dev", "moor.7")}
    assert neigh == {"10.204.2.0": mac2, "10.204.3.0": mac3}
    assert fdb(node_ns, "moor.7") == [(mac2, PEER_IP), (mac3, "192.168.55.5")]
    routes = moor_routes(node_ns)
    assert (
        routes[str(subnet(2))]["gateway"] == "10.204.2.0"
        and "onlink" in routes[str(subnet(2))]["flags"]
    )
    assert routes[str(subnet(3))]["dev"] == "moor.7"  # across L3: the tunnel is plain UDP

    # p2 rebooted elsewhere with a new MAC and IP, p3 left: nothing stale stays behind.
    p2b = RemoteSubnet(subnet(2), "p2", PEER2_IP, mac2b)
    in_netns(node_ns, lambda: run(p2b))
    assert fdb(node_ns, "moor.7") == [(mac2b, PEER2_IP)]
    neigh = {n["dst"]: n["lladdr"] for n in kernel(node_ns, "neigh", "show", "dev", "moor.7")}
    assert neigh == {"10.204.2.0": mac2b}
    assert set(moor_routes(node_ns)) == {str(subnet(2))}

    # The device vanishes: the next run makes it again and replays every peer.
    sh("ip", "-n", node_ns, "link", "del", "moor.7")
    in_netns(node_ns, lambda: run(p2b))
    assert fdb(node_ns, "moor.7") == [(mac2b, PEER2_IP)]
    assert str(subnet(2)) in moor_routes(node_ns)


# ---- the deletion monitor -----------------------------------------------------------------------
def test_monitor_reports_deletions_of_owned_objects_only(node_ns: str) -> None:
    woke = threading.Event()
    backend = HostGw(Underlay(2, "u0", 1500, OWN_IP))  # its filter: routes of protocol 109
    monitor = in_netns(node_ns, lambda: DeletionMonitor(backend.wants, woke.set))
    monitor.start()
    try:
        sh("ip", "-n", node_ns, "route", "add", "10.204.8.0/24", "via", PEER_IP)  # not ours
        sh("ip", "-n", node_ns, "route", "del", "10.204.8.0/24")
        time.sleep(0.5)  # the monitor has seen it by now; it must not have woken
        assert not woke.is_set()
        sh("ip", "-n", node_ns, "route", "add", "10.204.9.0/24", "via", PEER_IP, "proto", "109")
        sh("ip", "-n", node_ns, "route", "del", "10.204.9.0/24")
        assert woke.wait(5)
    finally:
        monitor.stop()
