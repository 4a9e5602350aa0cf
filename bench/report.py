"""The results table (stdout and BENCHMARKS.md) and the optional moor time breakdown."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.cni_bench import Figures, p50, p90
from bench.harness import REPO
from tests.helpers import shims

BENCHMARKS = REPO / "BENCHMARKS.md"
START, END = "<!-- bench:cni:start -->", "<!-- bench:cni:end -->"
HANDLER_LINE = re.compile(r" (ADD|CHECK|DEL) (\S+)/(\S+) -> (-?\d+) in ([0-9.]+) ms")


@dataclass
class Row:
    figure: str
    moor: float | None
    reference: float | None
    target: float | None = None  # max moor/reference ratio; None = reported only

    @property
    def ratio(self) -> float | None:
        if self.moor is None or not self.reference:
            return None
        return self.moor / self.reference

    @property
    def met(self) -> str:
        if self.target is None:
            return "—"
        if self.ratio is None:
            return "not run"
        return "yes" if self.ratio <= self.target else "**NO**"

    def cells(self) -> list[str]:
        def num(v: float | None) -> str:
            return "—" if v is None else f"{v:.1f}"

        return [
            self.figure,
            num(self.moor),
            num(self.reference),
            "—" if self.ratio is None else f"{self.ratio:.2f}×",
            "—" if self.target is None else f"≤ {self.target:g}×",
            self.met,
        ]


def rows(fig: Figures) -> list[Row]:
    """The table; times in ms. Burst walls are the median over the rounds."""
    m, r = fig.plugins["moor"], fig.plugins["reference"]
    out: list[Row] = []
    targets = {("ADD", "p50"): 0.8, ("DEL", "p50"): 0.3}  # DEL: issue 12 §6
    for command in ("ADD", "CHECK", "DEL"):
        for name, stat in (("p50", p50), ("p90", p90)):
            out.append(
                Row(
                    f"{command} {name} (ms, {fig.pods} pods)",
                    stat(m.sequential[command].seconds) * 1000,
                    stat(r.sequential[command].seconds) * 1000,
                    targets.get((command, name)),
                )
            )
    for size in (10, 100):
        for command, target in (("ADD", 0.5 if size == 100 else None), ("DEL", None)):
            walls = [
                p50([s.wall for s in pf.bursts[(command, size)]]) * 1000
                if (command, size) in pf.bursts
                else None
                for pf in (m, r)
            ]
            out.append(Row(f"{size} concurrent {command}s, wall (ms)", *walls, target))
    for command, target in (("ADD", 1.0), ("DEL", None)):
        out.append(
            Row(
                f"CPU per {command} (CPU ms)",
                m.sequential[command].cpu * 1000,
                r.sequential[command].cpu * 1000,
                target,
            )
        )
    return out


HEADER = ["figure", "moor", "reference", "ratio", "target", "met?"]


class TableRow(Protocol):
    def cells(self) -> list[str]: ...


def markdown_table(table: Sequence[TableRow], header: list[str] = HEADER) -> str:
    """Any bench table whose rows have `cells()`: the CNI one, and the IPAM part's."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in table]
    return "\n".join(lines)


def text_table(table: Sequence[TableRow], header: list[str] = HEADER) -> str:
    """The same table for a terminal: aligned, without markdown emphasis or code marks."""
    plain = [[c.replace("**", "").replace("`", "") for c in row.cells()] for row in table]
    cells = [header, *plain]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    fmt = [
        line[0].ljust(widths[0])
        + "".join("  " + c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))
        for line in cells
    ]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


def details(fig: Figures) -> list[str]:
    """Stdout only: CPU split, per-round burst walls, op latency and CPU inside bursts."""
    m, r = fig.plugins["moor"], fig.plugins["reference"]
    lines = []
    for command in ("ADD", "DEL"):
        ms, rs = m.sequential[command], r.sequential[command]
        lines.append(
            f"  sequential {command} CPU ms/op: moor {ms.cpu * 1000:.1f} = shim "
            f"{ms.exec_cpu * 1000:.1f} + daemon {ms.daemon_cpu * 1000:.1f}; "
            f"reference {rs.cpu * 1000:.1f}"
        )
    for key in sorted(m.bursts, key=lambda k: (k[1], k[0])):
        parts = []
        for name, pf in fig.plugins.items():
            samples = pf.bursts[key]
            walls = ", ".join(f"{s.wall * 1000:.0f}" for s in samples)
            ops = p50([x for s in samples for x in s.seconds]) * 1000
            cpu = p50([s.cpu for s in samples]) * 1000
            split = ""
            if name == "moor":
                split = (
                    f" = shim {p50([s.exec_cpu for s in samples]) * 1000:.1f}"
                    f" + daemon {p50([s.daemon_cpu for s in samples]) * 1000:.1f}"
                )
            parts.append(f"{name} wall [{walls}] op p50 {ops:.0f}, CPU ms/op {cpu:.1f}{split}")
        lines.append(f"  {key[1]:>3} concurrent {key[0]:<3}: " + "; ".join(parts))
    return lines


# -- environment ------------------------------------------------------------------------------


def reference_version() -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "containernetworking-plugins"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return proc.stdout.strip() or "unknown version"


