"""Cluster benchmarks (issue 13): moor's routes between nodes and the traffic over them.

- `cluster_converge`: on the simulated 3-node cluster, one per backend: lease write to route on
  every node (netlink-stamped), 50 joins; then pod-to-pod iperf3 beside the underlay's.
- `cluster_reconcile`: one node against a store of 1000 and 5000 remote leases: from zero to every
  route, CPU and RSS; and the re-list after a compaction.

`run()` measures into a `ClusterFigures` and always tears down (also on Ctrl-C or SIGTERM, which
the caller turns into KeyboardInterrupt): daemons and etcd by PID, then every netns (their links
and routes go with them). What could not be removed is reported as a failure.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench import cluster_report
from bench.cluster_converge import convergence, throughput
from bench.cluster_reconcile import ReconcileBench
from bench.cluster_report import BACKENDS, ClusterFigures
from bench.cluster_setup import (
    RECONCILE_INFRA_IP,
    BenchCluster,
    ReconcileNet,
    leftovers,
    remove_stale,
)
from bench.harness import no_interrupts
from bench.ipam_bench import BenchEtcd, etcd_package
from bench.netns_part import run_netns_part
from ipamd.ops import NO_NETWORK

Progress = Callable[[str], None]
EXPECTED = NO_NETWORK  # logged by design: the cluster starts its daemons before network init

DEFAULTS: dict = {"joins": 50, "rounds": 3, "seconds": 4.0, "sizes": (1000, 5000), "starts": 3}
QUICK: dict = {"joins": 10, "rounds": 1, "seconds": 2.0, "sizes": (1000,), "starts": 1}


def on_cluster(fig: ClusterFigures, backend: str, say: Progress) -> None:
    p = fig.params
    say(f"{backend}: building the 3-node cluster")
    c = BenchCluster(backend)
    try:
        c.build()
        say(f"{backend}: convergence, {p['joins']} joins")
        fig.convergence[backend] = conv = convergence(c, p["joins"], say)
        fig.failures += [f"{backend}: {f}" for f in conv.failures]
        say(f"{backend}: throughput, {p['rounds']} x {p['seconds']:g} s each way")
        fig.throughput[backend] = throughput(c, p["rounds"], p["seconds"], say)
    finally:
        with no_interrupts():
            for name, node in c.nodes.items():
                fig.warnings += [
                    f"{backend} {name}: {w}" for w in node.daemon.warnings() if EXPECTED not in w
                ]
            c.close()


def reconcile(fig: ClusterFigures, workdir: Path, say: Progress) -> None:
    p = fig.params
    net = ReconcileNet(secrets.token_hex(3))
    etcd = BenchEtcd(workdir / "etcd", name="mbc-reconcile", client_port=2379, peer_port=2380,
                     host=RECONCILE_INFRA_IP, netns=net.infra)  # fmt: skip
    bench: ReconcileBench | None = None
    try:
        say("reconcile: building the node and etcd netns")
        net.build()
        etcd.start()
        bench = ReconcileBench(net, etcd, workdir, say)
        for count in p["sizes"]:
            for backend in BACKENDS:
                case = bench.case(backend, count, p["starts"])
                fig.reconcile.append(case)
                fig.failures += [f"{backend} {count}: {x}" for x in case.problems]
    finally:
        with no_interrupts():
            if bench is not None:
                for d in bench.daemons:
                    fig.warnings += [f"reconcile {d.workdir.name}: {w}" for w in d.warnings()]
                bench.close()
            etcd.stop()
            net.destroy()


def run(fig: ClusterFigures, workdir: Path, say: Progress) -> None:
    """Measure everything into `fig`; raises what broke the run, after the tear-down."""
    stale = remove_stale()
    if stale:
        say(f"removed {len(stale)} netns of an earlier cluster run, e.g. {stale[0]}")
    fig.load.append(os.getloadavg()[0])
    try:
        for backend in BACKENDS:
            on_cluster(fig, backend, say)
        reconcile(fig, workdir, say)
        fig.load.append(os.getloadavg()[0])
    finally:
        with no_interrupts():
            fig.failures += [f"NOT CLEANED UP: {x}" for x in leftovers()]


def iperf3_version() -> str:
    proc = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, check=False)
    first = proc.stdout.splitlines()[0] if proc.stdout else "?"
    return first.split(" (")[0].removeprefix("iperf ")


def environment_extra() -> dict[str, str]:
    return {"etcd": etcd_package(), "iperf3": iperf3_version()}


def run_part(quick: bool, no_write: bool, command: str, say: Progress) -> int:
    """`python -m bench`'s cluster part: measure, tear down, print, write its BENCHMARKS.md
    section. Exit status as the other parts: 0 measured and clean, 1 failed, 130 interrupted."""
    fig = ClusterFigures(dict(QUICK if quick else DEFAULTS))
    return run_netns_part(
        "cluster", fig, run, cluster_report, environment_extra, workdir_prefix="mbc-bench-",
        no_write=no_write, command=command, say=say,
    )  # fmt: skip
