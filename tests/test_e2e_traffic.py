"""Real packets through moor's bridge datapath (moor as the main plugin, `"type": "moor"`).

Pods are netns set up by ADD; traffic is plain Python sockets run inside them with
`ip netns exec NS /usr/bin/python3 -c ...`. Every socket operation has a timeout of at most 5 s and
every subprocess a wall-clock bound; echo servers are killed in finalizers.

- pod A <-> pod B (UDP and TCP, both directions), and pod -> host (the gateway IP on the bridge);
- egress masquerade to an "outside" netns that has no route back to the pod network: the packet
  arrives from the host's address and the reply finds its way back (conntrack);
- the node's masquerade rule set exists once, however many pods;
- after DEL the pod's IP is silent and its host veth is gone.

Names: daemon "mtr" on 10.245.0.0/16 with bridge mtrbr0 and chain MTR-MASQ, outside netns
"mtr-out-<pid>" linked to the host by veth "mtrout0". The outside network is 192.0.2.0/24 (host
.1, outside .2) unless the machine already uses it (this CI's own uplink is 192.0.2.2/24 via
192.0.2.1!): then the first free one of 198.51.100.0/24 and 203.0.113.0/24, so the test never
shadows the real uplink. Traffic only goes to netns created here.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_interface, ip_network
from typing import Any

import pytest

from tests.conftest import require, start_daemon
from tests.helpers import oracle
from tests.helpers.moor import Daemon, ExecRuntime, LibcniRuntime, plugin_config

pytestmark = pytest.mark.netns

PYTHON = "/usr/bin/python3"
NETWORK = "mtr-net"
OUTSIDE_LINK = "mtrout0"
OUTSIDE_CANDIDATES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
SOCKET_TIMEOUT = 3.0  # every socket operation in the helpers below; <= 5 s
SILENCE_TIMEOUT = 2.0  # how long a "no answer" is waited for

Runtime = ExecRuntime | LibcniRuntime

# An echo server for UDP and TCP on one port (0 = any): prints "ready PORT", then answers each
# datagram/connection with JSON {"echo", "peer", "proto"} -- "peer" is the source address it saw.
# It exits by itself after LIFETIME seconds if nobody kills it first.
SERVER = r"""
import json, select, socket, sys, time
addr, port, lifetime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((addr, port))
port = udp.getsockname()[1]
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((addr, port))
tcp.listen(16)
print("ready", port, flush=True)
end = time.monotonic() + lifetime
while (left := end - time.monotonic()) > 0:
    readable, _, _ = select.select([udp, tcp], [], [], left)
    for sock in readable:
        if sock is udp:
            data, peer = udp.recvfrom(65535)
            answer = {"echo": data.decode(), "peer": peer[0], "proto": "udp"}
            udp.sendto(json.dumps(answer).encode(), peer)
            continue
        conn, peer = tcp.accept()
        with conn:
            conn.settimeout(3)
            try:
                data = conn.recv(65535)
                answer = {"echo": data.decode(), "peer": peer[0], "proto": "tcp"}
                conn.sendall(json.dumps(answer).encode())
            except OSError:
                pass
"""

# One request/answer: prints JSON {"reply", "from", "src"} or {"error"}.
CLIENT = r"""
import json, socket, sys
proto, addr, port, payload, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
try:
    if proto == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        sock.sendto(payload.encode(), (addr, port))
        data, peer = sock.recvfrom(65535)
    else:
        sock = socket.create_connection((addr, port), timeout=timeout)
        sock.settimeout(timeout)
        sock.sendall(payload.encode())
        data, peer = sock.recv(65535), sock.getpeername()
    print(json.dumps({"reply": json.loads(data), "from": peer[0], "src": sock.getsockname()[0]}))
