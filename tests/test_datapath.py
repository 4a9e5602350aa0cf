"""Datapath against the real kernel: network namespaces, veths, bridges, iptables.

Everything asserted goes through tests/helpers/oracle.py (iproute2/iptables output), never through
the datapath's own readers, except where the readers themselves are under test.

Names: netns "mdp-*", bridges "mdpbr*", subnets in 10.251.0.0/16, chains "MDP-*"; host veth names
are host_veth_name() of random ids. Every fixture cleans up in its finalizer.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from cni_plugin.datapath import bridge, inventory, masq, netns, nl, veth
from cni_plugin.datapath.errors import (
    AddressExists,
    DatapathError,
    InvalidSetting,
    LinkExists,
    LinkNotFound,
    NetnsError,
    PodInterfaceExists,
)
from cni_plugin.datapath.veth import Route
from tests.helpers import oracle

pytestmark = pytest.mark.netns


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


# -- fixtures ------------------------------------------------------------------------------------


class Netns:
    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd


@pytest.fixture
def make_netns() -> Iterator[Callable[[], Netns]]:
    """Factory for fresh named netns (mdp-*); closes fds and deletes them afterwards."""
    made: list[Netns] = []

    def make() -> Netns:
        name = f"mdp-{secrets.token_hex(4)}"
        ip("netns", "add", name)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        ns = Netns(name, fd)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        os.close(ns.fd)
        ip("netns", "del", ns.name, check=False)


@pytest.fixture
def host_links() -> Iterator[list[str]]:
    """Names of host-netns links to delete at teardown (before the netns go)."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        ip("link", "del", name, check=False)


@pytest.fixture
def br_name(host_links: list[str]) -> str:
    name = f"mdpbr{secrets.token_hex(3)}"
    host_links.append(name)
    return name


@pytest.fixture
def subnet_base() -> int:
    """A random /24 index inside 10.251.0.0/16, so parallel runs rarely share a subnet."""
    return secrets.randbelow(200) + 20


def new_veth_name(host_links: list[str]) -> str:
    name = veth.host_veth_name(f"mdp-test-{secrets.token_hex(8)}", "eth0")
    host_links.append(name)
    return name


def add_plain_link(name: str, netns_name: str | None = None) -> str:
    """Create a non-bridge, non-veth link; dummy where the kernel has it, else ifb. Returns kind."""
    prefix = ["-n", netns_name] if netns_name else []
    for kind in ("dummy", "ifb"):
        if ip(*prefix, "link", "add", name, "type", kind, check=False).returncode == 0:
            return kind
    raise AssertionError("kernel has neither dummy nor ifb links")


def iface_flags(link: dict) -> list[str]:
    return link.get("flags", [])


# -- netns helper --------------------------------------------------------------------------------


def child_pids() -> set[str]:
    return {
        c
        for task in os.listdir("/proc/self/task")
        for c in open(f"/proc/self/task/{task}/children").read().split()
    }


def test_helper_thread_never_forks_and_leaks_no_fds(make_netns: Callable[[], Netns]) -> None:
    ns = make_netns()
    children_before = child_pids() if os.path.exists("/proc/thread-self/children") else set()
    forks: list[int] = []
    armed = threading.Event()
    armed.set()
    os.register_at_fork(before=lambda: forks.append(1) if armed.is_set() else None)
    try:
        pid, tid, ino = netns.run_in_netns(
            ns.fd,
            lambda: (
                os.getpid(),
                threading.get_native_id(),
                os.stat("/proc/thread-self/ns/net").st_ino,
            ),
        )
        assert pid == os.getpid()
        assert tid != threading.get_native_id()
        assert ino == netns.netns_inode(ns.fd) != os.stat("/proc/thread-self/ns/net").st_ino
        # The helper went back home.
        home = os.stat("/proc/thread-self/ns/net").st_ino
        assert os.stat(f"/proc/self/task/{tid}/ns/net").st_ino == home

        before = len(os.listdir("/proc/self/fd"))
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(200):
                    s = netns.open_netlink_socket(ns.fd)
                    s.close()
                for _ in range(10):
                    with nl.pod_ipr(ns.fd) as p:
                        assert [m.get("IFLA_IFNAME") for m in p.link("dump")] == ["lo"]
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(os.listdir("/proc/self/fd")) == before
        assert os.stat(f"/proc/self/task/{tid}/ns/net").st_ino == home
    finally:
        armed.clear()
    assert forks == []
    if os.path.exists("/proc/thread-self/children"):  # CONFIG_PROC_CHILDREN
        assert child_pids() == children_before  # (a session etcd may already be a child)


