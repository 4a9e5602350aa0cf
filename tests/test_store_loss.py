"""A store that loses data under a running cluster never makes a node hand out an IP a live pod
holds (ipamd/guard.py), on a real etcd that the test wipes or rolls back, with real daemons and
real pods (netns, veths) made through bin/moor.

- wipe: etcd restarts with an empty data dir under 2 nodes with 20 pods each. Both put back the
  network config, their subnet leases and every pod's allocation; then a third node starts: no
  subnet on two nodes, no duplicate IP in any pod netns, new pods work on all three.
- rollback: etcd is restored from a snapshot taken before the newest pods and before some pods
  were deleted. The newest come back from the live node; the deleted ones' records, which the
  backup brought back, are freed by the leak GC.
- restart on a lost store: a node's SQLite file is gone while its daemon is down; the daemon puts
  its running pods back from their host veths' records before it hands out an IP.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.conftest import _run_id, start_daemon
from tests.helpers import etcd, oracle
from tests.helpers.moor import Daemon, ExecRuntime, delete_netns, make_netns, plugin_config

pytestmark = pytest.mark.netns
NETWORK = "10.221.0.0/16"
PREFIX = "/msl"


class Cluster:
    """Nodes `msl1..3` on one etcd, their pods, and the cleanup of all of it."""

    def __init__(self, tmp_path: Path, server: etcd.EtcdServer) -> None:
        self.tmp = tmp_path
        self.etcd = server
        self.nodes: dict[str, Daemon] = {}
        self.pods: dict[str, tuple[str, Daemon]] = {}  # netns name -> (container ID, node)
        self.rt = ExecRuntime()

    def start(self, name: str, *extra: str) -> Daemon:
        d = start_daemon(
            self.tmp / name,
            name,
            NETWORK,
            f"{name}br0",
            store_url=self.etcd.url,
            key_prefix=PREFIX,
            extra_args=["--request-deadline", "3", *extra],
        )
        self.nodes[name] = d
        return d

    def conf(self, d: Daemon) -> dict:
        return plugin_config("mslnet", "1.1.0", d.plugin())

    def add_pod(self, d: Daemon, tag: str) -> str:
        ns = f"msl-{_run_id}-{tag}"  # unique per run: another run may be going on
        path = make_netns(ns)
        cid = f"msl-{tag}"
        self.pods[ns] = (cid, d)
        out = self.rt.add(
            self.conf(d), path, cid, cni_args=f"K8S_POD_NAMESPACE=msl;K8S_POD_NAME={tag}"
        )
        assert out.rc == 0, out.out
        return out.out["ips"][0]["address"].split("/")[0]

    def delete_pod(self, ns: str) -> None:
        cid, d = self.pods.pop(ns)
        out = self.rt.delete(self.conf(d), f"/run/netns/{ns}", cid)
        assert out.rc == 0, out.out
        delete_netns(ns)

    def kernel_ips(self) -> dict[str, str]:
        """Every pod's IP as the kernel has it: netns -> IP."""
        return {ns: oracle.addresses("eth0", netns=ns)[0].split("/")[0] for ns in self.pods}

    def store_ips(self) -> dict[str, str]:
        """IP -> container ID of every IP record in etcd."""
        out = self.etcd.etcdctl("get", f"{PREFIX}/ips/", "--prefix", "-w", "json")
        kvs = json.loads(out).get("kvs") or []
        records = {}
        for kv in kvs:
            key = base64.b64decode(kv["key"]).decode()
            value = json.loads(base64.b64decode(kv["value"]))
            records[key.rsplit("/", 1)[1]] = value["containerID"]
        return records

    def subnet_holders(self) -> dict[str, str]:
        out = self.etcd.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "-w", "json")
        return {
            base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]: json.loads(
                base64.b64decode(kv["value"])
            )["node"]
            for kv in json.loads(out).get("kvs") or []
        }

    def cleanup(self) -> None:
        for ns in list(self.pods):
            cid, d = self.pods.pop(ns)
            self.rt.delete(self.conf(d), f"/run/netns/{ns}", cid)
            delete_netns(ns)
        for d in self.nodes.values():
            d.cleanup_host()


@pytest.fixture
def cluster(tmp_path: Path, etcd_alone: etcd.EtcdServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd_alone)
    try:
        yield c
    finally:
        c.cleanup()