except OSError as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return (["ip", "netns", "exec", netns] if netns else []) + argv


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def echo_server(addr: str, netns: str | None = None, lifetime: float = 120.0) -> Iterator[int]:
    """Run SERVER bound to `addr` (in `netns`, or on the host); yields its port; killed afterwards."""
    proc = subprocess.Popen(
        _in_netns(netns, [PYTHON, "-c", SERVER, addr, "0", str(lifetime)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 5.0)
        line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line.startswith("ready "):
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"echo server on {addr} in {netns or 'host'} did not start: {err}")
        yield int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def ask(
    netns: str | None,
    proto: str,
    addr: str,
    port: int,
    payload: str,
    timeout: float = SOCKET_TIMEOUT,
) -> dict[str, Any]:
    """One request from inside `netns` (None: the host); the CLIENT's JSON answer."""
    assert timeout <= 5.0
    proc = subprocess.run(
        _in_netns(netns, [PYTHON, "-c", CLIENT, proto, addr, str(port), payload, str(timeout)]),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def round_trip(netns: str | None, proto: str, addr: str, port: int, want_peer: str) -> None:
    """A request from `netns` to addr:port is answered, and the server saw it from `want_peer`."""
    payload = f"{proto}-{uuid.uuid4().hex[:8]}"
    answer = ask(netns, proto, addr, port, payload)
    assert "error" not in answer, f"{proto} {netns or 'host'} -> {addr}:{port}: {answer}"
    assert answer["reply"] == {"echo": payload, "peer": want_peer, "proto": proto}, answer
    assert answer["from"] == addr, answer


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("mtr"), "mtr", "10.245.0.0/16", "mtrbr0")
    try:
        yield d
    finally:
        d.cleanup_host()


@dataclass
class Pod:
    netns: str
    path: str
    cid: str
    ip: str  # no prefix
    gateway: str
    host_veth: str


@pytest.fixture
def pods(mtr: Daemon, netns: Callable[[], tuple[str, str]]) -> Iterator[Callable[..., Pod]]:
    """Factory: add_pod(runtime=ExecRuntime()) ADDs a moor pod in a fresh netns; DELs it afterwards."""
    made: list[tuple[Runtime, str, str]] = []
    conf = plugin_config(NETWORK, "1.0.0", mtr.plugin())

    def add_pod(runtime: Runtime | None = None) -> Pod:
        rt = runtime or ExecRuntime()
        name, path = netns()
        cid = f"mtr-{uuid.uuid4().hex[:16]}"
        added = rt.add(conf, path, cid)
        assert added.rc == 0, f"ADD failed: {added}"
        made.append((rt, path, cid))
        result = added.out
        address = ip_interface(result["ips"][0]["address"])
        host = [
            i["name"]
            for i in result["interfaces"]
            if not i.get("sandbox") and i["name"] != mtr.bridge
        ]
        assert len(host) == 1, result
        assert str(address) in oracle.addresses("eth0", netns=name)
        return Pod(name, path, cid, str(address.ip), result["ips"][0]["gateway"], host[0])

    yield add_pod
    for rt, path, cid in made:
        rt.delete(conf, path, cid)


@pytest.fixture(scope="module")
def outside(mtr: Daemon) -> Iterator[tuple[str, str, str]]:
    """An "outside" netns with no route back to the pods; yields (netns, host address, its address)."""
    in_use = [ip_network(n) for n in oracle.ipv4_networks_in_use()]
    free = [c for c in OUTSIDE_CANDIDATES if not any(ip_network(c).overlaps(n) for n in in_use)]
    require(bool(free), f"all of {OUTSIDE_CANDIDATES} are in use on this machine")
    net = ip_network(free[0])
    host_ip, outside_ip = str(net[1]), str(net[2])
    name = f"mtr-out-{os.getpid()}"
    _ip("link", "del", OUTSIDE_LINK, check=False)
    _ip("netns", "del", name, check=False)
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", OUTSIDE_LINK, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("addr", "add", f"{host_ip}/{net.prefixlen}", "dev", OUTSIDE_LINK)
        _ip("link", "set", OUTSIDE_LINK, "up")
        _ip("-n", name, "addr", "add", f"{outside_ip}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        # Only the connected route: a reply to a pod can only come back through the host's NAT.
        assert [r["dst"] for r in oracle.routes(netns=name)] == [str(net)]
        yield name, host_ip, outside_ip
    finally:
        _ip("netns", "del", name, check=False)
        _ip("link", "del", OUTSIDE_LINK, check=False)


# ---- tests ---------------------------------------------------------------------------------------


def test_pods_reach_each_other_and_the_host(pods: Callable[..., Pod], runtime: Runtime) -> None:
    a, b = pods(runtime), pods(runtime)
    assert a.ip != b.ip and a.gateway == b.gateway
    with echo_server("0.0.0.0", a.netns) as port_a, echo_server("0.0.0.0", b.netns) as port_b:
        for proto in ("udp", "tcp"):
            # Pod to pod is bridged and never masqueraded: each side sees the other's own IP.
            round_trip(a.netns, proto, b.ip, port_b, want_peer=a.ip)
            round_trip(b.netns, proto, a.ip, port_a, want_peer=b.ip)
    with echo_server(a.gateway) as port_host:  # on the host, bound to the bridge's gateway IP
        for proto in ("udp", "tcp"):
            round_trip(a.netns, proto, a.gateway, port_host, want_peer=a.ip)
            round_trip(b.netns, proto, a.gateway, port_host, want_peer=b.ip)
    # and the host reaches a pod through the bridge, from its gateway address
    with echo_server("0.0.0.0", a.netns) as port_a:
        round_trip(None, "udp", a.ip, port_a, want_peer=a.gateway)


def test_egress_is_masqueraded_and_replies_come_back(
    mtr: Daemon, pods: Callable[..., Pod], outside: tuple[str, str, str]
) -> None:
    out_ns, host_ip, outside_ip = outside
    a, b = pods(), pods()
    with echo_server(outside_ip, out_ns) as port:
        for pod in (a, b):
            for proto in ("udp", "tcp"):
                # Seen from outside as the host's address; the answer (to the host's address, the
                # outside netns has no route to the pods) is un-NATed back to the pod.
                round_trip(pod.netns, proto, outside_ip, port, want_peer=host_ip)

    # One rule set for the node, not one per pod: after two pods, three rules and one jump.
    chain = mtr.masq_chain
    net = mtr.network
    lines = oracle.nat_chain(chain)
    assert lines is not None, f"nat chain {chain} is missing"
    assert lines[0] == f"-N {chain}"
    rules = lines[1:]
    assert len(rules) == 3, lines
    assert rules[0].startswith(f"-A {chain} -s {net} -d {net} ") and rules[0].endswith("-j RETURN")
    assert rules[1].startswith(f"-A {chain} -s {net} -d 224.0.0.0/4 ") and rules[1].endswith(
        "-j RETURN"
    )
    assert rules[2].startswith(f"-A {chain} -s {net} ") and rules[2].endswith("-j MASQUERADE")
    jumps = [line for line in oracle.nat_rules() if line.endswith(f"-j {chain}")]
    assert len(jumps) == 1 and jumps[0].startswith("-A POSTROUTING "), jumps


def test_after_del_the_pod_ip_is_silent_and_the_host_veth_gone(
    mtr: Daemon, pods: Callable[..., Pod]
) -> None:
    a, b = pods(), pods()
    conf = plugin_config(NETWORK, "1.0.0", mtr.plugin())
    with echo_server("0.0.0.0", a.netns) as port_a:  # keeps listening in a's netns throughout
        round_trip(b.netns, "udp", a.ip, port_a, want_peer=b.ip)
        assert oracle.link(a.host_veth) is not None

        deleted = ExecRuntime().delete(conf, a.path, a.cid)
        assert deleted.rc == 0, deleted

        assert oracle.gone(a.host_veth)
        assert oracle.gone("eth0", netns=a.netns)
        assert not [x for x in mtr.status()["allocations"] if x["containerID"] == a.cid]
        for proto in ("udp", "tcp"):
            answer = ask(b.netns, proto, a.ip, port_a, "anyone?", timeout=SILENCE_TIMEOUT)
            assert "error" in answer, f"{a.ip} still answers {proto} after DEL: {answer}"
        # b is unaffected
        with echo_server("0.0.0.0", b.netns) as port_b:
            round_trip(None, "udp", b.ip, port_b, want_peer=b.gateway)