def _short(path: str) -> str:
    """A path relative to the repo when it is inside it (the venv), else as is."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def environment(shim: Path | None = None) -> dict[str, str]:
    """Where a part ran; `shim`: the CNI executable the CNI part measured."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": f"Linux {platform.release()} {platform.machine()}",
        "cpus": str(os.cpu_count()),
        "python": f"{platform.python_version()} (`{_short(sys.executable)}`, bench and moor-ipamd)",
        **({"shim": shims.describe(shim)} if shim else {}),
        "reference": f"Debian containernetworking-plugins {reference_version()}",
    }


def how_measured(fig: Figures, shim: str = "build/moor") -> str:
    bursts = (
        f"Bursts of {' and '.join(map(str, fig.sizes))} concurrent ADDs (one thread per call, all "
        f"released together; wall = first start to last exit), each followed by a burst of their "
        f"DELs, one plugin after the other with the first alternating, {fig.rounds} round(s); "
        f"the table shows the median round."
    )
    return (
        "Both plugins run in one process of `python -m bench`, driven by the same harness: each "
        f"CNI call is a direct `posix_spawn` of the plugin executable (`{shim}`, or "
        "`/usr/lib/cni/bridge` with host-local IPAM) with the CNI_* environment and the netconf "
        "on stdin, and CHECK/DEL get the ADD result as prevResult, as libcni passes it; "
        "latency is spawn to reap. Both have ipMasq on (moor: one node-wide nat chain; the "
        "reference: a chain per container). The netns are created before timing, and one "
        "warm-up ADD/DEL per plugin is not counted. Sequential phases (ADD of all pods, then "
        f"CHECK, then DEL; {fig.pods} pods per plugin) alternate moor and the reference op by op, "
        f"swapping who goes first, so machine noise hits both alike. {bursts} CPU per op: "
        "for the reference, user+sys of each plugin process and everything it spawned and "
        "waited for (host-local, iptables), from `wait4`; for moor, the same for the shim plus "
        "the moor-ipamd daemon's CPU over the whole phase (its CPU-time clock, plus any "
        "children it reaped), so daemon background work in that window counts against moor. "
        "moor-ipamd runs with `--log-level warning`, SQLite store, default cooldown."
    )


def cpu_split(fig: Figures) -> str:
    """Where moor's CPU per sequential op goes: the exec'd shim vs the daemon."""
    parts = [
        f"{command} {s.exec_cpu * 1000:.1f} + {s.daemon_cpu * 1000:.1f}"
        for command in ("ADD", "CHECK", "DEL")
        for s in [fig.plugins["moor"].sequential[command]]
    ]
    return "moor CPU ms per sequential op, shim + daemon: " + "; ".join(parts) + "."


def section(fig: Figures, table: list[Row], env: dict[str, str], command: str, shim: Path) -> str:
    return "\n".join(
        [
            START,
            "## CNI plugin: moor vs the reference bridge + host-local",
            "",
            f"Measured {env['date']} with `{command}` on {env['kernel']}, {env['cpus']} CPUs. "
            f"Python {env['python']}; moor shim: {env['shim']}; "
            f"reference: {env['reference']}. Times in ms; ratio = moor / reference.",
            "",
            markdown_table(table),
            "",
            cpu_split(fig),
            "",
            f"**How measured.** {how_measured(fig, str(shim.relative_to(REPO)))}",
            END,
        ]
    )


def write_benchmarks(
    text: str, path: Path = BENCHMARKS, markers: tuple[str, str] = (START, END)
) -> None:
    """Replace one bench-owned section (the CNI one unless `markers` says otherwise), keeping
    everything else in the file; a section not there yet is appended."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start_marker, end_marker = markers
    start, end = old.find(start_marker), old.find(end_marker)
    if start >= 0 and end > start:
        new = old[:start] + text + old[end + len(end_marker) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


# -- diagnosis --------------------------------------------------------------------------------


def handler_breakdown(fig: Figures, daemon_log: str) -> list[str]:
    """Split moor's latency into the daemon handler time (from its debug log) and the rest:
    shim exec + interpreter start-up and exit + socket round trip + waiting for a worker."""
    handler: dict[tuple[str, str], float] = {}
    for match in HANDLER_LINE.finditer(daemon_log):
        command, cid, _ifname, _code, ms = match.groups()
        handler[(command, cid)] = float(ms) / 1000
    groups = [("sequential", "-seq-")] + [(f"{n} concurrent", f"-c{n}r") for n in fig.sizes]
    lines = []
    for label, tag in groups:
        for command in ("ADD", "CHECK", "DEL"):
            total, inside, outside = [], [], []
            for cid, ops in fig.moor_ops.items():
                if tag in cid and command in ops and (command, cid) in handler:
                    total.append(ops[command])
                    inside.append(handler[(command, cid)])
                    outside.append(ops[command] - handler[(command, cid)])
            if not inside:
                continue
            lines.append(
                f"  {label} {command}: exec p50 {p50(total) * 1000:.1f} ms; daemon handler p50 "
                f"{p50(inside) * 1000:.1f} (p90 {p90(inside) * 1000:.1f}); outside the handler "
                f"p50 {p50(outside) * 1000:.1f} (p90 {p90(outside) * 1000:.1f})"
            )
    return lines or ["  no handler times in the daemon log (was it at debug level?)"]
