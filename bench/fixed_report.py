"""The fixed-IP part's table, detail lines and BENCHMARKS.md section (between its own markers);
the rows are the cluster part's kind (`ClusterRow`: one column per backend)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import report
from bench.cluster_report import BACKENDS, HEADER, ClusterRow, p99
from bench.fixed_move import COLLECT, DB_IP, PROBE_INTERVAL, STICKY, Move, Moves
from bench.fixed_reconcile import MOVES, FixedReconcileCase
from bench.fixed_setup import (
    ADDRESSES,
    FIXED_RANGE,
    POD_NETWORK,
    RECONCILE_FIXED_RANGE,
    RECONCILE_NETWORK,
    RECONCILE_PEERS,
)

START, END = "<!-- bench:fixed:start -->", "<!-- bench:fixed:end -->"
MOVE_TARGET = 1.0  # s, p99 (issue 14)


@dataclass
class FixedFigures:
    params: dict
    moves: dict[str, Moves] = field(default_factory=dict)
    reconcile: list[FixedReconcileCase] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def _series(fig: FixedFigures, backend: str, value: Callable[[Move], float | None]) -> list[float]:
    m = fig.moves.get(backend)
    got = [value(x) for x in m.moves] if m else []
    return [v for v in got if v is not None]


def _ms(fig: FixedFigures, stat: Callable[[list[float]], float],
        value: Callable[[Move], float | None]) -> dict[str, float | None]:  # fmt: skip
    out: dict[str, float | None] = {}
    for b in BACKENDS:
        values = _series(fig, b, value)
        out[b] = stat(values) * 1000 if values else None
    return out


def _case(fig: FixedFigures, backend: str, count: int) -> FixedReconcileCase | None:
    return next((c for c in fig.reconcile if c.backend == backend and c.count == count), None)


def _start(fig: FixedFigures, count: int, attr: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for b in BACKENDS:
        c = _case(fig, b, count)
        out[b] = statistics.median(getattr(s, attr) for s in c.starts) if c and c.starts else None
    return out


def _moved(
    fig: FixedFigures, count: int, stat: Callable[[list[float]], float]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for b in BACKENDS:
        c = _case(fig, b, count)
        out[b] = stat(c.moves) * 1000 if c and c.moves else None
    return out


def _move_run(fig: FixedFigures, count: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for b in BACKENDS:
        c = _case(fig, b, count)
        runs, seconds = c.move_runs if c else (0, 0.0)
        out[b] = seconds / runs * 1000 if runs else None
    return out


def rows(fig: FixedFigures) -> list[ClusterRow]:
    n = fig.params["moves"]
    label = f"sticky pod move: ADD exec'd on the new node → n3's pod reaches it (ms, {n} moves)"
    out = [
        ClusterRow(f"{label}, p50", _ms(fig, statistics.median, lambda m: m.reached), 1),
        ClusterRow(f"{label}, p99", _ms(fig, p99, lambda m: m.reached), 1,
                   f"< {MOVE_TARGET * 1000:g}", lambda v: v < MOVE_TARGET * 1000),
        ClusterRow(f"{label}, max", _ms(fig, max, lambda m: m.reached), 1),
        ClusterRow("… measured from the ADD's return instead, p50 (ms)",
                   _ms(fig, statistics.median, lambda m: m.after_add), 1),
        ClusterRow("… measured from the ADD's return instead, p99 (ms)",
                   _ms(fig, p99, lambda m: m.after_add), 1),
        ClusterRow("… the ADD itself, exec → return, p50 (ms)",
                   _ms(fig, statistics.median, lambda m: m.add), 1),
        ClusterRow("… ADD exec'd → n3's /32 toward the new node, p50 (ms)",
                   _ms(fig, statistics.median, lambda m: m.route_remote), 1),
    ]  # fmt: skip
    count = fig.params["fixed"]
    reconcile = f"reconcile {count} fixed IPs' /32s from zero"
    out += [
        ClusterRow(f"{reconcile}: daemon spawn → all routes in the kernel (s)",
                   _start(fig, count, "to_routes")),
        ClusterRow(f"… daemon CPU, spawn → all routes (s, {count})",
                   _start(fig, count, "cpu_routes")),
        ClusterRow(f"… of which the reconcile run (s, {count})", _start(fig, count, "reconcile")),
        ClusterRow(f"… daemon RSS at ready (MB, {count})", _start(fig, count, "rss_mb"), 0),
        ClusterRow(f"then a fixed IP's move among the {count}: binding write → its /32's new "
                   "route on the node, p50 (ms)", _moved(fig, count, statistics.median), 1),
        ClusterRow(f"… one reconcile run with {count} fixed IPs (ms, mean over the moves)",
                   _move_run(fig, count), 1),
        ClusterRow(f"the same with no fixed IP ({RECONCILE_PEERS} peers' routes): spawn → all "
                   "routes (s)", _start(fig, 0, "to_routes")),
        ClusterRow("… daemon CPU, spawn → all routes (s, no fixed IP)",
                   _start(fig, 0, "cpu_routes")),
    ]  # fmt: skip
    return out


def _list_ms(values: list[float | None]) -> str:
    return ", ".join("—" if v is None else f"{v * 1000:.0f}" for v in values)


def details(fig: FixedFigures) -> list[str]:
    lines = []
    for b, m in fig.moves.items():
        if not m.moves:
            continue
        olds = [x.old_last for x in m.moves if x.old_last is not None]
        local = [x.route_local for x in m.moves if x.route_local is not None]
        away = [x.route_old for x in m.moves if x.route_old is not None]
        answered = [x.answered - x.reached for x in m.moves]
        lines.append(
            f"{b} moves, ADD exec'd → reached (ms): [{_list_ms([x.reached for x in m.moves])}]; "
            f"the new node's /32 to the pod's veth p50 "
            f"{statistics.median(local) * 1000:.1f} ms, the old node's /32 toward the new one "
            f"p50 {statistics.median(away) * 1000:.1f} ms; the old pod's last answer p50 "
            f"{statistics.median(olds) * 1000 if olds else float('nan'):.1f} ms "
            f"({len(olds)} of {len(m.moves)} moves had one); the round trip of the first "
            f"answered probe p50 {statistics.median(answered) * 1000:.1f} ms"
        )
    for c in fig.reconcile:
        starts = "; ".join(
            f"{s.to_routes:.2f} s (CPU {s.cpu_routes:.2f} s, run {s.reconcile:.2f} s"
            f"{'' if s.runs == 1 else f' in {s.runs}'}, ready {s.to_ready:.2f} s, RSS "
            f"{s.rss_mb:.0f} MB)"
            for s in c.starts
        )
        line = (
            f"{c.backend} {c.count} fixed IPs (preloaded in {c.preload_s:.1f} s): starts {starts}"
        )
        if c.moves:
            runs, seconds = c.move_runs
            line += (f"; {len(c.moves)} moves, write → route (ms) [{_list_ms(c.moves)}], "
                     f"{runs} reconcile runs {seconds:.2f} s")  # fmt: skip
        lines.append(line)
    return lines


HOW = {
    "Move": """The simulated 3-node cluster of the multi-node tests (tests/helpers/cluster.py,
        etcd and three `moor-ipamd` in netns, default log level and 10 s resync), one per backend,
        network {pods} with the fixed range {fixed}, underlay {underlay}.0/24, `rp_filter=1` on
        every node. Under a sticky rule (`moorctl sticky add {sticky}`) `prod/db-0` takes the
        lowest free fixed IP, {db_ip}, on n1 (CNI_ARGS
        `K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID=…`), then is recreated {moves} times
        alternately on n2 and n1, each time with a new pod UID in a new netns whose UDP echo
        server is already listening; it gets its IP back each time (checked), and the old node's
        DEL comes after the new node's ADD, as in the move test. A pod
        on n3 probes {db_ip} every {interval:g} ms (one process for the whole run, sequence
        numbers stamped with `time.perf_counter`, CLOCK_MONOTONIC like the bench's); each
        generation's server prefixes its answer with its own tag, so an answer of the new pod is
        told from one of the old. The zero is the bench exec'ing the ADD (`ip netns exec <node>
        bin/moor`, as a runtime would); the figure is the send time of the first probe the new
        pod answered (answers up to {collect:g} ms after the first one still count for an earlier
        probe), so the pod was reachable by then, to within one probe interval. From the ADD's
        return is listed too (negative: n3 reached the pod before the runtime heard back).
        Netlink watches in the three node netns stamp the /32's RTM_NEWROUTE (protocol 109) on
        each.""",
    "Reconcile from zero": """The cluster part's two-netns net with its own addresses and
        prefix: etcd in one netns, the measured node in the other. A script under `ip netns
        exec` preloads the network config ({network} in /24s, fixed range {rfixed}), {peers}
        peer leases and N held sticky fixed IPs spread round-robin over the peers, with moor's
        own store client and records: per fixed IP what a claim writes (the binding, the `ips/`
        record, the holder's handle and the identity index). No binding names the measured
        node, so every /32 it installs is the remote form (host-gw: via the holder's public IP;
        vxlan: via its `.0` onlink). Each start begins with no protocol-109 route and no vxlan
        device in the node; `moor-ipamd` is spawned (config from the store, `--public-ip` its
        eth0) and a netlink watch counts RTM_NEWROUTE until all N + {peers} routes are there.
        Wall: spawn to the last of them (interpreter start-up, store connection, the node's own
        lease, both listings and the reconcile run); CPU: the daemon's CPU-time clock at that
        moment; the run alone is the daemon's `moor_route_reconcile_seconds`; RSS at ready.
        {starts} start(s) per case, median shown; after the last, a dump checks that each /32
        has its holder's next hop. N = 0 is the baseline. Then, with the daemon running, {moves_n}
        of the fixed IPs, spread over them, move to the next peer one after the other: the
        binding is rewritten (etcd's JSON gateway, `http.client` from a thread in the etcd netns,
        as the cluster part's joins) and the node's netlink watch stamps the RTM_NEWROUTE of its
        /32; every fixed-IP change anywhere in the cluster costs each node one complete reconcile
        run, whose time (the daemon's histogram) is shown per run.""",
}


def how_measured(fig: FixedFigures) -> list[str]:
    values = {
        **fig.params,
        "pods": POD_NETWORK,
        "fixed": FIXED_RANGE,
        "underlay": ADDRESSES.underlay,
        "db_ip": DB_IP,
        "sticky": " ".join(f"'{a}'" if "[" in a else a for a in STICKY),
        "interval": PROBE_INTERVAL * 1000,
        "collect": COLLECT * 1000,
        "network": RECONCILE_NETWORK,
        "rfixed": RECONCILE_FIXED_RANGE,
        "peers": RECONCILE_PEERS,
        "moves_n": MOVES,
    }
    return [f"**{name}.** " + " ".join(text.split()).format(**values) for name, text in HOW.items()]


def load_note(fig: FixedFigures) -> str:
    if not fig.load:
        return ""
    return f"Load average (1 min) at start → end: {' → '.join(f'{x:.1f}' for x in fig.load)}."


def section(fig: FixedFigures, table: list[ClusterRow], env: dict[str, str], command: str) -> str:
    extra = details(fig)
    return "\n".join(
        [
            START,
            f"## Fixed pod IPs: a sticky pod's move; the /32s of {fig.params['fixed']} fixed IPs",
            "",
            f"Measured {env['date']} with `{command}` on {env['kernel']}, {env['cpus']} CPUs. "
            f"Python {env['python']}; store: {env['etcd']}. {load_note(fig)}".rstrip(),
            "",
            report.markdown_table(table, HEADER),
            "",
            *[f"- {line}" for line in extra],
            *([""] if extra else []),
            *[line for para in how_measured(fig) for line in (para, "")][:-1],
            END,
        ]
    )
