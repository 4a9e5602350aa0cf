"""Reconcile from zero of N fixed IPs' /32s: one real moor-ipamd in a node netns, a store holding
RECONCILE_PEERS peer leases and N held sticky fixed IPs spread over those peers
(bench/fixed_store.py), the kernel watched until every route is there. N = 0 is the baseline (the
peers' subnet routes alone), so the difference is what the fixed IPs cost.

The instruments are the cluster bench's (bench/cluster_reconcile.py `ReconcileBench`): the node
netns starts with no protocol-109 route and no vxlan device, the daemon is spawned under `ip netns
exec`, a netlink watch counts RTM_NEWROUTE until all N + peers routes are there, and the daemon's
CPU-time clock is read then and at ready. After the last start a dump checks every /32: in the main
table, protocol 109, with its holder's next hop (host-gw: the peer's public IP; vxlan: the peer's
`.0` onlink on the device).

Then, with the daemon running, MOVES fixed IPs move to another peer one at a time (their binding
rewritten through etcd's JSON gateway): what one move anywhere in a cluster of N fixed IPs costs a
node, from the write to the /32's new route in its kernel. Every run of the reconcile is complete
(level-triggered), so it grows with N.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster_probe import EtcdGateway, netns_executor
from bench.cluster_reconcile import ReconcileBench, Start
from bench.cluster_setup import BenchDaemon, ReconcileNet
from bench.cluster_store import peer_lease, peer_name
from bench.fixed_setup import (
    PREFIX,
    RECONCILE_FIXED_RANGE,
    RECONCILE_NETWORK,
    RECONCILE_NODE,
    RECONCILE_PEERS,
    RECONCILE_PEERS_FROM,
    RECONCILE_SUBNET_LEN,
)
from bench.fixed_store import binding_ops, fixed_ips
from bench.harness import REPO, sh
from bench.ipam_bench import BenchEtcd
from cni_plugin.datapath.vxlan import device_name
from ipamd.network_config import NetworkConfig
from ipamd.store.keys import Keys

Progress = Callable[[str], None]
MOVES = 10  # fixed IPs moved to another peer after the starts, one at a time
MOVE_TIMEOUT = 10.0


@dataclass
class FixedReconcileCase:
    backend: str
    count: int  # fixed IPs
    preload_s: float = 0.0
    starts: list[Start] = field(default_factory=list)
    moves: list[float] = field(default_factory=list)  # binding put sent -> the /32's new route
    move_runs: tuple[int, float] = (0, 0.0)  # reconcile runs (count, seconds) during the moves
    problems: list[str] = field(default_factory=list)


class FixedReconcileBench:
    def __init__(self, net: ReconcileNet, etcd: BenchEtcd, workdir: Path, say: Progress) -> None:
        self.base = ReconcileBench(net, etcd, workdir, say)
        self.net, self.etcd, self.workdir, self.say = net, etcd, workdir, say

    @property
    def daemons(self) -> list[BenchDaemon]:
        return self.base.daemons

    def close(self) -> None:
        self.base.close()

    def preload(self, prefix: str, config: NetworkConfig, count: int) -> float:
        """bench/fixed_store.py in the infra netns; its own timing of the writes (s)."""
        argv = ["ip", "netns", "exec", self.net.infra, sys.executable, "-m", "bench.fixed_store",
                "--store", self.etcd.url, "--prefix", prefix, "--config", config.to_json().decode(),
                "--peers", str(RECONCILE_PEERS), "--count", str(count),
                "--first-ip", RECONCILE_PEERS_FROM]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"preload failed: {proc.stderr.strip()[-500:]}")
        return float(json.loads(proc.stdout)["seconds"])

    def case(self, backend: str, count: int, starts: int) -> FixedReconcileCase:
        """Preload under a key prefix of the case's own, start the node's daemon `starts` times
        from zero, check the kernel; leave the node at zero."""
        fig = FixedReconcileCase(backend, count)
        prefix = f"/{PREFIX}-{backend}-{count}"
        config = NetworkConfig.parse(
            RECONCILE_NETWORK, RECONCILE_SUBNET_LEN, fixed_ranges=[RECONCILE_FIXED_RANGE],
            backend=backend,
        ).with_new_cluster_id()  # fmt: skip
        fig.preload_s = self.preload(prefix, config, count)
        self.say(f"  {backend} {count} fixed IPs: preloaded in {fig.preload_s:.1f} s")
        daemon = BenchDaemon(self.workdir / f"{backend}-{count}", RECONCILE_NODE, "", "mbfbr0",
                             store_url=self.etcd.url, key_prefix=prefix, netns=self.net.node,
                             extra_args=["--public-ip", self.net.node_ip])  # fmt: skip
        self.daemons.append(daemon)
        for k in range(starts):
            if k:
                daemon.stop()  # its routes stay (as on a real restart): cleared by start()
            fig.starts.append(self.base.start(daemon, config, count + RECONCILE_PEERS))
            s = fig.starts[-1]
            self.say(
                f"  {backend} {count} start {k + 1}: all routes in {s.to_routes:.2f} s (reconcile "
                f"{s.reconcile:.2f} s in {s.runs} run(s)), CPU by then {s.cpu_routes:.2f} s, "
                f"ready {s.to_ready:.2f} s, RSS {s.rss_mb:.0f} MB"
            )
        fig.problems += self.check_kernel(config, count)
        if count:
            self.moves(fig, daemon, config, prefix)
            runs, seconds = fig.move_runs
            self.say(
                f"  {backend} {count}: a fixed IP's move among them, binding write -> route p50 "
                f"{statistics.median(fig.moves) * 1000:.1f} ms ({runs} reconcile runs, "
                f"{seconds / max(runs, 1) * 1000:.1f} ms each)"
            )
        daemon.stop()
        self.net.clear_node(device_name(config.vni))
        return fig

    def moves(
        self, fig: FixedReconcileCase, daemon: BenchDaemon, config: NetworkConfig, prefix: str
    ) -> None:
        """MOVES of the fixed IPs, spread over them, each rewritten as held on the next peer
        (etcd's JSON gateway, from a thread in the infra netns): put sent to the RTM_NEWROUTE of
        its /32 in the node, one after the other; and the daemon's reconcile runs meanwhile."""
        keys, count, watch = Keys(prefix), fig.count, self.base.watch
        node = self.net.node
        ips = list(fixed_ips(config, count))
        infra = netns_executor(self.net.infra)
        gateway: EtcdGateway = infra.submit(EtcdGateway, self.net.infra_ip).result()
        runs0, seconds0 = self.base.runs(daemon)
        try:
            for k in range(MOVES):
                i = k * (count // MOVES)
                put = binding_ops(keys, ips[i], i, peer_name((i + 1) % RECONCILE_PEERS),
                                  time.time())[0]  # fmt: skip
                prefix32 = f"{ips[i]}/32"
                watch.arm()
                sent, _ = infra.submit(gateway.put, put.key, put.value).result()
                if not watch.wait(lambda p=prefix32: p in watch.added[node], MOVE_TIMEOUT):
                    fig.problems.append(f"move of {ips[i]}: no new route in {MOVE_TIMEOUT:g} s")
                    return
                fig.moves.append(watch.seen(node)[0][prefix32] - sent)
        finally:
            infra.submit(gateway.close).result()
            infra.shutdown()
        runs1, seconds1 = self.base.runs(daemon, more_than=runs0 + MOVES - 1)
        fig.move_runs = (runs1 - runs0, seconds1 - seconds0)

    def check_kernel(self, config: NetworkConfig, count: int) -> list[str]:
        """Every fixed IP's /32 with its holder's next hop; for vxlan, a neighbour and an FDB
        entry per peer."""
        out = sh("ip", "-n", self.net.node, "-j", "route", "show", "proto", "109").stdout
        have = {r["dst"]: r for r in json.loads(out or "[]")}
        problems = []
        if len(have) != count + RECONCILE_PEERS:
            problems.append(f"{len(have)} moor routes, expected {count + RECONCILE_PEERS}")
        leases = [peer_lease(config, i, RECONCILE_PEERS_FROM, 0) for i in range(RECONCILE_PEERS)]
        wrong = 0
        for i, ip in enumerate(fixed_ips(config, count)):
            lease = leases[i % RECONCILE_PEERS]
            assert lease.node == peer_name(i % RECONCILE_PEERS)
            route = have.get(str(ip), {})
            want = (
                lease.public_ip
                if config.backend == "host-gw"
                else str(ipaddress.ip_network(lease.subnet).network_address)
            )
            if route.get("gateway") != want:
                wrong += 1
        if wrong:
            problems.append(f"{wrong} of {count} fixed IPs' /32s missing or with another next hop")
        if config.backend == "vxlan":
            found = self.net.vxlan_entries(device_name(config.vni))
            if found != (RECONCILE_PEERS, RECONCILE_PEERS):
                problems.append(f"(neighbours, FDB entries) {found}, expected one per peer")
        return problems
