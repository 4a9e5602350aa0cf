"""`python -m bench`: set up, measure, tear down (always, also on Ctrl-C or SIGTERM), report.

Four parts, each with its own section of BENCHMARKS.md: the CNI plugin against the reference
bridge + host-local (bench/cni_bench.py), then the IPAM daemon on etcd against host-local
(bench/ipam_bench.py), then the routes between nodes and the traffic over them on a simulated
cluster (bench/cluster_bench.py), then fixed pod IPs: a sticky pod's move and the /32s of many
fixed IPs (bench/fixed_bench.py); `--only cni|ipam|cluster|fixed` runs one. The CNI part
measures moor through build/moor, the static shim the node image installs (`--shim python`:
through bin/moor, the Python shim).

Exit status: 0 when every call succeeded and the host is clean (whether or not the targets
are met), 1 when a call failed, the run broke or something could not be removed, 2 on bad
usage, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import cluster_bench, fixed_bench, ipam_bench, report
from bench.cni_bench import Bench, Figures, container_ids, startup_floor
from bench.harness import (
    IP_FORWARD,
    MOOR_NETNS,
    REF_NETNS,
    Host,
    MoorDaemon,
    moor_plugin,
    no_interrupts,
    reference_plugin,
    sigterm_as_interrupt,
)
from tests.helpers import shims

DEFAULTS = {"pods": 50, "sizes": [10, 100], "rounds": 5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--pods", type=int, default=DEFAULTS["pods"], help="pods per plugin, sequential"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULTS["rounds"],
        help="rounds of concurrent bursts (median)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CNI: 10 pods, 10-concurrent only, 1 round; IPAM: smaller counts, 1 round; "
        "cluster: 10 joins, 1000 leases, 1 round; fixed: 5 moves, 1000 fixed IPs, 1 start",
    )
    parser.add_argument(
        "--only",
        choices=("cni", "ipam", "cluster", "fixed"),
        help="run one part (default: CNI, then IPAM, then cluster, then fixed)",
    )
    parser.add_argument(
        "--shim",
        choices=shims.KINDS,
        default="static",
        help="CNI: the moor executable to exec: build/moor, the static Go binary the image "
        "installs (default), or bin/moor, the Python shim",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="daemon at debug level; split moor's latency into handler and shim (implies --no-write)",
    )
    args = parser.parse_args(argv)
    args.sizes = list(DEFAULTS["sizes"])
    if args.quick:
        args.pods, args.rounds, args.sizes = 10, 1, [10]
    if args.pods < 2 or args.rounds < 1:
        parser.error("--pods must be at least 2 and --rounds at least 1")
    args.no_write = args.no_write or args.diagnose
    return args


def say(message: str) -> None:
    """Progress line; a closed stdout (`| head`) must not abort the run before its clean-up."""
    try:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    except OSError:
        pass


@dataclass
class Run:
    """What survives the tear-down, for the report."""

    figures: Figures | None = None
    daemon_log: str = ""
    startup: dict[str, float] = field(default_factory=dict)


def measure(args: argparse.Namespace, host: Host, workdir: Path, run: Run) -> None:
    """Everything between set-up and tear-down; the daemon is stopped whatever happens."""
    daemon = MoorDaemon(workdir / "moor", log_level="debug" if args.diagnose else "warning")
    try:
        count = max(args.pods, *args.sizes)
        say(f"creating {2 * count} netns ({MOOR_NETNS}N, {REF_NETNS}N)")
        host.make_netns([f"{p}{i}" for i in range(count) for p in (MOOR_NETNS, REF_NETNS)])
        say("starting moor-ipamd")
        daemon_cpu = daemon.start()
        shim = shims.path(args.shim)
        moor, reference = moor_plugin(daemon, shim), reference_plugin(workdir / "host-local")
        if args.diagnose:
            say("start-up floor: VERSION calls (both shims)")
            other = next(k for k in shims.KINDS if k != args.shim)
            floor = dataclasses.replace(moor, key=f"moor {other}", path=shims.path(other))
            run.startup = startup_floor([moor, reference, floor])
        bench = Bench(moor, reference, daemon_cpu)
        run.figures = bench.run(args.pods, args.sizes, args.rounds, say)
    finally:
        with no_interrupts():
            daemon.stop()
            run.daemon_log = (
                daemon.log_path.read_text(errors="replace") if daemon.log_path.exists() else ""
            )


def print_report(args: argparse.Namespace, run: Run, table: list[report.Row]) -> None:
    assert run.figures is not None
    print()
    print(report.text_table(table))
    for line in report.details(run.figures):
        print(line)
    if args.diagnose:
        print("\nmoor latency split, from the daemon debug log (handler = its per-request time):")
        for line in report.handler_breakdown(run.figures, run.daemon_log):
            print(line)
        floors = ", ".join(
            f"{f'moor {args.shim}' if key == 'moor' else key} {s * 1000:.1f} ms"
            for key, s in run.startup.items()
        )
        print(f"  VERSION exec p50 (start-up floor): {floors}")
    noise = [
        line for line in run.daemon_log.splitlines() if " WARNING " in line or " ERROR " in line
    ]
    if noise:
        print(f"\nmoor-ipamd logged {len(noise)} warning(s)/error(s); the first ones:")
        for line in noise[:5]:
            print(f"  {line[:300]}")
    if run.figures.failures:
        print(f"\n{len(run.figures.failures)} CNI call(s) failed; the first ones:", file=sys.stderr)
        for f in run.figures.failures[:10]:
            print(f"  {f.plugin} {f.command} {f.container_id}: {f.reason}", file=sys.stderr)


def run_cni(args: argparse.Namespace, command: str) -> int:
    reference_ids = container_ids("reference", args.pods, args.sizes, args.rounds)
    reference_ids |= container_ids("reference", **DEFAULTS)  # a killed default run's
    host = Host()
    stale = host.leftovers(reference_ids)
    if stale:
        say(f"removing {len(stale)} leftover(s) of an earlier run, e.g. {stale[0]}")
        host.cleanup(reference_ids)
    workdir = Path(tempfile.mkdtemp(prefix="mbn-bench-"))
    run, status = Run(), 0
    try:
        with sigterm_as_interrupt():
            measure(args, host, workdir, run)
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as exc:  # noqa: BLE001 - reported after the clean-up below
        say(f"bench failed: {exc!r}")
        status = 1
    finally:
        with no_interrupts():
            problems = host.cleanup(reference_ids)
            shutil.rmtree(workdir, ignore_errors=True)
            say("cleaned up")
    for problem in problems:
        print(f"NOT CLEANED UP: {problem}", file=sys.stderr)
    if problems and not status:
        status = 1
    if run.figures is None:
        return status or 1

    table = report.rows(run.figures)
    print_report(args, run, table)
    if run.figures.failures:
        status = status or 1
    if args.no_write or status:
        print("\nBENCHMARKS.md not updated")
        return status
    shim = shims.path(args.shim)
    env = report.environment(shim)
    report.write_benchmarks(report.section(run.figures, table, env, command, shim))
    print(f"\nwrote {report.BENCHMARKS}")
    return 0


def run_ipam(args: argparse.Namespace, command: str) -> int:
    """The IPAM part: etcd + moor-ipamd processes vs host-local; its own BENCHMARKS.md section."""
    params = dict(ipam_bench.QUICK if args.quick else ipam_bench.DEFAULTS)
    stale = ipam_bench.leftovers()
    if stale:
        say(f"removing {len(stale)} leftover(s) of an earlier IPAM run, e.g. {stale[0]}")
        ipam_bench.cleanup_host()
    workdir = Path(tempfile.mkdtemp(prefix="mbi-bench-"))
    forward_before = IP_FORWARD.read_text()  # daemons may turn forwarding on; put it back
    fig, status = ipam_bench.IpamFigures(params), 0
    try:
        with sigterm_as_interrupt():
            ipam_bench.run(fig, workdir, say)
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as exc:  # noqa: BLE001 - reported after the clean-up
        say(f"IPAM bench failed: {exc!r}")
        status = 1
    finally:
        with no_interrupts():
            shutil.rmtree(workdir, ignore_errors=True)
            IP_FORWARD.write_text(forward_before)
            fig.failures += [f"NOT CLEANED UP: {x}" for x in ipam_bench.leftovers()]
            say("IPAM part cleaned up")
    table = ipam_bench.rows(fig)
    if table:
        print()
        print(ipam_bench.text_table(table))
        for line in [*ipam_bench.details(fig), ipam_bench.load_note(fig)]:
            print(f"  {line}")
    if fig.daemon_warnings:
        print(
            f"\nmoor-ipamd logged {len(fig.daemon_warnings)} warning(s)/error(s); the first ones:"
        )
        for line in fig.daemon_warnings[:5]:
            print(f"  {line[:300]}")
    for failure in fig.failures:
        print(failure, file=sys.stderr)
    status = status or (1 if fig.failures else 0)
    if args.no_write or status:
        print("\nBENCHMARKS.md IPAM section not updated")
        return status
    env = {**report.environment(), "etcd": ipam_bench.etcd_package()}
    section = ipam_bench.section(fig, table, env, command)
    report.write_benchmarks(section, markers=(ipam_bench.START, ipam_bench.END))
    print(f"\nwrote the IPAM section of {report.BENCHMARKS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("the bench needs root (netns, bridges, iptables)", file=sys.stderr)
        return 2
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    status = 0
    if args.only in (None, "cni"):
        status = run_cni(args, command)
        if status == 130:
            return status
    if args.only in (None, "ipam"):
        status = run_ipam(args, command) or status
        if status == 130:
            return status
    if args.only in (None, "cluster"):
        status = cluster_bench.run_part(args.quick, args.no_write, command, say) or status
        if status == 130:
            return status
    if args.only in (None, "fixed"):
        status = fixed_bench.run_part(args.quick, args.no_write, command, say) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
