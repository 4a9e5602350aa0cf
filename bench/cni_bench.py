"""The measurements: sequential ADD/CHECK/DEL, concurrent ADD/DEL bursts, and CPU per ADD.

Every phase alternates the two plugins op by op (or burst by burst), swapping which one goes
first each time, so load from elsewhere on the machine lands on both alike and only ratios taken
within one run are compared.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness import Exec, Plugin, ProcessCpu


@dataclass
class Failure:
    plugin: str
    command: str
    container_id: str
    reason: str


@dataclass
class Sample:
    """One phase (sequential, or one burst) of one plugin."""

    seconds: list[float]  # latency of each op
    cpu: float  # CPU seconds per op, everything included
    daemon_cpu: float = 0.0  # the moor-ipamd share of `cpu` (0 for the reference)
    wall: float = 0.0  # bursts: first start to last finish

    @property
    def exec_cpu(self) -> float:
        """CPU per op of the exec'd processes alone (moor: the shim)."""
        return self.cpu - self.daemon_cpu


@dataclass
class PluginFigures:
    """Raw samples for one plugin; report.py turns them into the table."""

    sequential: dict[str, Sample] = field(default_factory=dict)  # by command
    bursts: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)  # one per round


@dataclass
class Figures:
    pods: int
    sizes: list[int]
    rounds: int
    plugins: dict[str, PluginFigures]
    failures: list[Failure]
    # container ID -> (command -> exec seconds), moor only, to pair with the daemon's debug log
    moor_ops: dict[str, dict[str, float]] = field(default_factory=dict)


def container_id(plugin_key: str, tag: str, index: int) -> str:
    return f"mbn-{tag}-{plugin_key[0]}-{index}"


def container_ids(plugin_key: str, pods: int, sizes: list[int], rounds: int) -> set[str]:
    """Every container ID a run with these parameters uses for one plugin (for clean-up)."""
    ids = {container_id(plugin_key, "warm", 0)}
    ids |= {container_id(plugin_key, "seq", i) for i in range(pods)}
    for r in range(rounds):
        for size in sizes:
            ids |= {container_id(plugin_key, f"c{size}r{r}", i) for i in range(size)}
    return ids