ABORT_PROBE = r"""
import ctypes, os, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
from cni_plugin.datapath import netns
helper = netns._get_helper()
real = netns._setns
def failing_setns(fd, nstype):
    if fd == helper._home_fd:  # the switch back home fails
        ctypes.set_errno(1)
        return -1
    return real(fd, nstype)
netns._setns = failing_setns
fd = os.open(sys.argv[1], os.O_RDONLY)
netns.run_in_netns(fd, lambda: None)
print("still running in the wrong netns")
"""


def test_failed_switch_back_aborts_the_process(make_netns: Callable[[], Netns]) -> None:
    ns = make_netns()
    proc = subprocess.run(
        [sys.executable, "-c", ABORT_PROBE, f"/run/netns/{ns.name}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "FATAL" in proc.stderr and "still running" not in proc.stdout


def test_netns_errors_and_exception_propagation(make_netns: Callable[[], Netns]) -> None:
    ns = make_netns()
    closed = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    os.close(closed)
    with pytest.raises(NetnsError):
        netns.open_netlink_socket(closed)
    with pytest.raises(NetnsError):
        netns.netns_inode(closed)
    mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    regular = os.open("/etc/hostname", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in (mnt, regular):
            with pytest.raises(NetnsError):
                netns.open_netlink_socket(fd)
            with pytest.raises(NetnsError):
                netns.netns_inode(fd)
    finally:
        os.close(mnt)
        os.close(regular)

    def boom() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError):
        netns.run_in_netns(ns.fd, boom)
    # Still healthy and back home after the failure.
    home = os.stat("/proc/thread-self/ns/net").st_ino
    tid = netns.run_in_netns(ns.fd, threading.get_native_id)
    assert os.stat(f"/proc/self/task/{tid}/ns/net").st_ino == home


# -- bridge --------------------------------------------------------------------------------------


def test_ensure_bridge_create_reuse_and_clash(br_name: str, host_links: list[str]) -> None:
    info = bridge.ensure_bridge(br_name, mtu=1400)
    link = oracle.link(br_name)
    assert link is not None
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in iface_flags(link)
    assert link["mtu"] == 1400
    assert (info.index, info.name, info.mac) == (link["ifindex"], br_name, link["address"])
    assert oracle.sysctl(f"net/ipv6/conf/{br_name}/accept_ra") == "0"

    # Reuse: same ifindex, and a downed bridge comes back up.
    ip("link", "set", br_name, "down")
    again = bridge.ensure_bridge(br_name, mtu=1400)
    assert again == info
    assert "UP" in iface_flags(oracle.link(br_name) or {})
    assert bridge.ensure_bridge(br_name, mtu=1300, promisc=True) == info
    link = oracle.link(br_name) or {}
    assert "PROMISC" in iface_flags(link) and link["mtu"] == 1300

    # An existing non-bridge link of that name is never adopted.
    other = f"mdpbr{secrets.token_hex(3)}"
    host_links.append(other)
    kind = add_plain_link(other)
    with pytest.raises(DatapathError, match=f"{other!r} already exists but is not a bridge"):
        bridge.ensure_bridge(other)
    assert oracle.link(other)["linkinfo"]["info_kind"] == kind


def test_ensure_bridge_addresses_coexist(br_name: str, subnet_base: int) -> None:
    bridge.ensure_bridge(br_name)
    gw1 = IPv4Interface(f"10.251.{subnet_base}.1/24")
    gw2 = IPv4Interface(f"10.251.{subnet_base + 1}.1/25")
    assert bridge.ensure_bridge_address(br_name, gw1) is True
    assert bridge.ensure_bridge_address(br_name, gw2) is True
    assert bridge.ensure_bridge_address(br_name, gw1) is False
    assert sorted(oracle.addresses(br_name)) == sorted([str(gw1), str(gw2)])
    with pytest.raises(AddressExists):
        bridge.ensure_bridge_address(br_name, IPv4Interface(f"10.251.{subnet_base}.1/16"))
    assert bridge.remove_bridge_address(br_name, gw2) is True
    assert bridge.remove_bridge_address(br_name, gw2) is False
    assert oracle.addresses(br_name) == [str(gw1)]


# -- veth ----------------------------------------------------------------------------------------


def test_host_veth_name() -> None:
    name = veth.host_veth_name("abc", "eth0")
    assert len(name) == 15 and name.startswith("veth")
    assert name == veth.host_veth_name("abc", "eth0") != veth.host_veth_name("abc", "eth1")


def test_create_veth(br_name: str, host_links: list[str], make_netns: Callable[[], Netns]) -> None:
    br = bridge.ensure_bridge(br_name)
    ns = make_netns()
    host_name = new_veth_name(host_links)
    pair = veth.create_veth(host_name, "eth0", ns.fd, br.index, mtu=1400, mac="0A:58:0a:fb:00:05")
    host = oracle.link(host_name)
    pod = oracle.link("eth0", netns=ns.name)
    assert host is not None and pod is not None
    assert host["linkinfo"]["info_kind"] == "veth"
    assert host["master"] == br_name
    assert "UP" in iface_flags(host)
    assert host["mtu"] == 1400
    assert pod["linkinfo"]["info_kind"] == "veth"
    assert pod["address"] == "0a:58:0a:fb:00:05"
    assert pod["mtu"] == 1400
    assert pod["link_index"] == host["ifindex"] and host["link_index"] == pod["ifindex"]
    assert pair.host == veth.VethEnd(host_name, host["address"])
    assert pair.pod == veth.VethEnd("eth0", "0a:58:0a:fb:00:05")
    assert host["linkinfo"]["info_slave_data"]["hairpin"] is False

    ns2 = make_netns()
    hp_name = new_veth_name(host_links)
    pair2 = veth.create_veth(hp_name, "net1", ns2.fd, br.index, hairpin=True)
    hp = oracle.link(hp_name)
    assert hp["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert oracle.link("net1", netns=ns2.name)["address"] == pair2.pod.mac


def test_create_veth_clashes_leave_nothing_behind(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns]
) -> None:
    br = bridge.ensure_bridge(br_name)
    ns = make_netns()
    kind = add_plain_link("eth0", ns.name)
    host_name = new_veth_name(host_links)
    with pytest.raises(PodInterfaceExists):
        veth.create_veth(host_name, "eth0", ns.fd, br.index)
    assert oracle.link(host_name) is None
    pod_links = sorted(x["ifname"] for x in oracle.ip_json("link", "show", netns=ns.name))
    assert pod_links == ["eth0", "lo"]
    assert oracle.link("eth0", netns=ns.name)["linkinfo"]["info_kind"] == kind

    # The host name taken (by anything) is LinkExists, not PodInterfaceExists.
    add_plain_link(host_name)
    with pytest.raises(LinkExists):
        veth.create_veth(host_name, "eth1", ns.fd, br.index)
    assert oracle.link("eth1", netns=ns.name) is None

    with pytest.raises(NetnsError):
        veth.create_veth(new_veth_name(host_links), "eth2", 987654, br.index)
    regular = os.open("/etc/hostname", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(NetnsError):
            veth.create_veth(new_veth_name(host_links), "eth2", regular, br.index)
    finally:
        os.close(regular)
    with pytest.raises(LinkNotFound, match="does not exist"):
        veth.create_veth(new_veth_name(host_links), "eth2", ns.fd, 2**31 - 1)
    with pytest.raises(DatapathError, match="is not a bridge"):
        veth.create_veth(new_veth_name(host_links), "eth2", ns.fd, 1)  # lo
    assert oracle.link("eth2", netns=ns.name) is None


@pytest.fixture
def mfz_netns() -> Iterator[Netns]:
    """One netns named mfz-dp-* (issue 12's tests use the mfz names), deleted afterwards."""
    name = f"mfz-dp-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    yield Netns(name, fd)
    os.close(fd)
    ip("netns", "del", name, check=False)


def test_kernel_refusing_a_requested_setting_is_invalid_setting(
    host_links: list[str], mfz_netns: Netns
) -> None:
    """The MTU, MAC and routes come from the request: the kernel refusing one is InvalidSetting
    (CNI 7), not a datapath failure, and nothing is left behind."""
    host_links.append("mfzbr2")
    br = bridge.ensure_bridge("mfzbr2")
    ns = mfz_netns
    for kw in ({"mac": "01:00:5e:00:00:01"}, {"mac": "00:00:00:00:00:00"}, {"mtu": 70000}):
        host_name = new_veth_name(host_links)
        with pytest.raises(InvalidSetting):
            veth.create_veth(host_name, "eth0", ns.fd, br.index, **kw)  # type: ignore[arg-type]
        assert oracle.link(host_name) is None and oracle.link("eth0", netns=ns.name) is None

    veth.create_veth(new_veth_name(host_links), "eth0", ns.fd, br.index)
    via_nowhere = [Route(ip_network("192.168.0.0/16"), ip_address("192.168.99.1"))]
    with pytest.raises(InvalidSetting, match="192.168.99.1"):
        veth.configure_pod_interface(ns.fd, "eth0", [ip_interface("10.226.250.2/24")], via_nowhere)
    assert not [r for r in oracle.routes(netns=ns.name) if r["dst"] == "192.168.0.0/16"]


def _pod(
    br_index: int,
    host_links: list[str],
    make_netns: Callable[[], Netns],
    addr: str,
    gw: str,
) -> tuple[Netns, veth.VethPair]:
    ns = make_netns()
    pair = veth.create_veth(new_veth_name(host_links), "eth0", ns.fd, br_index)
    veth.configure_pod_interface(
        ns.fd,
        "eth0",
        [ip_interface(addr)],
        [Route(ip_network("0.0.0.0/0"), ip_address(gw))],
    )
    return ns, pair


def test_configure_pod_interface(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns], subnet_base: int
) -> None:
    br = bridge.ensure_bridge(br_name)
    ns = make_netns()
    veth.create_veth(new_veth_name(host_links), "eth0", ns.fd, br.index)
    net = f"10.251.{subnet_base}"
    addrs = [ip_interface(f"{net}.7/24")]
    routes = [
        Route(ip_network(f"10.251.{subnet_base + 1}.0/24")),  # link-scope
        Route(ip_network("0.0.0.0/0"), ip_address(f"{net}.1")),
    ]
    for _ in range(2):  # a retried ADD converges instead of failing
        veth.configure_pod_interface(ns.fd, "eth0", addrs, routes)
    assert oracle.addresses("eth0", netns=ns.name) == [f"{net}.7/24"]
    assert "UP" in iface_flags(oracle.link("eth0", netns=ns.name))
    assert "UP" in iface_flags(oracle.link("lo", netns=ns.name))
    rts = {r["dst"]: r for r in oracle.routes(netns=ns.name)}
    assert rts["default"]["gateway"] == f"{net}.1" and rts["default"]["dev"] == "eth0"
    assert rts[f"10.251.{subnet_base + 1}.0/24"]["scope"] == "link"
    assert "gateway" not in rts[f"10.251.{subnet_base + 1}.0/24"]
    assert f"{net}.0/24" in rts  # the kernel's connected route

    v6 = make_netns()
    veth.create_veth(new_veth_name(host_links), "eth0", v6.fd, br.index)
    veth.configure_pod_interface(
        v6.fd,
        "eth0",
        [ip_interface("fd00:251::7/64")],
        [Route(ip_network("::/0"), ip_address("fd00:251::1"))],
    )
    assert "fd00:251::7/64" in oracle.addresses("eth0", netns=v6.name, family="inet6")
    assert any(
        r["dst"] == "default" and r.get("gateway") == "fd00:251::1"
        for r in oracle.routes6(netns=v6.name)
    )

    with pytest.raises(DatapathError):
        veth.configure_pod_interface(ns.fd, "nope0", addrs, routes)


UDP_TOOL = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "serve":  # print the source of the first datagram, then echo it back
    s.bind((host, port))
    s.settimeout(10)
    print("ready", flush=True)
    data, peer = s.recvfrom(2048)
    print(peer[0], flush=True)
    try:
        s.sendto(data, peer)
    except OSError:
        pass
else:  # "send": until echoed or 5 s passed; print the replying address
    s.settimeout(0.1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        s.sendto(b"moor", (host, port))
        try:
            data, peer = s.recvfrom(2048)
        except socket.timeout:
            continue
        print(peer[0], flush=True)
        sys.exit(0)
    sys.exit(1)
"""


class UdpServer:
    """A UDP echo server inside a netns (`ip netns exec`), reporting the source it saw."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", UDP_TOOL, "serve", addr, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def seen(self) -> str:
        out, err = self.proc.communicate(timeout=15)
        assert self.proc.returncode == 0, err
        return out.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def udp_send(ns: str, addr: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", UDP_TOOL, "send", addr, str(port)],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_pods_reach_each_other_and_gateway(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns], subnet_base: int
) -> None:
    br = bridge.ensure_bridge(br_name)
    net = f"10.251.{subnet_base}"
    bridge.ensure_bridge_address(br_name, IPv4Interface(f"{net}.1/24"))
    a, _ = _pod(br.index, host_links, make_netns, f"{net}.2/24", f"{net}.1")
    b, _ = _pod(br.index, host_links, make_netns, f"{net}.3/24", f"{net}.1")

    server = UdpServer(b.name, f"{net}.3", 40001)
    try:
        sent = udp_send(a.name, f"{net}.3", 40001)
        assert sent.returncode == 0 and sent.stdout.strip() == f"{net}.3", sent.stderr
        assert server.seen() == f"{net}.2"
    finally:
        server.close()

    # The gateway on the bridge (host netns): a socket in this process bound to it.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gw_sock:
        gw_sock.bind((f"{net}.1", 0))
        gw_sock.settimeout(10)
        port = gw_sock.getsockname()[1]
        result: dict[str, str] = {}

        def serve() -> None:
            data, peer = gw_sock.recvfrom(2048)
            result["peer"] = peer[0]
            gw_sock.sendto(data, peer)

        t = threading.Thread(target=serve)
        t.start()
        sent = udp_send(b.name, f"{net}.1", port)
        t.join(timeout=15)
        assert sent.returncode == 0 and sent.stdout.strip() == f"{net}.1", sent.stderr
        assert result["peer"] == f"{net}.3"


def test_delete_functions_are_idempotent(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns]
) -> None:
    br = bridge.ensure_bridge(br_name)
    ns = make_netns()
    name = new_veth_name(host_links)
    veth.create_veth(name, "eth0", ns.fd, br.index)
    assert veth.delete_host_veth_if_exists(name) is True
    assert oracle.link(name) is None and oracle.link("eth0", netns=ns.name) is None
    assert veth.delete_host_veth_if_exists(name) is False

    # The pod end deleted from inside the pod (the runtime removing the netns) takes ours too.
    veth.create_veth(name, "eth0", ns.fd, br.index)
    subprocess.run(["ip", "-n", ns.name, "link", "del", "eth0"], check=True)
    assert oracle.link(name) is None
    assert veth.delete_host_veth_if_exists(name) is False

    # A non-veth link that happens to carry the name is refused, not deleted.
    add_plain_link(name)
    with pytest.raises(DatapathError, match="not a veth"):
        veth.delete_host_veth_if_exists(name)
    assert oracle.link(name) is not None


def test_inspect(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns], subnet_base: int
) -> None:
    br = bridge.ensure_bridge(br_name)
    net = f"10.251.{subnet_base}"
    ns, pair = _pod(br.index, host_links, make_netns, f"{net}.9/24", f"{net}.1")
    host_name = pair.host.name

    hs = inventory.inspect_host_veth(host_name)
    h = oracle.link(host_name)
    assert hs is not None
    assert (hs.index, hs.mac, hs.mtu, hs.kind) == (h["ifindex"], h["address"], h["mtu"], "veth")
    assert hs.master_index == br.index and hs.up is True and hs.hairpin is False
    assert hs.peer_index == oracle.link("eth0", netns=ns.name)["ifindex"]

    ps = inventory.inspect_pod_interface(ns.fd, "eth0")
    p = oracle.link("eth0", netns=ns.name)
    assert ps is not None
    assert (ps.index, ps.mac, ps.mtu, ps.kind, ps.up) == (
        p["ifindex"],
        p["address"],
        p["mtu"],
        "veth",
        True,
    )
    assert ps.operstate == p["operstate"]
    assert ps.peer_index == hs.index
    assert ip_interface(f"{net}.9/24") in ps.addresses
    assert Route(ip_network("0.0.0.0/0"), ip_address(f"{net}.1")) in ps.routes
    assert Route(ip_network(f"{net}.0/24"), None) in ps.routes
    assert all(r.dst.version in (4, 6) for r in ps.routes)

    assert inventory.inspect_pod_interface(ns.fd, "nope0") is None
    assert inventory.inspect_host_veth(veth.host_veth_name("absent", "eth0")) is None


def test_concurrent_pods_from_worker_threads(
    br_name: str, host_links: list[str], make_netns: Callable[[], Netns], subnet_base: int
) -> None:
    """8 worker threads (each with its thread-local host IPRoute) building pods at once."""
    br = bridge.ensure_bridge(br_name)
    net = f"10.251.{subnet_base}"
    spaces = [make_netns() for _ in range(16)]
    names = [new_veth_name(host_links) for _ in spaces]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in (i, i + 8):
                veth.create_veth(names[j], "eth0", spaces[j].fd, br.index)
                veth.configure_pod_interface(
                    spaces[j].fd, "eth0", [ip_interface(f"{net}.{10 + j}/24")], []
                )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, ns in enumerate(spaces):
        assert oracle.link(names[j])["master"] == br_name
        assert oracle.addresses("eth0", netns=ns.name) == [f"{net}.{10 + j}/24"]


def test_pod_datapath_latency(
    br_name: str,
    host_links: list[str],
    make_netns: Callable[[], Netns],
    subnet_base: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    br = bridge.ensure_bridge(br_name)
    net = f"10.251.{subnet_base}"
    spaces = [make_netns() for _ in range(30)]
    names = [new_veth_name(host_links) for _ in spaces]
    add_ms: list[float] = []
    del_ms: list[float] = []
    for i, ns in enumerate(spaces):
        t0 = time.perf_counter()
        veth.create_veth(names[i], "eth0", ns.fd, br.index, mtu=1450)
        veth.configure_pod_interface(
            ns.fd,
            "eth0",
            [ip_interface(f"{net}.{10 + i}/24")],
            [Route(ip_network("0.0.0.0/0"), ip_address(f"{net}.1"))],
        )
        add_ms.append((time.perf_counter() - t0) * 1000)
    for name in names:
        t0 = time.perf_counter()
        assert veth.delete_host_veth_if_exists(name) is True
        del_ms.append((time.perf_counter() - t0) * 1000)
    add_p50, del_p50 = statistics.median(add_ms), statistics.median(del_ms)
    with capsys.disabled():
        print(
            f"\n[datapath] pod ADD (create_veth+configure_pod_interface) p50={add_p50:.2f} ms "
            f"max={max(add_ms):.2f} ms; delete_host_veth_if_exists p50={del_p50:.2f} ms "
            f"max={max(del_ms):.2f} ms (n=30)"
        )
    assert add_p50 < 100 and del_p50 < 500


# -- masquerade ----------------------------------------------------------------------------------


@pytest.fixture
def chain() -> Iterator[str]:
    name = f"MDP-{secrets.token_hex(4).upper()}"
    yield name
    masq.MasqueradeRules(name).remove()


def test_masquerade_rules_idempotent_and_removable(chain: str) -> None:
    rules = masq.MasqueradeRules(chain)
    nets = [ip_network("10.251.0.0/16")]
    assert rules.is_installed(nets) is False
    assert rules.ensure(nets) is True
    assert rules.ensure(nets) is False
    assert rules.is_installed(nets) is True
    lines = oracle.nat_rules()
    assert lines.count(f"-N {chain}") == 1
    jumps = [x for x in lines if x.startswith("-A POSTROUTING") and x.endswith(f"-j {chain}")]
    assert len(jumps) == 1
    mine = [x for x in lines if x.startswith(f"-A {chain} ")]
    assert len(mine) == 3
    assert "-s 10.251.0.0/16 -d 10.251.0.0/16" in mine[0] and mine[0].endswith("-j RETURN")
    assert "-s 10.251.0.0/16 -d 224.0.0.0/4" in mine[1] and mine[1].endswith("-j RETURN")
    assert mine[2].endswith("-j MASQUERADE") and all('--comment "moor: ' in x for x in mine)

    # Drift is detected and repaired: a lost rule, a duplicated jump, a changed network set.
    subprocess.run(["iptables", "-w", "-t", "nat", "-D", chain, "1"], check=True)
    subprocess.run(["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-j", chain], check=True)
    assert rules.is_installed(nets) is False
    assert rules.ensure(nets) is True and rules.is_installed(nets) is True
    lines = oracle.nat_rules()
    assert len([x for x in lines if x.startswith("-A POSTROUTING") and x.endswith(chain)]) == 1
    two = [ip_network("10.251.0.0/17"), ip_network("10.251.128.0/17")]
    assert rules.ensure(two) is True and rules.is_installed(two) is True
    assert rules.is_installed(nets) is False
    assert len([x for x in oracle.nat_rules() if x.startswith(f"-A {chain} ")]) == 8

    rules.remove()
    assert not [x for x in oracle.nat_rules() if chain in x]
    rules.remove()  # tolerant of absence


def _node_link(node: Netns, *args: str) -> None:
    ip("-n", node.name, *args)


def test_masquerade_traffic(make_netns: Callable[[], Netns], chain: str) -> None:
    """Pod -> outside leaves with the node's address; pod -> pod keeps its own.

    The "node" is a netns of ours (so ip_forward and the nat table of the real host stay
    untouched); MasqueradeRules runs inside it through run_in_netns.
    """
    node, outside = make_netns(), make_netns()
    pod_a, pod_b = make_netns(), make_netns()
    br = f"mdpbr{secrets.token_hex(3)}"
    _node_link(node, "link", "add", br, "type", "bridge")
    _node_link(node, "addr", "add", "10.251.60.1/24", "dev", br)
    _node_link(node, "addr", "add", "10.251.61.1/24", "dev", br)
    _node_link(node, "link", "set", br, "up")
    for pod, addr, gw in (
        (pod_a, "10.251.60.2/24", "10.251.60.1"),
        (pod_b, "10.251.61.2/24", "10.251.61.1"),
    ):
        host_end = veth.host_veth_name(pod.name, "eth0")
        _node_link(
            node, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod.name
        )
        _node_link(node, "link", "set", host_end, "master", br, "up")
        veth.configure_pod_interface(
            pod.fd, "eth0", [ip_interface(addr)], [Route(ip_network("0.0.0.0/0"), ip_address(gw))]
        )
    out_end = veth.host_veth_name(outside.name, "eth0")
    _node_link(
        node, "link", "add", out_end, "type", "veth", "peer", "name", "eth0", "netns", outside.name
    )
    _node_link(node, "addr", "add", "192.0.2.1/24", "dev", out_end)
    _node_link(node, "link", "set", out_end, "up")
    veth.configure_pod_interface(outside.fd, "eth0", [ip_interface("192.0.2.2/24")], [])
    netns.run_in_netns(node.fd, bridge.enable_ip_forward)
    assert oracle.sysctl("net/ipv4/ip_forward", netns=node.name) == "1"

    def from_a(to_ns: Netns, to_addr: str, port: int) -> tuple[str, int]:
        server = UdpServer(to_ns.name, to_addr, port)
        try:
            sent = udp_send(pod_a.name, to_addr, port)
            return server.seen(), sent.returncode
        finally:
            server.close()

    # Without the rules the outside sees the pod address (and cannot answer: no route back).
    assert from_a(outside, "192.0.2.2", 40100)[0] == "10.251.60.2"

    rules = masq.MasqueradeRules(chain)
    nets = [ip_network("10.251.0.0/16")]
    assert netns.run_in_netns(node.fd, lambda: rules.ensure(nets)) is True
    assert netns.run_in_netns(node.fd, lambda: rules.ensure(nets)) is False
    seen, rc = from_a(outside, "192.0.2.2", 40101)
    assert seen == "192.0.2.1" and rc == 0  # masqueraded, and the reply is un-NATed back
    # Between two pod subnets (routed by the node) the source is kept.
    assert from_a(pod_b, "10.251.61.2", 40102) == ("10.251.60.2", 0)

    netns.run_in_netns(node.fd, rules.remove)
    assert not [x for x in oracle.nat_rules(netns=node.name) if chain in x]
    assert from_a(outside, "192.0.2.2", 40103)[0] == "10.251.60.2"


def test_masquerade_ipv6_in_netns(make_netns: Callable[[], Netns], chain: str) -> None:
    node = make_netns()
    rules = masq.MasqueradeRules(chain)
    nets = [ip_network("10.251.0.0/16"), ip_network("fd00:251::/48")]
    assert netns.run_in_netns(node.fd, lambda: rules.ensure(nets)) is True
    assert netns.run_in_netns(node.fd, lambda: rules.is_installed(nets)) is True
    v6 = [x for x in oracle.nat_rules(netns=node.name, ipv6=True) if x.startswith(f"-A {chain} ")]
    assert len(v6) == 3 and "-d ff00::/8" in v6[1]
    netns.run_in_netns(node.fd, rules.remove)
    assert not [x for x in oracle.nat_rules(netns=node.name, ipv6=True) if chain in x]
    assert not [x for x in oracle.nat_rules(netns=node.name) if chain in x]


def test_a_read_only_proc_sys_is_a_datapath_error_not_a_bug(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container with a read-only /proc/sys (no privileged, no unmask) gets code 104 with what
    to do, never 999 (the image test met it). EROFS is injected: pure error mapping."""
    import errno as errno_mod

    from cni_plugin.datapath import bridge as br_mod
    from cni_plugin.datapath.errors import DatapathError
    from cni_plugin.errors import to_cni_error

    knob = tmp_path / "accept_ra"
    knob.write_text("1\n")
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "w" in mode:
            raise OSError(errno_mod.EROFS, "Read-only file system")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(DatapathError, match="writable /proc/sys/net") as err:
        br_mod._write_sysctl(str(knob), "0")
    assert to_cni_error(err.value).code == 104
