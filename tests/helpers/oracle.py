"""Kernel-state oracle built on iproute2's JSON output.

It imports neither moor nor pyroute2, so a test that asserts through it checks the kernel, not our own
reading of it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from typing import Any


def ip_json(*args: str, netns: str | None = None) -> Any:
    """Run `ip -json ARGS` (inside `netns` when given) and return the parsed output."""
    cmd = ["ip"]
    if netns:
        cmd += ["-n", netns]
    cmd += ["-json", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def link(name: str, netns: str | None = None) -> dict[str, Any] | None:
    """The `ip -details link show NAME` record, or None when the link does not exist."""
    cmd = ["ip"] + (["-n", netns] if netns else []) + ["-json", "-details", "link", "show", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    items = json.loads(proc.stdout)
    return items[0] if items else None


def gone(name: str, netns: str | None = None, timeout: float = 5.0) -> bool:
    """The link does not exist, or is gone within `timeout`: DEL answers before its host veth's
    deletion (the kernel's ~16 ms) is done, in the daemon's background."""
    deadline = time.monotonic() + timeout
    while link(name, netns) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def addresses(name: str, netns: str | None = None, family: str = "inet") -> list[str]:
    """CIDR strings of `family` on link NAME."""
    data = ip_json("addr", "show", "dev", name, netns=netns)
    return [
        f"{a['local']}/{a['prefixlen']}"
        for item in data
        for a in item.get("addr_info", [])
        if a.get("family") == family
    ]


def routes(netns: str | None = None, table: str = "main") -> list[dict[str, Any]]:
    """IPv4 routes of `table`."""
    return ip_json("-4", "route", "show", "table", table, netns=netns)


def netns_exists(name: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def routes6(netns: str | None = None, table: str = "main") -> list[dict[str, Any]]:
    """IPv6 routes of `table`."""
    return ip_json("-6", "route", "show", "table", table, netns=netns)


def nat_rules(netns: str | None = None, ipv6: bool = False) -> list[str]:
    """`iptables -t nat -S` (ip6tables with ipv6) lines, run inside `netns` when given."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + [
        "ip6tables" if ipv6 else "iptables",
        "-w",
        "-t",
        "nat",
        "-S",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def sysctl(path: str, netns: str | None = None) -> str:
    """Value of /proc/sys/<path> (slash-separated, e.g. "net/ipv4/ip_forward") inside `netns`."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["cat", f"/proc/sys/{path}"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def nat_chain(chain: str, netns: str | None = None, ipv6: bool = False) -> list[str] | None:
    """`iptables -t nat -S CHAIN` lines (the `-N` line included), or None when the chain is absent."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + [
        "ip6tables" if ipv6 else "iptables",
        "-w",
        "-t",
        "nat",
        "-S",
        chain,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def ipv4_networks_in_use(netns: str | None = None) -> list[str]:
    """Every IPv4 prefix the host already reaches: its addresses' networks and main-table routes.

    A test that invents an "outside" network picks one that overlaps none of these, so it can never
    shadow the machine's real uplink.
    """
    nets = [
        str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network)
        for item in ip_json("-4", "addr", "show", netns=netns)
        for a in item.get("addr_info", [])
    ]
    for route in routes(netns=netns):
        dst = route.get("dst", "")
        if dst and dst != "default":
            nets.append(str(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)))
        if route.get("gateway"):
            nets.append(f"{route['gateway']}/32")
    return nets


MOOR_RTPROTO = 109  # the routing protocol number on every route moor installs (issue 13)


def moor_routes(netns: str | None = None) -> list[dict[str, Any]]:
    """`ip -j route show proto 109`: the IPv4 routes moor owns."""
    return ip_json("-4", "route", "show", "proto", str(MOOR_RTPROTO), netns=netns)


def _json_or_empty(argv: list[str]) -> list[dict[str, Any]]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def neighbours(dev: str, netns: str | None = None) -> list[dict[str, Any]]:
    """`ip -j -4 neigh show dev DEV` ([] when DEV does not exist)."""
    ns = ["-n", netns] if netns else []
    return _json_or_empty(["ip", *ns, "-j", "-4", "neigh", "show", "dev", dev])


def fdb(dev: str, netns: str | None = None) -> list[dict[str, Any]]:
    """`bridge -j fdb show dev DEV` ([] when DEV does not exist)."""
    ns = ["-n", netns] if netns else []
    return _json_or_empty(["bridge", *ns, "-j", "fdb", "show", "dev", dev])
