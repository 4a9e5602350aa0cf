"""Issue 14: a fixed IP through the real exec path on one node: the /32 datapath, CHECK, the
requested-IP precedence and its error code, and DEL.

One moor-ipamd (SQLite) whose network has a fixed range; pods are real netns. The kernel is read
with `ip -json`; traffic is a UDP echo both ways between a fixed pod and a bridge pod, each
receiver seeing the sender's own pod IP.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import oracle, traffic
from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import Daemon, ExecRuntime, delete_netns, make_netns
from tests.helpers.oracle import ip_json

pytestmark = pytest.mark.netns

NETWORK, FIXED_RANGE = "10.208.0.0/16", "10.208.250.0/24"
FIXED_IP = "10.208.250.9"
_run = secrets.token_hex(2)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    require(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0",
            "needs root")  # fmt: skip
    d = Daemon(workdir=tmp_path / "mfe", name="mfe", network="", bridge="mfebr0", cooldown=0)
    d.start()
    try:
        init = d.moorctl("network", "init", "--network", NETWORK, "--subnet-len", "24",
                         "--fixed-range", FIXED_RANGE)  # fmt: skip
        assert init.returncode == 0, init.stderr
        yield d
    finally:
        d.cleanup_host()


@pytest.fixture
def pods() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        delete_netns(name)


def pod_ns(pods: list[str], tag: str) -> tuple[str, str]:
    name = f"mfe-{_run}-{tag}"
    pods.append(name)
    return name, make_netns(name)


def wait_ready(d: Daemon) -> None:
    import time

    deadline = time.monotonic() + 10
    while not d.status()["ready"]:
        assert time.monotonic() < deadline, d.log_path.read_text()[-2000:]
        time.sleep(0.1)


def test_a_requested_fixed_ip_gets_a_32_and_talks_to_bridge_pods_both_ways(
    node: Daemon, pods: list[str]
) -> None:
    wait_ready(node)
    rt = ExecRuntime()
    conf = {"cniVersion": "1.0.0", "name": "mfe", **node.plugin()}
    bridge_ns, bridge_path = pod_ns(pods, "b")
    fixed_ns, fixed_path = pod_ns(pods, "f")
    web = rt.add(conf, bridge_path, "mfe-bridge-1")
    assert web.rc == 0, web.out
    args = f"IP={FIXED_IP};K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID=u1"
    db = rt.add(conf, fixed_path, "mfe-fixed-1", cni_args=args)
    assert db.rc == 0, db.out
    assert [ip["address"] for ip in db.out["ips"]] == [f"{FIXED_IP}/32"]
    assert db.out["ips"][0]["gateway"] == "169.254.1.1"
    host_veth = db.out["interfaces"][0]["name"]

    # The kernel: the pod's /32, its gateway as a permanent neighbour and the two routes; the
    # node's /32 route to the host end (protocol 109), which is on no bridge.
    addrs = ip_json("addr", "show", "eth0", netns=fixed_ns)[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        (FIXED_IP, 32)
    ]
    routes = {r["dst"]: r for r in ip_json("route", netns=fixed_ns)}
    assert routes["default"]["gateway"] == "169.254.1.1" and "169.254.1.1" in routes
    neigh = ip_json("neigh", "show", "dev", "eth0", netns=fixed_ns)
    assert [(n["dst"], n["state"]) for n in neigh] == [("169.254.1.1", ["PERMANENT"])]
    (host_route,) = ip_json("route", "show", FIXED_IP)
    assert (host_route["dev"], host_route["protocol"], host_route["scope"]) == (
        host_veth, "109", "link",
    )  # fmt: skip
    assert "master" not in ip_json("link", "show", host_veth)[0]
    assert oracle.sysctl("net/ipv4/conf/eth0/arp_notify", fixed_ns) == "1"  # announces the IP
    assert oracle.sysctl(f"net/ipv4/conf/{host_veth}/proxy_arp") == "1"

    # Traffic both ways, unNATed.
    web_ip = web.out["ips"][0]["address"].split("/")[0]
    servers = traffic.start_echo_servers([bridge_ns, fixed_ns])
    try:
        (to_web,) = traffic.probe(fixed_ns, [traffic.Probe(web_ip)])
        (to_db,) = traffic.probe(bridge_ns, [traffic.Probe(FIXED_IP)])
    finally:
        for s in servers:
            s.stop()
    assert (to_web.ok, to_web.src) == (True, FIXED_IP), to_web
    assert (to_db.ok, to_db.src) == (True, web_ip), to_db

    assert rt.check(conf, fixed_path, "mfe-fixed-1", cni_args=args).rc == 0

    # Another pod asking for the same IP: the documented code, nothing created.
    intruder_ns, intruder_path = pod_ns(pods, "i")
    other = rt.add(conf, intruder_path, "mfe-fixed-2",
                   cni_args=f"IP={FIXED_IP};K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-7")  # fmt: skip
    assert other.code == 105 and FIXED_IP in other.out["msg"], other.out
    assert [link["ifname"] for link in ip_json("link", "show", netns=intruder_ns)] == ["lo"]

    # DEL: the route goes with the host veth; the per-request binding ends, so the other pod
    # may have the IP now (cooldown 0 here).
    assert rt.delete(conf, fixed_path, "mfe-fixed-1", cni_args=args).rc == 0
    again = rt.add(conf, intruder_path, "mfe-fixed-2",
                   cni_args=f"IP={FIXED_IP};K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-7")  # fmt: skip
    assert again.rc == 0, again.out
    for cid, path in (("mfe-fixed-2", intruder_path), ("mfe-bridge-1", bridge_path)):
        assert rt.delete(conf, path, cid).rc == 0
    status = json.loads(node.moorctl("status", "--json").stdout)
    assert status["allocations"] == []


def test_a_live_fixed_ip_comes_back_after_the_store_lost_everything(
    tmp_path: Path, etcd_alone: EtcdServer, pods: list[str]
) -> None:
    """etcd restarts on an empty data dir under a running fixed pod: the node puts its binding,
    IP record and handle back (with the pod as owner), and another pod asking for the IP is
    still refused (105): the IP never belongs to two pods."""
    import time

    d = Daemon(workdir=tmp_path / "mfs", name="mfs", network="", bridge="mfsbr0", cooldown=0,
               store_url=etcd_alone.url, key_prefix="/mfs")  # fmt: skip
    d.start()
    try:
        init = d.moorctl("network", "init", "--network", NETWORK, "--subnet-len", "24",
                         "--fixed-range", FIXED_RANGE)  # fmt: skip
        assert init.returncode == 0, init.stderr
        wait_ready(d)
        rt = ExecRuntime()
        conf = {"cniVersion": "1.0.0", "name": "mfs", **d.plugin()}
        _, path = pod_ns(pods, "s1")
        args = f"IP={FIXED_IP};K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID=u1"
        assert rt.add(conf, path, "mfs-fixed-1", cni_args=args).rc == 0

        etcd_alone.wipe_data_dir()
        deadline = time.monotonic() + 30
        while "/mfs/fixed/" + FIXED_IP not in etcd_alone.etcdctl("get", "/mfs/fixed/", "--prefix",
                                                                 "--keys-only"):  # fmt: skip
            assert time.monotonic() < deadline, d.log_path.read_text()[-3000:]
            time.sleep(0.2)
        binding = json.loads(
            etcd_alone.etcdctl("get", f"/mfs/fixed/{FIXED_IP}", "--print-value-only")
        )
        assert (binding["identity"]["name"], binding["node"]) == ("db-0", "mfs")
        assert binding["generation"] == {"uid": "u1", "containerID": "mfs-fixed-1"}
        record = json.loads(etcd_alone.etcdctl("get", f"/mfs/ips/{FIXED_IP}", "--print-value-only"))
        assert record["containerID"] == "mfs-fixed-1"

        _, other = pod_ns(pods, "s2")
        refused = rt.add(conf, other, "mfs-fixed-2",
                         cni_args=f"IP={FIXED_IP};K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-1")  # fmt: skip
        assert refused.code == 105, refused.out
        assert rt.delete(conf, path, "mfs-fixed-1", cni_args=args).rc == 0
    finally:
        d.cleanup_host()
