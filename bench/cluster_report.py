"""The cluster part's table, detail lines and BENCHMARKS.md section (between its own markers)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import report
from bench.cluster_converge import Convergence, Throughput
from bench.cluster_reconcile import ReconcileCase
from bench.cluster_setup import ADDRESSES, POD_NETWORK, RECONCILE_NETWORK

START, END = "<!-- bench:cluster:start -->", "<!-- bench:cluster:end -->"
BACKENDS = ("host-gw", "vxlan")
HEADER = ["figure", "host-gw", "vxlan", "target", "met?"]


@dataclass
class ClusterFigures:
    params: dict
    convergence: dict[str, Convergence] = field(default_factory=dict)
    throughput: dict[str, Throughput] = field(default_factory=dict)
    reconcile: list[ReconcileCase] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@dataclass
class ClusterRow:
    figure: str
    values: dict[str, float | None]  # by backend
    digits: int = 2
    target: str = ""
    meets: Callable[[float], bool] | None = None
    judged: tuple[str, ...] = BACKENDS  # the backends the target is for

    @property
    def met(self) -> str:
        if self.meets is None:
            return "—"
        got = [self.values.get(b) for b in self.judged]
        if any(v is None for v in got):
            return "not run"
        return "yes" if all(self.meets(v) for v in got if v is not None) else "**NO**"

    def cells(self) -> list[str]:
        nums = [
            "—" if self.values.get(b) is None else f"{self.values[b]:.{self.digits}f}"
            for b in BACKENDS
        ]
        return [self.figure, *nums, self.target or "—", self.met]


def _by_backend(fn: Callable[[str], float | None]) -> dict[str, float | None]:
    return {b: fn(b) for b in BACKENDS}


def _case(fig: ClusterFigures, backend: str, count: int) -> ReconcileCase | None:
    return next((c for c in fig.reconcile if c.backend == backend and c.count == count), None)


def rows(fig: ClusterFigures) -> list[ClusterRow]:
    out: list[ClusterRow] = []
    joins = fig.params["joins"]

    def conv(stat: Callable[[list[float]], float], attr: str) -> dict[str, float | None]:
        def one(b: str) -> float | None:
            c = fig.convergence.get(b)
            values = getattr(c, attr) if c else []
            return stat(values) * 1000 if values else None

        return _by_backend(one)

    label = f"lease write → route on every node (ms, 3 nodes, {joins} joins)"
    out.append(ClusterRow(f"{label}, p50", conv(statistics.median, "joins"), 1))
    out.append(ClusterRow(f"{label}, p99", conv(p99, "joins"), 1, "< 1000", lambda v: v < 1000))
    out.append(ClusterRow(f"{label}, max", conv(max, "joins"), 1))
    out.append(ClusterRow("lease delete → route gone on every node, p99 (ms)",
                          conv(p99, "leaves"), 1))  # fmt: skip
    for count, limit in ((1000, 2.0), (5000, 10.0)):

        def start(attr: str, count: int = count) -> dict[str, float | None]:
            def one(b: str) -> float | None:
                c = _case(fig, b, count)
                return statistics.median(getattr(s, attr) for s in c.starts) if c else None

            return _by_backend(one)

        out.append(ClusterRow(f"reconcile {count} remote leases from zero: daemon spawn → all "
                              "routes in the kernel (s)", start("to_routes"), 2, f"< {limit:g}",
                              lambda v, limit=limit: v < limit))  # fmt: skip
        out.append(ClusterRow(f"… of which the reconcile run (s, {count})", start("reconcile")))
        out.append(ClusterRow(f"… daemon CPU, spawn → ready (s, {count})", start("cpu")))
        rss_target = ("< 150", lambda v: v < 150) if count == 5000 else ("", None)
        out.append(ClusterRow(f"… daemon RSS at ready (MB, {count})", start("rss_mb"), 0,
                              *rss_target))  # fmt: skip

    for count in sorted({c.count for c in fig.reconcile}):

        def relist(b: str, count: int = count) -> float | None:
            c = _case(fig, b, count)
            return c.relist.to_kernel if c and c.relist else None

        out.append(ClusterRow(f"again after a compaction: re-list + reconcile of {count} (s)",
                              _by_backend(relist)))  # fmt: skip

    def tput(attr: str) -> dict[str, float | None]:
        def one(b: str) -> float | None:
            t = fig.throughput.get(b)
            return statistics.median(getattr(t, attr)) if t and getattr(t, attr) else None

        return _by_backend(one)

    pods, underlay = tput("pods"), tput("underlay")
    out.append(ClusterRow("pod n1 → pod n3, TCP (Gb/s, median)", pods))
    out.append(ClusterRow("node n1 → node n3 underlay, TCP, same run (Gb/s, median)", underlay))
    ratio = {b: (pods[b] / underlay[b]) if pods[b] and underlay[b] else None for b in BACKENDS}
    out.append(ClusterRow("pod-to-pod / underlay (×)", ratio, 2, "≥ 0.9 (host-gw)",
                          lambda v: v >= 0.9, ("host-gw",)))  # fmt: skip
    return out


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.1f}" for v in values)


def details(fig: ClusterFigures) -> list[str]:
    lines = []
    for b, c in fig.convergence.items():
        if not c.joins:
            continue
        lines.append(
            f"{b} joins: first node p50 {statistics.median(c.first) * 1000:.1f} ms; measured from "
            f"the put's answer instead of its sending, last node p50 "
            f"{statistics.median(c.after_answer) * 1000:.1f} p99 {p99(c.after_answer) * 1000:.1f} "
            f"ms; the put itself (JSON gateway) p50 {statistics.median(c.put_rtt) * 1000:.1f} ms; "
            f"leaves p50 {statistics.median(c.leaves) * 1000:.1f} ms"
        )
    for c in fig.reconcile:
        starts = "; ".join(
            f"{s.to_routes:.2f} s (run {s.reconcile:.2f} s{'' if s.runs == 1 else f' in {s.runs}'}"
            f", ready {s.to_ready:.2f}, CPU {s.cpu:.2f}, RSS {s.rss_mb:.0f} MB, peak "
            f"{s.hwm_mb:.0f})"
            for s in c.starts
        )
        line = f"{c.backend} {c.count} leases (preloaded in {c.preload_s:.1f} s): starts {starts}"
        if c.relist:
            r = c.relist
            line += (
                f"; after the compaction {r.to_kernel:.2f} s, of which {r.runs} reconcile run(s) "
                f"{r.reconcile:.2f} s, CPU {r.cpu:.2f} s"
            )
        lines.append(line)
    for b, t in fig.throughput.items():
        lines.append(
            f"{b} iperf3 rounds ({t.seconds:g} s each, alternating): pods "
            f"[{', '.join(f'{v:.2f}' for v in t.pods)}] Gb/s, underlay "
            f"[{', '.join(f'{v:.2f}' for v in t.underlay)}] Gb/s; pod MTU {t.pod_mtu}"
        )
    return lines


HOW = {
    "Convergence": """The simulated cluster of the multi-node tests (tests/helpers/cluster.py:
        etcd in an infra netns on a bridged underlay {underlay}.0/24, three node netns each running
        `moor-ipamd` under `ip netns exec` at its default log level, pods {pods}), one cluster per
        backend, default 10 s resync. A join writes a subnet lease for a node that does not exist
        (moor's own lease JSON; a public IP on the underlay that nobody holds; for vxlan the VNI,
        port and a VTEP MAC) with etcd's v3 JSON gateway (`POST /v3/kv/put`, `http.client`) from a
        thread inside the infra netns. A thread per node netns holds a raw NETLINK_ROUTE socket
        bound to RTMGRP_IPV4_ROUTE and stamps (`time.perf_counter`) the RTM_NEWROUTE of that
        subnet with protocol 109 as it arrives: nothing polls. The figure is from the put being
        sent to the route on the last of the three nodes (a node can have its route before the
        put's answer is read, so the answer cannot serve as the zero; from the answer is listed
        above).
        Then the lease is deleted and the RTM_DELROUTEs awaited before the next join; {joins}
        joins.""",
    "Reconcile from zero": """Two netns joined by a veth: etcd in one, the node in the other
        with eth0 on 172.20.0.0/16, so that every peer's public IP (172.20.x.y) is directly
        connected, as host-gw needs. A script under `ip netns exec` preloads the network config
        ({network} in /24s, backend host-gw or vxlan) and N peer leases with moor's own store
        client and lease records, as N peers' daemons would have written them. Each start begins
        with no protocol-109 route and no vxlan device in the node; `moor-ipamd` is spawned
        (`--network ""`: the config comes from the store; `--public-ip` its eth0) and a netlink
        watch in its netns counts RTM_NEWROUTE until all N are there. The figure is spawn to the
        last of them, so it includes the interpreter's start-up, the store connection, the node's
        own lease, the lease listing and the reconcile; the run alone is the daemon's
        `moor_route_reconcile_seconds`. CPU: the daemon's CPU-time clock when it is ready (both
        sockets there; the routes go in before they open); RSS: VmRSS then. {starts} start(s)
        per case, median shown; after the last, a dump checks N routes (and for vxlan N
        neighbours and N FDB entries).""",
    "After a compaction": """With the daemon SIGSTOPped, etcd is restarted (the daemon's watch
        stream breaks), one peer's lease is deleted and a new peer's written, and the history is
        compacted to the current revision; then SIGCONT. The daemon cannot resume its watch: it
        lists all N leases again, diffs them by key and value and reconciles. The figure is
        SIGCONT to both changes seen in the kernel; it includes the watcher's first back-off
        (0.1 s) and the store client's reconnection. (A re-list that finds nothing changed starts
        no reconcile: the next would be the periodic resync.)""",
    "Throughput": """iperf3 (Debian), one TCP stream for {seconds:g} s, the receiver's rate:
        from a pod on n1 to a pod on n3 (both made through `bin/moor` exec'd in the node netns),
        and from n1's eth0 to n3's eth0 over the same underlay bridge, alternating test by test,
        {rounds} of each per backend; medians.""",
}


def how_measured(fig: ClusterFigures) -> list[str]:
    p = fig.params
    values = {
        **p,
        "underlay": ADDRESSES.underlay,
        "pods": POD_NETWORK,
        "network": RECONCILE_NETWORK,
    }
    return [f"**{name}.** " + " ".join(text.split()).format(**values) for name, text in HOW.items()]


def load_note(fig: ClusterFigures) -> str:
    if not fig.load:
        return ""
    return f"Load average (1 min) at start → end: {' → '.join(f'{x:.1f}' for x in fig.load)}."


def section(fig: ClusterFigures, table: list[ClusterRow], env: dict[str, str], command: str) -> str:
    extra = details(fig)
    return "\n".join(
        [
            START,
            "## Cluster: routes between nodes (host-gw, vxlan) and pod-to-pod throughput",
            "",
            f"Measured {env['date']} with `{command}` on {env['kernel']}, {env['cpus']} CPUs. "
            f"Python {env['python']}; store: {env['etcd']}; iperf3 {env['iperf3']}. "
            f"{load_note(fig)}".rstrip(),
            "",
            report.markdown_table(table, HEADER),
            "",
            *[f"- {line}" for line in extra],
            *([""] if extra else []),
            *[line for para in how_measured(fig) for line in (para, "")][:-1],
            END,
        ]
    )
