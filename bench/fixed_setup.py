"""What the fixed-IP bench runs on: the cluster bench's pieces (bench/cluster_setup.py) with names
and addresses of its own, so it can run beside the cluster bench and the tests.

Everything carries the `mbf` prefix: netns `mbf<run id>-*`, temp dirs `mbf*`, etcd members and key
prefixes `/mbf-*`. The move cluster: underlay 192.168.213.0/24 (routed 214, outside 215), pods
10.213.0.0/16 with the fixed range 10.213.250.0/24 (no node leases a subnet of it). The reconcile
net: node eth0 on 172.21.0.0/16, network 10.176.0.0/12 in /24s with the fixed range
10.190.0.0/16 (room for 5000 fixed IPs and more).
"""

from __future__ import annotations

from bench.cluster_setup import BenchDaemon, ReconcileNet
from bench.ipam_bench import BenchEtcd
from tests.helpers.cluster import Cluster
from tests.helpers.underlay import Addresses

PREFIX = "mbf"
ADDRESSES = Addresses(underlay="192.168.213", routed="192.168.214", outside="192.168.215")
POD_NETWORK = "10.213.0.0/16"
FIXED_RANGE = "10.213.250.0/24"

RECONCILE_NETWORK, RECONCILE_SUBNET_LEN = "10.176.0.0/12", 24
RECONCILE_FIXED_RANGE = "10.190.0.0/16"
RECONCILE_INFRA_IP, RECONCILE_NODE_IP = "172.21.0.1", "172.21.0.2"
RECONCILE_PEERS_FROM = "172.21.1.1"  # peer i's public IP is this + i, on the node's /16
RECONCILE_PEERS = 3  # the nodes holding the fixed IPs; the measured node is another one
RECONCILE_NODE = "mbf-node"


class FixedCluster(Cluster):
    """The simulated 3-node cluster (tests/helpers/cluster.py) with a fixed range, the bench's
    daemon and etcd types (they die with the bench) and the addresses above."""

    daemon_type = BenchDaemon
    etcd_type = BenchEtcd

    def __init__(self, backend: str) -> None:
        super().__init__(backend=backend, prefix=PREFIX, addresses=ADDRESSES,
                         network=POD_NETWORK, fixed_ranges=(FIXED_RANGE,))  # fmt: skip


def reconcile_net(run_id: str) -> ReconcileNet:
    return ReconcileNet(run_id, PREFIX, RECONCILE_INFRA_IP, RECONCILE_NODE_IP)
