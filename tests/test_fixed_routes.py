"""Issue 14: a fixed IP's /32 on the node that hosts it, against a real kernel (one netns).

The churn test found reconcile runs failing ("route reconcile failed; retrying in 1 s") whenever
a fixed pod's DEL deleted its host veth between the run's look at the veth and its route
replace: the /32 to that veth raised LinkNotFound and every route after it waited for the retry.
A /32 whose veth vanished is gone with it; the run goes on.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from cni_plugin.datapath.routes import MOOR_RTPROTO, underlay_for
from ipamd.routing import backend
from ipamd.routing.hostgw import HostGw
from ipamd.routing.peers import ROUTED, FixedPlan, RemoteSubnet
from tests.conftest import require
from tests.helpers.netns_thread import in_netns

OWN_IP, PEER_IP = "192.168.207.11", "192.168.207.12"
PEER_SUBNET = ipaddress.ip_network("10.207.2.0/24")
FIXED_IPS = [ipaddress.ip_address("10.207.250.5"), ipaddress.ip_address("10.207.250.6")]


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


@pytest.fixture
def node_ns() -> Iterator[str]:
    """A netns with an underlay veth u0 (OWN_IP/24) and two pod-side veths, fx0 and fx1, up."""
    require(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
            "needs root")  # fmt: skip
    name = f"mfr-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                    ["addr", "add", f"{OWN_IP}/24", "dev", "u0"],
                    ["link", "add", "fx0", "type", "veth", "peer", "name", "fy0"],
                    ["link", "add", "fx1", "type", "veth", "peer", "name", "fy1"]):  # fmt: skip
            ip(name, *cmd)
        for link in ("u0", "u1", "fx0", "fy0", "fx1", "fy1"):
            ip(name, "link", "set", link, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_fixed_pods_veth_gone_mid_run_fails_nothing(
    node_ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked = backend.host_veth_index

    def vanishing(name: str) -> int | None:
        index = looked(name)
        if name == "fx0":
            ip(node_ns, "link", "del", name)  # the pod's DEL, right after the run looked
        return index

    monkeypatch.setattr(backend, "host_veth_index", vanishing)
    local = {FIXED_IPS[0]: "fx0", FIXED_IPS[1]: "fx1"}
    states = in_netns(node_ns, lambda: HostGw(underlay_for(OWN_IP)).reconcile(
        [RemoteSubnet(PEER_SUBNET, "p2", PEER_IP)], FixedPlan(local=local)))  # fmt: skip

    assert states[PEER_SUBNET].state == ROUTED
    have = json.loads(ip(node_ns, "-j", "route", "show", "proto", str(MOOR_RTPROTO)))
    assert sorted((r["dst"], r.get("dev")) for r in have) == [
        (str(PEER_SUBNET), "u0"), (str(FIXED_IPS[1]), "fx1"),
    ]  # fmt: skip
