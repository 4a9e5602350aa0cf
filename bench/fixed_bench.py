"""Fixed pod IP benchmarks (issue 14): a sticky pod's move between nodes, and the /32 routes of many
fixed IPs.

- `fixed_move`: on the simulated 3-node cluster, one per backend: ADD on the new node to a remote
  pod reaching the moved pod, over 20 moves.
- `fixed_reconcile`: one node against a store of 5000 fixed IPs held on other nodes (and none,
  the baseline): from zero to every /32, wall and CPU.

`run()` measures into a `FixedFigures` and always tears down (also on Ctrl-C or SIGTERM, which the
caller turns into KeyboardInterrupt): servers, daemons and etcd by PID, then every netns of the
`mbf` prefix. What could not be removed is reported as a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from bench import fixed_report
from bench.cluster_bench import EXPECTED
from bench.cluster_report import BACKENDS
from bench.cluster_setup import leftovers, remove_stale
from bench.fixed_move import moves
from bench.fixed_reconcile import FixedReconcileBench
from bench.fixed_report import FixedFigures
from bench.fixed_setup import PREFIX, RECONCILE_INFRA_IP, FixedCluster, reconcile_net
from bench.harness import no_interrupts
from bench.ipam_bench import BenchEtcd, etcd_package
from bench.netns_part import run_netns_part

Progress = Callable[[str], None]
AUDIT = " AUDIT "  # moves are logged as warnings by design (the audit trail)

DEFAULTS: dict = {"moves": 20, "fixed": 5000, "starts": 3}
QUICK: dict = {"moves": 5, "fixed": 1000, "starts": 1}


def _warnings(lines: list[str], label: str) -> list[str]:
    return [f"{label}: {w}" for w in lines if EXPECTED not in w and AUDIT not in w]


def on_cluster(fig: FixedFigures, backend: str, say: Progress) -> None:
    say(f"{backend}: building the 3-node cluster with a fixed range")
    c = FixedCluster(backend)
    try:
        c.build()
        say(f"{backend}: {fig.params['moves']} moves of prod/db-0 between n1 and n2")
        fig.moves[backend] = m = moves(c, fig.params["moves"], say)
        fig.failures += [f"{backend}: {f}" for f in m.failures]
    finally:
        with no_interrupts():
            for name, node in c.nodes.items():
                fig.warnings += _warnings(node.daemon.warnings(), f"{backend} {name}")
            c.close()


def reconcile(fig: FixedFigures, workdir: Path, say: Progress) -> None:
    p = fig.params
    net = reconcile_net(secrets.token_hex(3))
    etcd = BenchEtcd(workdir / "etcd", name=f"{PREFIX}-reconcile", client_port=2379,
                     peer_port=2380, host=RECONCILE_INFRA_IP, netns=net.infra)  # fmt: skip
    bench: FixedReconcileBench | None = None
    try:
        say("reconcile: building the node and etcd netns")
        net.build()
        etcd.start()
        bench = FixedReconcileBench(net, etcd, workdir, say)
        for count in (p["fixed"], 0):
            for backend in BACKENDS:
                case = bench.case(backend, count, p["starts"])
                fig.reconcile.append(case)
                fig.failures += [f"{backend} {count}: {x}" for x in case.problems]
    finally:
        with no_interrupts():
            if bench is not None:
                for d in bench.daemons:
                    fig.warnings += _warnings(d.warnings(), f"reconcile {d.workdir.name}")
                bench.close()
            etcd.stop()
            net.destroy()


def run(fig: FixedFigures, workdir: Path, say: Progress) -> None:
    """Measure everything into `fig`; raises what broke the run, after the tear-down."""
    stale = remove_stale(PREFIX)
    if stale:
        say(f"removed {len(stale)} netns of an earlier fixed-IP run, e.g. {stale[0]}")
    fig.load.append(os.getloadavg()[0])
    try:
        for backend in BACKENDS:
            on_cluster(fig, backend, say)
        reconcile(fig, workdir, say)
        fig.load.append(os.getloadavg()[0])
    finally:
        with no_interrupts():
            fig.failures += [f"NOT CLEANED UP: {x}" for x in leftovers(PREFIX)]


def run_part(quick: bool, no_write: bool, command: str, say: Progress) -> int:
    """`python -m bench`'s fixed part: measure, tear down, print, write its BENCHMARKS.md
    section. Exit status as the other parts: 0 measured and clean, 1 failed, 130 interrupted."""
    fig = FixedFigures(dict(QUICK if quick else DEFAULTS))
    return run_netns_part(
        "fixed-IP", fig, run, fixed_report, lambda: {"etcd": etcd_package()}, workdir_prefix=f"{PREFIX}-bench-",
        no_write=no_write, command=command, say=say,
    )  # fmt: skip
