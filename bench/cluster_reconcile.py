"""Reconcile from zero: one real moor-ipamd in a node netns, a store preloaded with 1000 or 5000
remote leases, and the kernel watched until every route is there; then again after a compaction.

From zero: the node netns holds no protocol-109 route and no vxlan device when the daemon is
spawned (`ip netns exec <node> python -m ipamd`, network config from the store, `--public-ip` on
its /16 underlay). A thread in the node netns counts RTM_NEWROUTE of protocol 109 (netlink
notifications, stamped on arrival) until all N are there: "spawn to all routes" includes the
interpreter's start-up, the store connection, the node's own lease, the lease listing and the
reconcile run. The run's own time comes from the daemon's `moor_route_reconcile_seconds`
histogram (scraped on a thread in its netns); CPU from the process's CPU-time clock, RSS from
/proc when the daemon says ready (both sockets there; the reconcile runs before they open).

After a compaction: with the daemon SIGSTOPped (its watch cannot resume: the stream breaks when
etcd goes), etcd is restarted, one peer's lease is deleted and a new peer's written, and the
history is compacted to the current revision; then SIGCONT. The daemon has to notice the broken
watch, list all N leases again, diff them by key and value and reconcile; the figure is SIGCONT to
both changes seen in the kernel.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster_probe import RouteWatch, netns_executor, reconcile_runs, scrape
from bench.cluster_setup import (
    RECONCILE_NETWORK,
    RECONCILE_NODE,
    RECONCILE_NODE_IP,
    RECONCILE_PEERS_FROM,
    RECONCILE_SUBNET_LEN,
    BenchDaemon,
    ReconcileNet,
)
from bench.cluster_store import peer_lease
from bench.harness import REPO, ProcessCpu
from bench.ipam_bench import BenchEtcd
from cni_plugin.datapath.vxlan import device_name
from ipamd.network_config import NetworkConfig
from ipamd.store.keys import Keys

Progress = Callable[[str], None]
ROUTES_TIMEOUT = 300.0


@dataclass
class Start:
    to_routes: float  # spawn -> the last of the N routes seen
    to_ready: float  # spawn -> both sockets there
    reconcile: float  # seconds in route reconcile runs by then (the daemon's histogram)
    runs: int  # ... in how many runs (1: the start-up run alone)
    cpu: float  # the daemon's CPU seconds, spawn -> ready
    rss_mb: float  # VmRSS at ready
    hwm_mb: float  # VmHWM (peak RSS) at ready
    cpu_routes: float = 0.0  # the daemon's CPU seconds, spawn -> the last route seen


@dataclass
class Relist:
    to_kernel: float  # SIGCONT -> both changes of the gap in the kernel
    reconcile: float  # seconds in reconcile runs meanwhile (histogram delta)
    runs: int
    cpu: float  # the daemon's CPU seconds, SIGCONT -> done


@dataclass
class ReconcileCase:
    backend: str
    count: int
    preload_s: float = 0.0
    starts: list[Start] = field(default_factory=list)
    relist: Relist | None = None
    problems: list[str] = field(default_factory=list)  # the kernel's counts disagree, ...


def _memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class ReconcileBench:
    """The reconcile net, its etcd, a route watch and a thread in the node netns, for all cases."""

    def __init__(self, net: ReconcileNet, etcd: BenchEtcd, workdir: Path, say: Progress) -> None:
        self.net, self.etcd, self.workdir, self.say = net, etcd, workdir, say
        self.watch = RouteWatch([net.node])
        self.node_thread = netns_executor(net.node)
        self.daemons: list[BenchDaemon] = []
        self.watch.start()

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        self.watch.stop()
        self.node_thread.shutdown()

    def routes(self) -> dict[str, float]:
        return self.watch.added[self.net.node]

    def runs(self, daemon: BenchDaemon, more_than: int = 0) -> tuple[int, float]:
        """The daemon's reconcile (runs, seconds), once it has done more than `more_than` runs
        (a run observes its time just after its last kernel write: wait for it, up to 5 s)."""
        deadline = time.monotonic() + 5
        while True:
            metrics = self.node_thread.submit(scrape, daemon.metrics_port).result()
            runs, seconds = reconcile_runs(metrics)
            if runs > more_than or time.monotonic() > deadline:
                return runs, seconds
            time.sleep(0.01)

    def preload(self, prefix: str, config: NetworkConfig, count: int) -> float:
        """bench/cluster_store.py in the infra netns; its own timing of the writes (s)."""
        argv = ["ip", "netns", "exec", self.net.infra, sys.executable, "-m", "bench.cluster_store",
                "--store", self.etcd.url, "--prefix", prefix, "--config", config.to_json().decode(),
                "--count", str(count), "--first-ip", RECONCILE_PEERS_FROM]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"preload failed: {proc.stderr.strip()[-500:]}")
        return float(json.loads(proc.stdout)["seconds"])

    def case(self, backend: str, count: int, starts: int) -> ReconcileCase:
        """Preload `count` leases under a key prefix of the case's own, start the node's daemon
        `starts` times from zero, check the kernel, then the compaction; leave the node at zero."""
        fig = ReconcileCase(backend, count)
        prefix = f"/mbc-{backend}-{count}"
        config = NetworkConfig.parse(
            RECONCILE_NETWORK, RECONCILE_SUBNET_LEN, backend=backend
        ).with_new_cluster_id()
        fig.preload_s = self.preload(prefix, config, count)
        self.say(f"  {backend} {count}: preloaded in {fig.preload_s:.1f} s")
        daemon = BenchDaemon(self.workdir / f"{backend}-{count}", RECONCILE_NODE, "", "mbcbr0",
                             store_url=self.etcd.url, key_prefix=prefix, netns=self.net.node,
                             extra_args=["--public-ip", RECONCILE_NODE_IP])  # fmt: skip
        self.daemons.append(daemon)
        for k in range(starts):
            if k:
                daemon.stop()  # its routes stay (as on a real restart): cleared below
            fig.starts.append(self.start(daemon, config, count))
            s = fig.starts[-1]
            self.say(
                f"  {backend} {count} start {k + 1}: all routes in {s.to_routes:.2f} s (reconcile "
                f"{s.reconcile:.2f} s in {s.runs} run(s)), ready {s.to_ready:.2f} s, "
                f"CPU {s.cpu:.2f} s, RSS {s.rss_mb:.0f} MB"
            )
        fig.problems += self.check_kernel(config, count)
        fig.relist = self.relist(daemon, config, prefix, count)
        r = fig.relist
        self.say(
            f"  {backend} {count} after a compaction: {r.to_kernel:.2f} s "
            f"(reconcile {r.reconcile:.2f} s in {r.runs} run(s))"
        )
        daemon.stop()
        self.net.clear_node(device_name(config.vni))
        return fig

    def check_kernel(self, config: NetworkConfig, count: int) -> list[str]:
        """A dump of what the daemon made, against what the watch counted: N routes, and for
        vxlan N neighbours and N FDB entries."""
        found = {"routes": self.net.moor_routes()}
        if config.backend == "vxlan":
            found["neighbours"], found["FDB entries"] = self.net.vxlan_entries(
                device_name(config.vni)
            )
        return [f"{n} {what} in the kernel, expected {count}" for what, n in found.items()
                if n != count]  # fmt: skip

    def start(self, daemon: BenchDaemon, config: NetworkConfig, count: int) -> Start:
        """Clear the node, spawn the daemon, time it to all `count` routes and to ready."""
        self.net.clear_node(device_name(config.vni))
        if self.net.moor_routes():
            raise RuntimeError("the node still holds moor routes before the start")
        self.watch.arm()
        spawned = time.perf_counter()
        daemon.spawn()
        assert daemon.proc is not None
        clock = ProcessCpu(daemon.proc.pid)
        if not self.watch.wait(lambda: len(self.routes()) >= count, ROUTES_TIMEOUT):
            raise RuntimeError(f"{len(self.routes())} of {count} routes after {ROUTES_TIMEOUT} s")
        cpu_routes = clock.seconds()
        last = max(self.watch.seen(self.net.node)[0].values())
        while not daemon.started():
            time.sleep(0.005)
        ready = time.perf_counter()
        cpu = clock.seconds()
        mem = _memory_mb(daemon.proc.pid)
        runs, seconds = self.runs(daemon)
        return Start(last - spawned, ready - spawned, seconds, runs, cpu, mem["VmRSS"],
                     mem["VmHWM"], cpu_routes)  # fmt: skip

    def relist(self, daemon: BenchDaemon, config: NetworkConfig, prefix: str, count: int) -> Relist:
        """A change made while the daemon's watch is broken and the history compacted: SIGCONT
        to the change in the kernel (peer 0 gone, a new peer routed)."""
        assert daemon.proc is not None
        keys, now = Keys(prefix), time.time()
        taken = set(
            self.etcd.etcdctl("get", "--prefix", "--keys-only", keys.subnets_prefix()).split()
        )
        gone = peer_lease(config, 0, RECONCILE_PEERS_FROM, now)
        candidates = (
            peer_lease(config, i, RECONCILE_PEERS_FROM, now) for i in range(count, 2 * count + 2)
        )
        new = next(c for c in candidates if keys.subnet(c.subnet) not in taken)
        runs0, seconds0 = self.runs(daemon)
        cpu = ProcessCpu(daemon.proc.pid)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            self.etcd.stop()
            self.etcd.start()
            self.etcd.etcdctl("del", keys.subnet(gone.subnet))
            self.etcd.etcdctl("put", keys.subnet(new.subnet), new.to_json().decode())
            status = json.loads(self.etcd.etcdctl("endpoint", "status", "-w", "json"))
            self.etcd.etcdctl(
                "compact", str(status[0]["Status"]["header"]["revision"]), "--physical"
            )
            self.watch.arm()
            cpu0 = cpu.seconds()
            resumed = time.perf_counter()
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        old_p, new_p = str(gone.subnet), str(new.subnet)
        node = self.net.node

        def done() -> bool:
            return old_p in self.watch.removed[node] and new_p in self.watch.added[node]

        if not self.watch.wait(done, 120):
            raise RuntimeError("the change made during the compacted gap never reached the kernel")
        added, removed = self.watch.seen(node)
        last = max(removed[old_p], added[new_p])
        cpu1 = cpu.seconds()
        runs1, seconds1 = self.runs(daemon, more_than=runs0)
        return Relist(last - resumed, seconds1 - seconds0, runs1 - runs0, cpu1 - cpu0)
