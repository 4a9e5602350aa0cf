"""What the cluster bench runs on: the simulated 3-node cluster of tests/helpers/cluster.py with the
bench's own names and addresses, a two-netns net for the reconcile figures, and their clean-up.

Everything carries the `mbc` prefix: netns `mbc<run id>-*` (the cluster's infra, out and n1..n3
and their pods; the reconcile net's `-rinfra` and `-rnode`), temp dirs `mbc*`, etcd members and
key prefixes `/mbc-*`. Addresses are the bench's own, so nothing is shared with tests running
beside it (they are inside netns anyway): underlay 192.168.210.0/24 (routed 211, outside 212),
pods 10.210.0.0/16; the reconcile net's underlay 172.20.0.0/16 (5000 peers on one L2 segment),
pods 10.160.0.0/11 in /24s. Daemons and etcd die with the bench (PR_SET_PDEATHSIG) even when it
is killed outright; everything else goes with its netns.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO, _die_with_parent, sh
from bench.ipam_bench import BenchEtcd
from tests.helpers.cluster import Cluster
from tests.helpers.moor import Daemon
from tests.helpers.underlay import Addresses, finish, run_batch

PREFIX = "mbc"
ADDRESSES = Addresses(underlay="192.168.210", routed="192.168.211", outside="192.168.212")
POD_NETWORK = "10.210.0.0/16"
RECONCILE_NETWORK, RECONCILE_SUBNET_LEN = "10.160.0.0/11", 24  # 8192 subnets: room for 5000
RECONCILE_INFRA_IP, RECONCILE_NODE_IP = "172.20.0.1", "172.20.0.2"
RECONCILE_PEERS_FROM = "172.20.1.1"  # peer i's public IP is this + i, on the node's /16
RECONCILE_NODE = "mbc-node"


@dataclass
class BenchDaemon(Daemon):
    """A moor-ipamd as a node runs it (default log level info, no fault hook), in a session of
    its own (a Ctrl-C goes to the bench only) and killed if the bench dies."""

    log_level: str = "info"
    fault_injection: bool = False

    def spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def started(self) -> bool:
        """Both sockets are there (the daemon's last start-up step); RuntimeError if it died."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"moor-ipamd {self.name} exited {self.proc.returncode}")
        return Path(self.cni_socket).exists() and Path(self.grpc_socket).exists()

    def warnings(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]


class BenchCluster(Cluster):
    daemon_type = BenchDaemon
    etcd_type = BenchEtcd

    def __init__(self, backend: str) -> None:
        super().__init__(backend=backend, prefix=PREFIX, addresses=ADDRESSES, network=POD_NETWORK)


class ReconcileNet:
    """Two netns joined by one veth: `-rinfra` (etcd on 172.20.0.1) and `-rnode` (the node under
    test, eth0 172.20.0.2/16: every peer's 172.20.x.y is directly connected, as host-gw needs).
    Another part of the bench passes its own prefix and /16's addresses."""

    def __init__(
        self,
        run_id: str,
        prefix: str = PREFIX,
        infra_ip: str = RECONCILE_INFRA_IP,
        node_ip: str = RECONCILE_NODE_IP,
    ) -> None:
        self.infra = f"{prefix}{run_id}-rinfra"
        self.node = f"{prefix}{run_id}-rnode"
        self.infra_ip, self.node_ip = infra_ip, node_ip
        self.made: list[str] = []

    def build(self) -> None:
        self.made = [self.infra, self.node]
        pair = f"link add eth0 netns {self.node} type veth peer name rnode netns {self.infra}"
        finish([run_batch([f"netns add {self.infra}", f"netns add {self.node}", pair])], "netns")
        infra = [
            "link set lo up",
            f"addr add {self.infra_ip}/16 dev rnode",
            "link set rnode up",
        ]
        node = ["link set lo up", f"addr add {self.node_ip}/16 dev eth0", "link set eth0 up"]
        finish([run_batch(infra, self.infra), run_batch(node, self.node)], "addressing")

    def clear_node(self, device: str) -> None:
        """Take the node back to zero: no moor route, no vxlan device (the daemon is stopped)."""
        sh("ip", "-n", self.node, "route", "flush", "proto", "109", check=False)
        sh("ip", "-n", self.node, "link", "del", device, check=False)

    def moor_routes(self) -> int:
        """How many protocol-109 routes the node's main table holds (one dump, via iproute2)."""
        out = sh("ip", "-n", self.node, "route", "show", "proto", "109").stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def vxlan_entries(self, device: str) -> tuple[int, int]:
        """(permanent neighbours, FDB entries with a destination) on the node's `device`."""
        neigh = sh("ip", "-n", self.node, "neigh", "show", "dev", device, "nud", "permanent",
                   check=False).stdout  # fmt: skip
        fdb = sh("bridge", "-n", self.node, "fdb", "show", "dev", device, check=False).stdout
        return (
            sum(1 for line in neigh.splitlines() if line.strip()),
            sum(1 for line in fdb.splitlines() if " dst " in line and "permanent" in line),
        )

    def destroy(self) -> None:
        names, self.made = self.made, []
        if names:
            subprocess.run(["ip", "-force", "-batch", "-"], capture_output=True, text=True,
                           input="".join(f"netns del {n}\n" for n in names))  # fmt: skip


def our_netns(prefix: str = PREFIX) -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Netns of ours still on the machine (before a run: a killed run's; after: a bug)."""
    return [f"netns {name}" for name in our_netns(prefix)]


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """A killed earlier run's netns (their daemons died with it): deleted; returns their names."""
    stale = our_netns(prefix)
    if stale:
        subprocess.run(["ip", "-force", "-batch", "-"], capture_output=True, text=True,
                       input="".join(f"netns del {n}\n" for n in stale))  # fmt: skip
        time.sleep(0.1)
    return stale
