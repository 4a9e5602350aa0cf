"""Checklist §8 against the real daemon and kernel, through direct exec and through real libcni.

Debian's libcni (1.1.2) knows CNI versions up to 1.0.0 and has no GC or STATUS, so 1.1.0, GC and
STATUS run by direct exec in the same fixtures; 0.3.0 to 1.0.0 run through both.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.helpers import oracle
from tests.helpers.moor import Daemon, ExecRuntime, LibcniRuntime, plugin_config

pytestmark = pytest.mark.netns
LIBCNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
NetnsFactory = Callable[[], tuple[str, str]]
Runtime = ExecRuntime | LibcniRuntime


def conf(
    daemon: Daemon, version: str = "1.0.0", name: str = "mtenet", **options: Any
) -> dict[str, Any]:
    return plugin_config(name, version, daemon.plugin(**options))


def allocations(daemon: Daemon, container_id: str | None = None) -> list[dict[str, Any]]:
    items = daemon.status()["allocations"]
    return [a for a in items if container_id is None or a["containerID"] == container_id]


def assert_attached(
    daemon: Daemon, ns: str, container_id: str, ifname: str, result: dict[str, Any]
) -> str:
    """The kernel shows what the result claims; returns the pod's CIDR."""
    (ip,) = result["ips"]
    pod = oracle.link(ifname, netns=ns)
    assert pod is not None and "UP" in pod["flags"]
    assert ip["address"] in oracle.addresses(ifname, netns=ns)
    assert {"dst": "default", "gateway": ip["gateway"]}.items() <= next(
        r for r in oracle.routes(netns=ns) if r["dst"] == "default"
    ).items()
    host = oracle.link(host_veth_name(container_id, ifname))
    assert host is not None and host.get("master") == daemon.bridge and "UP" in host["flags"]
    gw = ipaddress.ip_interface(ip["address"]).network
    assert f"{ip['gateway']}/{gw.prefixlen}" in oracle.addresses(daemon.bridge)
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "1"
    return ip["address"]


def assert_detached(daemon: Daemon, ns: str | None, container_id: str, ifname: str) -> None:
    if ns is not None and oracle.netns_exists(ns):
        assert oracle.gone(ifname, netns=ns)
    assert oracle.gone(host_veth_name(container_id, ifname))
    assert allocations(daemon, container_id) == []


# ---- ADD / CHECK / DEL per version, through both runtimes ----------------------------------------


@pytest.mark.parametrize("version", LIBCNI_VERSIONS)
def test_add_check_del(daemon: Daemon, netns: NetnsFactory, runtime: Runtime, version: str) -> None:
    ns, path = netns()
    c = conf(daemon, version)
    cid = f"acd-{runtime.kind}-{version.replace('.', '')}"
    add = runtime.add(
        c,
        path,
        cid,
        cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
    )
    assert add.rc == 0, add
    result = add.out
    assert result["cniVersion"] == version
    assert [i["name"] for i in result["interfaces"]] == [
        daemon.bridge,
        host_veth_name(cid, "eth0"),
        "eth0",
    ]
    assert result["interfaces"][2]["sandbox"] == path
    assert all(len(i["mac"]) == 17 for i in result["interfaces"])
    for ip in result["ips"]:
        assert ip["interface"] == 2
        assert ("version" in ip) == (not version.startswith("1."))
    cidr = assert_attached(daemon, ns, cid, "eth0", result)
    (record,) = allocations(daemon, cid)
    assert record["ip"] == cidr and record["pod"] == "ns1/web-0" and record["podUID"] == "u-1"
    if version >= "0.4.0":
        check = runtime.check(c, path, cid)
        assert check.rc == 0 and check.out == {}, check
    dele = runtime.delete(c, path, cid)
    assert dele.rc == 0, dele
    assert_detached(daemon, ns, cid, "eth0")
    assert runtime.delete(c, path, cid).rc == 0  # DEL twice