class Bench:
    def __init__(self, moor: Plugin, reference: Plugin, daemon_cpu: ProcessCpu) -> None:
        self.moor = moor
        self.reference = reference
        self.daemon_cpu = daemon_cpu
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self.moor_ops: dict[str, dict[str, float]] = {}

    def _order(self, turn: int) -> tuple[Plugin, Plugin]:
        return (self.moor, self.reference) if turn % 2 == 0 else (self.reference, self.moor)

    def _call(self, plugin: Plugin, command: str, container_id: str, index: int) -> Exec:
        done = plugin.call(command, container_id, index)
        with self._lock:
            if done.rc != 0:
                self.failures.append(Failure(plugin.key, command, container_id, done.error()))
            if plugin is self.moor:
                self.moor_ops.setdefault(container_id, {})[command] = done.seconds
        return done

    @staticmethod
    def cid(plugin: Plugin, tag: str, index: int) -> str:
        return container_id(plugin.key, tag, index)

    def warm_up(self) -> None:
        """One ADD and DEL per plugin, not counted: page cache, moor's bridge and masq chain."""
        for plugin in (self.moor, self.reference):
            cid = self.cid(plugin, "warm", 0)
            self._call(plugin, "ADD", cid, 0)
            self._call(plugin, "DEL", cid, 0)

    def _daemon_seconds(self, plugin: Plugin) -> float:
        return self.daemon_cpu.seconds() if plugin is self.moor else 0.0

    def sequential(self, pods: int, figures: dict[str, PluginFigures]) -> None:
        """ADD all pods, then CHECK all, then DEL all; one op of each plugin in turn.

        The daemon's CPU is taken over the whole phase, so its background work in that window
        (timers) counts against moor too."""
        for command in ("ADD", "CHECK", "DEL"):
            done: dict[str, list[Exec]] = {"moor": [], "reference": []}
            daemon_before = self.daemon_cpu.seconds()
            for i in range(pods):
                for plugin in self._order(i):
                    done[plugin.key].append(
                        self._call(plugin, command, self.cid(plugin, "seq", i), i)
                    )
            daemon = (self.daemon_cpu.seconds() - daemon_before) / pods
            for key, execs in done.items():
                own = sum(e.cpu for e in execs) / pods
                extra = daemon if key == "moor" else 0.0
                figures[key].sequential[command] = Sample(
                    [e.seconds for e in execs], own + extra, extra
                )

    def _burst(self, plugin: Plugin, command: str, tag: str, size: int) -> Sample:
        """Run `size` calls at once, one thread each, released together; wall = first start to
        last finish. An interruption releases and joins every thread before it propagates."""
        go = threading.Event()
        abort = threading.Event()
        done: list[Exec | None] = [None] * size
        ends: list[float] = [0.0] * size

        def one(i: int) -> None:
            go.wait()
            if abort.is_set():
                return
            cid = self.cid(plugin, tag, i)
            try:
                done[i] = self._call(plugin, command, cid, i)
            except Exception as exc:  # noqa: BLE001 - a harness error counts as a failed call
                with self._lock:
                    self.failures.append(Failure(plugin.key, command, cid, repr(exc)))
            ends[i] = time.perf_counter()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
        for t in threads:
            t.start()
        daemon_before = self._daemon_seconds(plugin)
        try:
            started = time.perf_counter()
            go.set()
            for t in threads:
                t.join()
        except BaseException:
            abort.set()
            go.set()
            for t in threads:
                t.join()
            raise
        wall = max(ends) - started
        daemon = (self._daemon_seconds(plugin) - daemon_before) / size
        execs = [e for e in done if e is not None]
        own = sum(e.cpu for e in execs) / size
        return Sample([e.seconds for e in execs], own + daemon, daemon, wall)

    def concurrent(self, sizes: list[int], rounds: int, figures: dict[str, PluginFigures]) -> None:
        """Per round and size: each plugin in turn bursts `size` ADDs, then `size` DELs."""
        turn = 0
        for r in range(rounds):
            for size in sizes:
                for plugin in self._order(turn):
                    for command in ("ADD", "DEL"):
                        sample = self._burst(plugin, command, f"c{size}r{r}", size)
                        figures[plugin.key].bursts.setdefault((command, size), []).append(sample)
                turn += 1

    def run(
        self, pods: int, sizes: list[int], rounds: int, progress: Callable[[str], None]
    ) -> Figures:
        figures = {"moor": PluginFigures(), "reference": PluginFigures()}
        progress("warm-up ADD/DEL per plugin")
        self.warm_up()
        progress(f"sequential ADD, CHECK, DEL of {pods} pods per plugin, interleaved")
        self.sequential(pods, figures)
        if sizes:
            progress(f"concurrent ADD+DEL bursts of {sizes}, {rounds} round(s), alternating")
            self.concurrent(sizes, rounds, figures)
        return Figures(pods, sizes, rounds, figures, self.failures, self.moor_ops)


def startup_floor(plugins: list[Plugin], runs: int = 30) -> dict[str, float]:
    """p50 seconds of a VERSION call per plugin: exec + start-up, no daemon and no netlink.

    For moor that is the shim's start-up (bin/moor's: its interpreter's); interleaved like
    everything else."""
    samples: dict[str, list[float]] = {p.key: [] for p in plugins}
    for i in range(runs):
        for plugin in plugins if i % 2 == 0 else plugins[::-1]:
            samples[plugin.key].append(plugin.call("VERSION", "", 0).seconds)
    return {key: p50(values) for key, values in samples.items()}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]