def eventually(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def recoveries(d: Daemon) -> float:
    text = urllib.request.urlopen(d.metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("moor_store_recoveries_total "):
            return float(line.split()[1])
    return 0.0


def test_wiped_etcd_under_two_nodes_then_a_third_node(cluster: Cluster) -> None:
    n1, n2 = cluster.start("msl1"), cluster.start("msl2")
    for i in range(20):
        cluster.add_pod(n1, f"a{i}")
        cluster.add_pod(n2, f"b{i}")
    before = cluster.kernel_ips()
    assert len(set(before.values())) == 40
    held = cluster.subnet_holders()
    cluster_id = json.loads(cluster.etcd.etcdctl("get", f"{PREFIX}/config", "--print-value-only"))[
        "clusterID"
    ]

    cluster.etcd.wipe_data_dir()  # the daemons re-assert within moments: no check in between

    eventually("both nodes to re-assert", lambda: all(recoveries(d) >= 1 for d in (n1, n2)))
    eventually("both nodes ready", lambda: all(d.status()["ready"] for d in (n1, n2)))
    config = json.loads(cluster.etcd.etcdctl("get", f"{PREFIX}/config", "--print-value-only"))
    assert config["clusterID"] == cluster_id and config["network"] == NETWORK
    assert cluster.subnet_holders() == held
    records = cluster.store_ips()
    assert {ip: cluster.pods[ns][0] for ns, ip in before.items()} == records
    assert all(not d.status()["conflicts"] for d in (n1, n2))

    n3 = cluster.start("msl3")
    holders = cluster.subnet_holders()
    assert len(holders) == 3 and set(holders.values()) == {"msl1", "msl2", "msl3"}
    new = [cluster.add_pod(d, f"{d.name}-new{i}") for d in (n1, n2, n3) for i in range(3)]
    assert not set(new) & set(before.values())
    ips = cluster.kernel_ips()
    assert len(set(ips.values())) == len(ips) == 49  # no IP in two pod netns
    assert set(cluster.store_ips()) == set(ips.values())


def test_rolled_back_etcd_gets_the_newest_pods_back_and_gc_frees_the_dead(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.start("msl1", "--leak-gc-interval", "1", "--leak-gc-grace", "1")
    for i in range(5):
        cluster.add_pod(node, f"old{i}")
    backup = tmp_path / "backup.db"
    cluster.etcd.snapshot(backup)
    for i in range(5):
        cluster.add_pod(node, f"new{i}")
    cluster.delete_pod(f"msl-{_run_id}-old0")
    cluster.delete_pod(f"msl-{_run_id}-old1")
    live = cluster.kernel_ips()

    cluster.etcd.restore(backup)  # the five old pods, two of them deleted since; none new

    eventually("the node to re-assert", lambda: recoveries(node) >= 1)
    eventually(
        "the store to hold exactly the live pods",
        lambda: cluster.store_ips() == {ip: cluster.pods[ns][0] for ns, ip in live.items()},
    )
    assert node.status()["ready"]
    fresh = cluster.add_pod(node, "after")
    assert fresh not in live.values()


def test_a_daemon_restarted_on_a_lost_sqlite_store_puts_running_pods_back(
    cluster: Cluster,
) -> None:
    """The single-node store file is gone while the daemon is down: at start, the daemon knows
    its config and subnet from its state file and its running pods from their host veths' alias
    (written at ADD), and puts every allocation back before it hands out an IP."""
    d = start_daemon(cluster.tmp / "msl5", "msl5", NETWORK, "msl5br0")
    cluster.nodes["msl5"] = d
    before = {}
    for i in range(5):
        ip = cluster.add_pod(d, f"s{i}")
        before[ip] = f"msl-s{i}"
    alias = oracle.link(host_veth_name("msl-s0", "eth0"))["ifalias"]
    assert alias.startswith("moor1 ") and "msl-s0 eth0 msl s0" in alias
    d.stop()
    for suffix in ("", "-wal", "-shm"):
        (cluster.tmp / "msl5" / f"store.db{suffix}").unlink(missing_ok=True)
    d.start()
    eventually("the daemon to be ready", lambda: d.status()["ready"])
    held = {a["ip"].split("/")[0]: a["containerID"] for a in d.status()["allocations"]}
    assert held == before
    assert recoveries(d) == 1
    fresh = cluster.add_pod(d, "after")
    assert fresh not in before
    ips = cluster.kernel_ips()
    assert len(set(ips.values())) == len(ips) == 6