def test_add_check_del_110_by_exec(daemon: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    ns, path = netns()
    c = conf(daemon, "1.1.0", mtu=1400)
    add = rt.add(c, path, "v110")
    assert add.rc == 0 and add.out["cniVersion"] == "1.1.0"
    assert all("version" not in ip for ip in add.out["ips"])
    assert oracle.link("eth0", netns=ns)["mtu"] == 1400
    assert oracle.link(host_veth_name("v110", "eth0"))["mtu"] == 1400
    assert rt.check(c, path, "v110").rc == 0
    assert rt.delete(c, path, "v110").rc == 0
    assert_detached(daemon, ns, "v110", "eth0")


def test_unsupported_version_is_code_1(daemon: Daemon, netns: NetnsFactory) -> None:
    _, path = netns()
    out = ExecRuntime().add(conf(daemon, "0.2.0"), path, "v020")
    assert out.rc == 1 and out.code == 1
    assert allocations(daemon, "v020") == []


# ---- ADD edge cases ------------------------------------------------------------------------------


def test_second_add_fails_and_keeps_first(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    ns, path = netns()
    c = conf(daemon)
    first = runtime.add(c, path, "dup1")
    assert first.rc == 0
    again = ExecRuntime().add(
        c, path, "dup1"
    )  # libcni would overwrite its cache; exec keeps it honest
    assert again.rc == 1 and again.code == 101, again
    assert_attached(daemon, ns, "dup1", "eth0", first.out)
    assert [a["ip"] for a in allocations(daemon, "dup1")] == [first.out["ips"][0]["address"]]
    assert runtime.delete(c, path, "dup1").rc == 0


def test_existing_ifname_in_netns_fails_without_leaks(daemon: Daemon, netns: NetnsFactory) -> None:
    ns, path = netns()
    subprocess.run(
        ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0"],
        check=True,
    )
    out = ExecRuntime().add(conf(daemon), path, "exists1")
    assert out.rc == 1 and out.code == 102, out
    assert oracle.gone(host_veth_name("exists1", "eth0"))
    assert allocations(daemon, "exists1") == []
    assert oracle.link("eth0", netns=ns)["ifname"] == "eth0"  # left alone
    assert oracle.link("other0", netns=ns) is not None


def test_same_container_second_ifname_gets_another_ip(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    ns, path = netns()
    c = conf(daemon)
    a = runtime.add(c, path, "two-if", ifname="eth0")
    b = runtime.add(c, path, "two-if", ifname="net1")
    assert a.rc == 0 and b.rc == 0
    assert a.out["ips"][0]["address"] != b.out["ips"][0]["address"]
    assert len(allocations(daemon, "two-if")) == 2
    assert runtime.delete(c, path, "two-if", ifname="net1").rc == 0
    assert runtime.delete(c, path, "two-if", ifname="eth0").rc == 0
    assert allocations(daemon, "two-if") == []


@pytest.mark.parametrize("point", ["after-ipam", "after-veth", "before-result"])
def test_failed_add_leaves_nothing(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime, point: str
) -> None:
    ns, path = netns()
    cid = f"fault-{point}-{runtime.kind}"
    before = len(allocations(daemon))
    out = runtime.add(conf(daemon), path, cid)
    assert out.failed_with(999, "injected fault"), out
    assert len(allocations(daemon)) == before
    assert oracle.gone(host_veth_name(cid, "eth0"))
    assert oracle.gone("eth0", netns=ns)
    assert [r for r in oracle.routes(netns=ns) if r["dst"] == "default"] == []


def test_mac_precedence_and_cni_args_mac(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    """runtimeConfig.mac (the mac capability) > args.cni.mac > CNI_ARGS MAC=."""
    ns, path = netns()
    c = conf(daemon, capabilities={"mac": True}, args={"cni": {"mac": "0a:58:0a:fa:00:bb"}})
    caps = {"mac": "0a:58:0a:fa:00:aa"}
    assert runtime.add(c, path, "mac1", cni_args="MAC=0a:58:0a:fa:00:cc", cap_args=caps).rc == 0
    assert oracle.link("eth0", netns=ns)["address"] == "0a:58:0a:fa:00:aa"
    assert runtime.delete(c, path, "mac1", cap_args=caps).rc == 0
    assert runtime.add(c, path, "mac2", cni_args="MAC=0a:58:0a:fa:00:cc").rc == 0
    assert oracle.link("eth0", netns=ns)["address"] == "0a:58:0a:fa:00:bb"
    assert runtime.delete(c, path, "mac2").rc == 0
    c2 = conf(daemon)
    assert runtime.add(c2, path, "mac3", cni_args="MAC=0a:58:0a:fa:00:cc").rc == 0
    assert oracle.link("eth0", netns=ns)["address"] == "0a:58:0a:fa:00:cc"
    assert runtime.delete(c2, path, "mac3").rc == 0


def test_requested_ip_via_cni_args(daemon: Daemon, netns: NetnsFactory, runtime: Runtime) -> None:
    _, path = netns()
    subnet = ipaddress.ip_network(daemon.status()["subnets"][0]["subnet"])
    want = subnet.network_address + 200
    c = conf(daemon)
    out = runtime.add(c, path, "req1", cni_args=f"IgnoreUnknown=1;IP={want}")
    assert out.rc == 0 and out.out["ips"][0]["address"] == f"{want}/{subnet.prefixlen}"
    _, path2 = netns()
    taken = runtime.add(c, path2, "req2", cni_args=f"IP={want}")
    assert taken.failed_with(7, "requested IP"), taken
    gw = runtime.add(c, path2, "req3", cni_args=f"IP={subnet.network_address + 1}")
    assert gw.failed_with(7, "requested IP"), gw
    outside = runtime.add(c, path2, "req4", cni_args="IP=192.0.2.200")
    assert outside.failed_with(7, "not a pod address"), outside
    assert (
        allocations(daemon, "req2")
        == allocations(daemon, "req3")
        == allocations(daemon, "req4")
        == []
    )
    assert runtime.delete(c, path, "req1").rc == 0


def test_l2_only_config(daemon: Daemon, netns: NetnsFactory, runtime: Runtime) -> None:
    ns, path = netns()
    c = conf(daemon, ipam={}, isGateway=False, isDefaultGateway=False, ipMasq=False)
    add = runtime.add(c, path, "l2-1")
    assert add.rc == 0 and not add.out.get("ips")
    assert "UP" in oracle.link("eth0", netns=ns)["flags"]
    assert oracle.addresses("eth0", netns=ns) == []
    assert runtime.check(c, path, "l2-1").rc == 0
    assert runtime.delete(c, path, "l2-1").rc == 0
    assert oracle.gone(host_veth_name("l2-1", "eth0"))


def test_bridge_reused_and_non_bridge_clash(daemon: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    _, path = netns()
    assert rt.add(conf(daemon), path, "br1").rc == 0
    index = oracle.link(daemon.bridge)["ifindex"]
    mac = oracle.link(daemon.bridge)["address"]
    _, path2 = netns()
    assert rt.add(conf(daemon), path2, "br2").rc == 0
    assert oracle.link(daemon.bridge)["ifindex"] == index
    assert oracle.link(daemon.bridge)["address"] == mac
    assert (
        rt.delete(conf(daemon), path, "br1").rc == 0
        and rt.delete(conf(daemon), path2, "br2").rc == 0
    )
    assert oracle.link(daemon.bridge) is not None  # DEL never removes the bridge
    subprocess.run(
        ["ip", "link", "add", "mtedummy0", "type", "veth", "peer", "name", "mtedummy1"], check=True
    )
    try:
        out = rt.add(conf(daemon, bridge="mtedummy0"), path, "br3")
        assert out.rc == 1 and "not a bridge" in out.out["msg"]
        assert allocations(daemon, "br3") == []
    finally:
        subprocess.run(["ip", "link", "del", "mtedummy0"], check=False)


def test_hairpin_and_promisc(daemon: Daemon, netns: NetnsFactory, runtime: Runtime) -> None:
    _, path = netns()
    c = conf(daemon, hairpinMode=True)
    assert runtime.add(c, path, "hp1").rc == 0
    port = oracle.link(host_veth_name("hp1", "eth0"))
    assert port["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert runtime.delete(c, path, "hp1").rc == 0
    both = runtime.add(conf(daemon, hairpinMode=True, promiscMode=True), path, "hp2")
    assert both.failed_with(7, "hairpin mode and promiscuous mode"), both
    assert allocations(daemon, "hp2") == []


# ---- DEL tolerance -------------------------------------------------------------------------------


def test_del_with_empty_netns_releases(daemon: Daemon, netns: NetnsFactory) -> None:
    """containerd's second DEL: empty CNI_NETNS, no prevResult."""
    rt = ExecRuntime()
    ns, path = netns()
    c = conf(daemon)
    assert rt.add(c, path, "empty-ns").rc == 0
    assert rt.call("DEL", c, container_id="empty-ns", netns="", ifname="eth0").rc == 0
    assert_detached(daemon, ns, "empty-ns", "eth0")
    assert rt.call("DEL", c, container_id="empty-ns", netns="", ifname="eth0").rc == 0


def test_del_with_vanished_netns_releases(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    ns, path = netns()
    c = conf(daemon)
    assert runtime.add(c, path, "gone-ns").rc == 0
    subprocess.run(["ip", "netns", "del", ns], check=True)
    assert runtime.delete(c, path, "gone-ns").rc == 0
    assert_detached(daemon, None, "gone-ns", "eth0")


def test_del_with_interface_already_gone(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    ns, path = netns()
    c = conf(daemon)
    assert runtime.add(c, path, "no-if").rc == 0
    subprocess.run(["ip", "-n", ns, "link", "del", "eth0"], check=True)
    assert runtime.delete(c, path, "no-if").rc == 0
    assert_detached(daemon, ns, "no-if", "eth0")


def test_del_without_prior_add(daemon: Daemon, netns: NetnsFactory, runtime: Runtime) -> None:
    _, path = netns()
    assert runtime.delete(conf(daemon), path, "never-added").rc == 0


# ---- CHECK ---------------------------------------------------------------------------------------


def test_check_without_prev_result_fails(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime
) -> None:
    """libcni sends no prevResult when it has no cached result for the attachment."""
    rt = ExecRuntime()
    _, path = netns()
    c = conf(daemon)
    assert rt.add(c, path, "chk0").rc == 0  # not through libcni: it has nothing cached
    if runtime.kind == "exec":
        out = rt.call("CHECK", c, container_id="chk0", netns=path, ifname="eth0")
    else:
        out = runtime.check(c, path, "chk0")
    assert out.failed_with(7, "prevResult"), out
    assert rt.delete(c, path, "chk0").rc == 0


def test_check_needs_040(daemon: Daemon, netns: NetnsFactory) -> None:
    _, path = netns()
    out = ExecRuntime().call(
        "CHECK", conf(daemon, "0.3.1"), container_id="x", netns=path, ifname="eth0"
    )
    assert out.code == 1


BREAKAGES: dict[str, Callable[[str, str, str], list[str]]] = {
    "address removed": lambda ns, host, ip: ["ip", "-n", ns, "addr", "del", ip, "dev", "eth0"],
    "host veth deleted": lambda ns, host, ip: ["ip", "link", "del", host],
    "detached from bridge": lambda ns, host, ip: ["ip", "link", "set", host, "nomaster"],
    "default route deleted": lambda ns, host, ip: ["ip", "-n", ns, "route", "del", "default"],
    "mac changed": lambda ns, host, ip: [
        "ip",
        "-n",
        ns,
        "link",
        "set",
        "eth0",
        "address",
        "0a:58:de:ad:be:ef",
    ],
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_check_detects(
    daemon: Daemon, netns: NetnsFactory, runtime: Runtime, breakage: str
) -> None:
    ns, path = netns()
    c = conf(daemon)
    cid = f"chk-{breakage.split()[0]}"
    add = runtime.add(c, path, cid)
    assert add.rc == 0
    assert runtime.check(c, path, cid).rc == 0
    subprocess.run(
        BREAKAGES[breakage](ns, host_veth_name(cid, "eth0"), add.out["ips"][0]["address"]),
        check=True,
    )
    out = runtime.check(c, path, cid)
    assert out.rc != 0, out
    assert runtime.delete(c, path, cid).rc == 0


def test_check_detects_lost_reservation(daemon: Daemon, netns: NetnsFactory) -> None:
    import grpc

    from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc

    rt = ExecRuntime()
    _, path = netns()
    c = conf(daemon)
    assert rt.add(c, path, "chk-res").rc == 0
    with grpc.insecure_channel(f"unix:{daemon.grpc_socket}") as ch:
        handle = ipam_pb2.Handle(network="mtenet", container_id="chk-res", ifname="eth0")
        assert ipam_pb2_grpc.IpamStub(ch).Release(ipam_pb2.ReleaseRequest(handle=handle)).released
    out = rt.check(c, path, "chk-res")
    assert out.rc == 1 and "reservation" in out.out["msg"]
    assert rt.delete(c, path, "chk-res").rc == 0


# ---- STATUS and GC (1.1.0, direct exec) -----------------------------------------------------------


def test_status(daemon: Daemon) -> None:
    rt = ExecRuntime()
    assert rt.call("STATUS", conf(daemon, "1.1.0")).rc == 0
    assert rt.call("STATUS", conf(daemon, "1.0.0")).code == 1


def test_gc(daemon: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    c = conf(daemon, "1.1.0", name="gcnet")
    other = conf(daemon, "1.1.0", name="othernet")
    paths = {}
    for cid in ("gcA", "gcB", "gcC"):
        paths[cid] = netns()[1]
        assert rt.add(c, paths[cid], cid).rc == 0
    _, opath = netns()
    assert rt.add(other, opath, "gcOther").rc == 0

    assert rt.call("GC", c).rc == 0  # no attachments key: nothing released (SPEC-NOTES)
    assert len(allocations(daemon, "gcB")) == 1

    keep_a = [{"containerID": "gcA", "ifname": "eth0"}]
    out = rt.call(
        "GC",
        {**c, "cni.dev/valid-attachments": keep_a + [{"containerID": "gcC", "ifname": "eth0"}]},
    )
    assert out.rc == 0 and out.out == {}
    assert allocations(daemon, "gcB") == [] and oracle.link(host_veth_name("gcB", "eth0")) is None
    assert len(allocations(daemon, "gcA")) == 1 and len(allocations(daemon, "gcC")) == 1

    assert rt.call("GC", {**c, "cni.dev/attachments": keep_a}).rc == 0  # the older key
    assert allocations(daemon, "gcC") == [] and len(allocations(daemon, "gcA")) == 1

    assert rt.call("GC", {**c, "cni.dev/valid-attachments": []}).rc == 0
    assert allocations(daemon, "gcA") == []
    assert len(allocations(daemon, "gcOther")) == 1  # another network is never touched
    assert rt.call("GC", conf(daemon, "1.0.0", name="gcnet")).code == 1
    assert rt.delete(other, opath, "gcOther").rc == 0


def test_concurrent_adds_get_distinct_ips(daemon: Daemon, netns: NetnsFactory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rt = ExecRuntime()
    c = conf(daemon)
    paths = [netns()[1] for _ in range(24)]
    with ThreadPoolExecutor(24) as pool:
        outs = list(pool.map(lambda i: rt.add(c, paths[i], f"conc-{i}"), range(24)))
    assert all(o.rc == 0 for o in outs), [o for o in outs if o.rc]
    ips = [o.out["ips"][0]["address"] for o in outs]
    assert len(set(ips)) == 24
    with ThreadPoolExecutor(24) as pool:
        dels = list(pool.map(lambda i: rt.delete(c, paths[i], f"conc-{i}"), range(24)))
    assert all(d.rc == 0 for d in dels)
    assert [a for a in allocations(daemon) if a["containerID"].startswith("conc-")] == []


def test_moorctl_status_table_and_json(daemon: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    _, path = netns()
    c = conf(daemon)
    out = rt.add(
        c, path, "ctl1", cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=ops;K8S_POD_NAME=db-0"
    )
    table = daemon.moorctl("status")
    assert table.returncode == 0
    assert "ops/db-0" in table.stdout and out.out["ips"][0]["address"] in table.stdout
    data = json.loads(daemon.moorctl("status", "--json").stdout)
    (subnet,) = data["subnets"]
    assert subnet["used"] >= 1 and subnet["total"] == 253
    assert subnet["used"] + subnet["free"] + subnet["cooling"] == subnet["total"]
    assert rt.delete(c, path, "ctl1").rc == 0
    bad = subprocess.run(
        [sys.executable, "-m", "ipamd.cli", "--socket", "/nonexistent.sock", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cannot reach" in bad.stderr


def test_bridge_deleted_under_the_daemon_is_recreated(daemon: Daemon, netns: NetnsFactory) -> None:
    """The daemon caches the bridge on the hot path; losing it must cost one retry, not an outage."""
    rt = ExecRuntime()
    c = conf(daemon)
    ns1, p1 = netns()
    assert rt.add(c, p1, "rebr1").rc == 0
    assert rt.delete(c, p1, "rebr1").rc == 0
    subprocess.run(["ip", "link", "del", daemon.bridge], check=True)
    ns2, p2 = netns()
    add = rt.add(c, p2, "rebr2")
    assert add.rc == 0, add
    assert_attached(daemon, ns2, "rebr2", "eth0", add.out)
    assert rt.check(c, p2, "rebr2").rc == 0
    assert rt.delete(c, p2, "rebr2").rc == 0
