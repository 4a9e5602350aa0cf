"""IPAM benchmarks (issue 8): moor-ipamd on a real etcd over gRPC, beside the reference host-local.

One function per figure:
- `sequential`: Allocate (and Release) latency, one call at a time, moor and host-local alternating
  op by op;
- `throughput`: 1000 Allocate then 1000 Release with 32 concurrent callers against one daemon, and
  the same count of host-local ADD/DEL execs 32 at a time, alternating round by round;
- `multi_daemon`: 10 daemons on one etcd, 1000 pod IPs allocated at once; host-local beside it
  with 10 data dirs (one per simulated node);
- `scale_sim`: etcd preloaded with 5000 node leases and 200k pod allocations, then a restarting
  node's daemon: start to ready, RSS, `moorctl ips --node` latency.

Everything the IPAM part creates carries the `mbi` prefix: nodes `mbi0`..`mbi9` and `mbi-scale`,
bridges `mbibr0`..`mbibr9` (only created by a CNI ADD, which the gRPC figures never make), nat
chains `MBI*-MASQ`, CNI network names `mbi-*`, the etcd member `mbi-bench`, temp dir `mbi-bench-*`.
Every process (etcd, daemons) is stopped by PID, also on failure or Ctrl-C, and dies with the bench
(PR_SET_PDEATHSIG) if the bench itself is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from bench import report
from bench.harness import (
    PLUGIN_PATH_ENV,
    REFERENCE_DIR,
    REPO,
    ProcessCpu,
    _die_with_parent,
    no_interrupts,
    run_plugin,
    sh,
)
from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from ipamd.model import Allocation, Owner, SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.store.base import Compare, Delete, Put
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from tests.helpers.etcd import ETCD_BINARY, EtcdServer
from tests.helpers.moor import Daemon

HOST_LOCAL = REFERENCE_DIR / "host-local"
NODE_PREFIX, BRIDGE_PREFIX = "mbi", "mbibr"
ALLOC_NETWORK = "10.236.0.0/16"  # moor, allocation figures (10 daemons x /24, more as they fill)
REF_NETWORK = "10.235.0.0/16"  # host-local, one node
REF_NODE_SUBNET = "10.234.{i}.0/24"  # host-local, node i of the 10-node figure
SCALE_NETWORK, SCALE_SUBNET_LEN = "10.0.0.0/8", 24  # 65536 subnets
SCALE_NODE = "mbi-scale"
CNI_NETWORK = "mbi-net"  # the owner network of moor's allocations
SIM_NETWORK = "mbi-sim"  # ... of the preloaded ones
KEY_ROOT = "/mbi-bench"
ETCD_TXN_OPS = 128  # etcd's default --max-txn-ops
PRELOAD_WRITERS = 8
SIM_LEASE_TTL = 24 * 3600  # the daemon's default --lease-ttl: leases of live nodes
RPC_TIMEOUT = 60.0

DEFAULTS: dict[str, int] = {
    "seq": 200,  # sequential ops per side
    "count": 1000,  # Allocate (then Release) per throughput round
    "callers": 32,
    "rounds": 3,  # throughput and 10-daemon rounds (median)
    "daemons": 10,
    "multi": 1000,  # IPs over the daemons
    "nodes": 5000,  # scale sim: node leases
    "per_node": 40,  # ... allocations per node subnet (200k)
    "starts": 3,  # scale sim: daemon starts (median)
    "ctl_runs": 10,  # moorctl runs (p50)
}
QUICK: dict[str, int] = {
    **DEFAULTS,
    "seq": 30,
    "count": 200,
    "rounds": 1,
    "multi": 200,
    "nodes": 500,
    "starts": 1,
    "ctl_runs": 3,
}

TARGETS = {
    "alloc_p50_ms": 3.0,
    "allocs_per_s": 1000.0,
    "multi_wall_s": 5.0,
    "scale_start_s": 5.0,
    "scale_rss_mb": 150.0,
}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


# -- processes ---------------------------------------------------------------------------------


class BenchEtcd(EtcdServer):
    """The tests' etcd, started so that it dies with the bench (PR_SET_PDEATHSIG)."""

    def spawn(self, argv: list[str], log: BinaryIO) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


class IpamDaemon(Daemon):
    """A real moor-ipamd on the bench's etcd, at warning level, timed from spawn to ready."""

    def __init__(self, workdir: Path, name: str, bridge: str, network: str, **kw: Any) -> None:
        super().__init__(
            workdir=workdir, name=name, network=network, bridge=bridge, fault_injection=False, **kw
        )
        self.channel: grpc.Channel | None = None
        self._spawned = 0.0
        self.stub: ipam_pb2_grpc.IpamStub | None = None

    def argv(self) -> list[str]:
        # The tests' argv always says debug and turns fault injection on; the last flag wins.
        argv = [a for a in super().argv() if a != "--enable-fault-injection"]
        return [*argv, "--log-level", "warning"]

    def start(self, timeout: float = 60.0) -> float:
        """Spawn it; return seconds from spawn until its gRPC Status answers ready."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Only from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked the
        child exits, so a daemon spawned from a pool thread would be killed with that thread."""
        assert threading.current_thread() is threading.main_thread()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.grpc_socket)  # a stale socket would look like readiness
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            self._spawned = time.perf_counter()
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from spawn until `Ipam.Status` answers ready (polled every 5 ms)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.grpc_socket):
            self._check_alive(deadline)
            time.sleep(0.005)
        self.channel = grpc.insecure_channel(f"unix:{self.grpc_socket}")
        self.stub = ipam_pb2_grpc.IpamStub(self.channel)
        while True:
            self._check_alive(deadline)
            with contextlib.suppress(grpc.RpcError):
                if self.stub.Status(ipam_pb2.StatusRequest(), timeout=5).ready:
                    return time.perf_counter() - self._spawned
            time.sleep(0.005)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{self.name} not ready in time:\n{self.log_tail()}")

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the daemon, in kB."""
        assert self.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None
        super().stop()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def warnings(self) -> list[str]:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
        return []

    def allocate(self, container_id: str, network: str = CNI_NETWORK) -> str:
        assert self.stub is not None
        r = self.stub.Allocate(
            ipam_pb2.AllocateRequest(
                owner=ipam_pb2.Owner(network=network, container_id=container_id, ifname="eth0")
            ),
            timeout=RPC_TIMEOUT,
        )
        return r.allocation.ip

    def release(self, container_id: str, network: str = CNI_NETWORK) -> None:
        assert self.stub is not None
        r = self.stub.Release(
            ipam_pb2.ReleaseRequest(
                handle=ipam_pb2.Handle(network=network, container_id=container_id, ifname="eth0")
            ),
            timeout=RPC_TIMEOUT,
        )
        if not r.released:
            raise RuntimeError(f"Release of {container_id} released nothing")


def moorctl(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The admin CLI as an operator runs it (`moorctl` is `python -m ipamd.cli` of the venv)."""
    return subprocess.run(
        [sys.executable, "-m", "ipamd.cli", "--socket", socket, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the reference: host-local, exec'd per IP --------------------------------------------------


class HostLocal:
    """host-local as a runtime would exec it for one network: its own data dir and subnet.

    host-local needs CNI_NETNS set but never enters it, so any existing path does."""

    def __init__(self, data_dir: Path, name: str, subnet: str) -> None:
        self._lock = threading.Lock()
        self.cpu_seconds = 0.0  # user + sys of every exec so far (and what it waited for)
        self.conf = json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": name,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(data_dir),
                    "ranges": [[{"subnet": subnet}]],
                },
            }
        ).encode()

    def call(self, command: str, container_id: str) -> float:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": "/proc/self/ns/net",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(REFERENCE_DIR),
            "PATH": PLUGIN_PATH_ENV,
        }
        done = run_plugin(HOST_LOCAL, env, self.conf)
        with self._lock:
            self.cpu_seconds += done.cpu
        if done.rc != 0:
            raise RuntimeError(f"host-local {command} {container_id}: {done.error()}")
        return done.seconds

    def add(self, container_id: str) -> float:
        return self.call("ADD", container_id)

    def delete(self, container_id: str) -> float:
        return self.call("DEL", container_id)


# -- figures -----------------------------------------------------------------------------------


@dataclass
class Burst:
    """`count` ops by concurrent callers: wall from release of the callers to the last op's end."""

    count: int
    wall: float
    latencies: list[float]
    failures: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per op, by process

    @property
    def per_second(self) -> float:
        return (self.count - self.failures) / self.wall if self.wall > 0 else 0.0


@dataclass
class ScaleFigures:
    nodes: int
    allocations: int
    preload_seconds: float
    preload_keys: int
    starts: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    hwm_kb: list[int] = field(default_factory=list)
    own_allocations: int = 0
    ips: list[float] = field(default_factory=list)  # moorctl ips --node mbi-scale, seconds
    ips_other: list[float] = field(default_factory=list)  # ... --node of a sim node
    ips_rows: int | None = None
    ips_note: str = ""  # why there is no `ips` figure
    status: list[float] = field(default_factory=list)  # moorctl status, seconds
    list_rpc: list[float] = field(default_factory=list)  # Admin.ListAllocations(node) alone
    churn: int = 0  # allocations (+ releases) made for other nodes while mbi-scale ran
    churn_cpu: float | None = None  # mbi-scale CPU seconds per such allocation + release


@dataclass
class IpamFigures:
    params: dict[str, int]
    seq: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # side -> op -> s
    bursts: dict[str, dict[str, list[Burst]]] = field(default_factory=dict)  # side -> op -> rounds
    multi: dict[str, list[Burst]] = field(default_factory=dict)  # side -> rounds
    multi_starts: list[float] = field(default_factory=list)  # the 10 daemons' start-to-ready
    empty_start: float | None = None  # start-to-ready of the first daemon, empty store
    empty_rss_kb: int | None = None
    scale: ScaleFigures | None = None
    load: list[float] = field(default_factory=list)  # 1-min load average at start and end
    failures: list[str] = field(default_factory=list)
    daemon_warnings: list[str] = field(default_factory=list)


Progress = Callable[[str], None]


def burst(op: Callable[[int], object], count: int, callers: int) -> Burst:
    """`count` calls of `op(i)` by `callers` threads taking i from a shared counter."""
    lock = threading.Lock()
    go = threading.Event()
    state = {"next": 0, "failures": 0, "last": 0.0}
    latencies: list[float] = []
    errors: list[str] = []

    def caller() -> None:
        go.wait()
        while True:
            with lock:
                i = state["next"]
                if i >= count:
                    return
                state["next"] = i + 1
            t0 = time.perf_counter()
            try:
                op(i)
                ok = True
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok = False
                with lock:
                    errors.append(repr(exc)[:300])
            t1 = time.perf_counter()
            with lock:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    state["failures"] += 1
                state["last"] = max(state["last"], t1)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    go.set()
    try:
        for t in threads:
            t.join()
    except BaseException:
        with lock:
            state["next"] = count  # stop handing out work, then wait for the calls in flight
        for t in threads:
            t.join()
        raise
    if errors:
        raise BurstFailed(errors, int(state["failures"]))
    return Burst(count, state["last"] - started, latencies, int(state["failures"]))


class BurstFailed(RuntimeError):
    def __init__(self, errors: list[str], failures: int) -> None:
        super().__init__(f"{failures} call(s) failed, e.g. {errors[0]}")
        self.errors = errors


def warm_up(daemon: IpamDaemon, ref: HostLocal) -> None:
    """A few calls per side, not counted: the gRPC channel connects, page cache, etcd."""
    for i in range(5):
        daemon.allocate(f"mbi-warm-{i}")
        daemon.release(f"mbi-warm-{i}")
        ref.add(f"mbi-warm-{i}")
        ref.delete(f"mbi-warm-{i}")


class EtcdFloor:
    """etcd's own round trips in the allocator's shapes, from the bench process: the floor under
    moor's Allocate (one txn: create-if-absent IP record + handle) and Release (get the handle,
    get the IP record, one txn comparing both), without the gRPC hop and the daemon."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.store = open_store(url)
        self.keys = keys
        self.subnet = ipaddress.ip_network("10.233.0.0/16")

    def _keys(self, container_id: str) -> tuple[Allocation, str, str]:
        index = int(container_id.rsplit("-", 1)[1])
        owner = Owner(CNI_NETWORK, container_id, "eth0")
        a = Allocation(self.subnet.network_address + 2 + index, self.subnet, owner, "mbi", 0.0)
        return a, self.keys.ip(a.ip), self.keys.handle(*owner.handle)

    def allocate(self, container_id: str) -> None:
        a, ip, handle = self._keys(container_id)
        ops = [
            Put(ip, a.to_json()),
            Put(handle, str(a.ip).encode()),
            Delete(self.keys.released(a.ip)),
        ]
        if not self.store.txn([Compare(ip, 0), Compare(handle, 0)], ops).succeeded:
            raise RuntimeError(f"etcd floor: {a.ip} is taken")

    def release(self, container_id: str) -> None:
        a, ip, handle = self._keys(container_id)
        hkv, ikv = self.store.get(handle), self.store.get(ip)
        if hkv is None or ikv is None:
            raise RuntimeError(f"etcd floor: {container_id} holds nothing")
        mark = json.dumps({"releasedAt": time.time(), "node": "mbi"}).encode()
        compares = [Compare(handle, hkv.mod_revision), Compare(ip, ikv.mod_revision)]
        ops = [Delete(handle), Delete(ip), Put(self.keys.released(a.ip), mark)]
        if not self.store.txn(compares, ops).succeeded:
            raise RuntimeError(f"etcd floor: release of {container_id} conflicted")

    def close(self) -> None:
        self.store.close()


def sequential(
    daemon: IpamDaemon, ref: HostLocal, floor: EtcdFloor, n: int, fig: IpamFigures
) -> None:
    """Allocate then Release `n` IPs one at a time; moor, host-local and the bare etcd round
    trips take turns op by op, rotating who goes first, so noise on this machine lands on all
    alike."""
    ops: dict[str, dict[str, Callable[[str], object]]] = {
        "moor": {"alloc": daemon.allocate, "release": daemon.release},
        "reference": {"alloc": ref.add, "release": ref.delete},
        "etcd": {"alloc": floor.allocate, "release": floor.release},
    }
    sides = list(ops)
    for side in sides:
        fig.seq[side] = {"alloc": [], "release": []}
    for op in ("alloc", "release"):
        for i in range(n):
            cid = f"mbi-seq-{i}"
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                t0 = time.perf_counter()
                ops[side][op](cid)
                fig.seq[side][op].append(time.perf_counter() - t0)


CpuReader = Callable[[], dict[str, float]]


def cpu_readers(daemon: IpamDaemon, etcd: EtcdServer, ref: HostLocal) -> dict[str, CpuReader]:
    """Per side, the CPU seconds so far of every process doing its work: moor = the daemon, etcd
    and the bench process (the gRPC client); the reference = the execs and the bench process
    (spawning and reaping them)."""
    assert daemon.proc is not None and etcd.proc is not None
    d, e = ProcessCpu(daemon.proc.pid), ProcessCpu(etcd.proc.pid)
    return {
        "moor": lambda: {"daemon": d.seconds(), "etcd": e.seconds(), "bench": time.process_time()},
        "reference": lambda: {"host-local": ref.cpu_seconds, "bench": time.process_time()},
    }


def metered(read: CpuReader, run: Callable[[], Burst]) -> Burst:
    before = read()
    b = run()
    after = read()
    b.cpu = {k: (after[k] - before[k]) / b.count for k in before}
    return b


def throughput(
    daemon: IpamDaemon,
    ref: HostLocal,
    p: dict[str, int],
    fig: IpamFigures,
    say: Progress,
    cpu: dict[str, CpuReader],
) -> None:
    """Per round: each side in turn allocates `count` IPs with `callers` concurrent callers, then
    releases them the same way; who goes first alternates by round. CPU per op is metered."""
    count, callers = p["count"], p["callers"]
    for side in ("moor", "reference"):
        fig.bursts[side] = {"alloc": [], "release": []}
    for r in range(p["rounds"]):
        sides = ["moor", "reference"] if r % 2 == 0 else ["reference", "moor"]
        for side in sides:
            alloc, free = _ops(daemon if side == "moor" else ref, f"mbi-tp{r}")
            a = metered(cpu[side], lambda alloc=alloc: burst(alloc, count, callers))
            f = metered(cpu[side], lambda free=free: burst(free, count, callers))
            fig.bursts[side]["alloc"].append(a)
            fig.bursts[side]["release"].append(f)
            say(
                f"  round {r + 1} {side}: {a.per_second:.0f} allocations/s, "
                f"{f.per_second:.0f} releases/s"
            )


def _ops(
    side: IpamDaemon | HostLocal, tag: str
) -> tuple[Callable[[int], object], Callable[[int], object]]:
    """(allocate IP number i, release it) for one side, container IDs `<tag>-<i>`."""
    if isinstance(side, IpamDaemon):
        return (lambda i: side.allocate(f"{tag}-{i}")), (lambda i: side.release(f"{tag}-{i}"))
    return (lambda i: side.add(f"{tag}-{i}")), (lambda i: side.delete(f"{tag}-{i}"))


def fan_out_allocate(daemons: list[IpamDaemon], count: int, tag: str) -> Burst:
    """`count` Allocate calls spread round-robin over the daemons, all in flight at once (gRPC
    futures, one channel per daemon); wall = first call issued to last answer."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"left": count, "last": 0.0}
    latencies: list[float] = []
    errors: list[str] = []

    def finished(fut: grpc.Future, t0: float) -> None:
        t1 = time.perf_counter()
        exc = fut.exception()
        with lock:
            if exc is None:
                latencies.append(t1 - t0)
            else:
                errors.append(repr(exc)[:300])
            state["last"] = max(state["last"], t1)
            state["left"] -= 1
            if state["left"] == 0:
                done.set()

    futures = []
    started = time.perf_counter()
    for i in range(count):
        d = daemons[i % len(daemons)]
        assert d.stub is not None
        owner = ipam_pb2.Owner(network=CNI_NETWORK, container_id=f"{tag}-{i}", ifname="eth0")
        t0 = time.perf_counter()
        fut = d.stub.Allocate.future(ipam_pb2.AllocateRequest(owner=owner), timeout=RPC_TIMEOUT)
        fut.add_done_callback(lambda f, t0=t0: finished(f, t0))
        futures.append(fut)
    try:
        if not done.wait(RPC_TIMEOUT + 30):
            raise RuntimeError(f"{state['left']} Allocate call(s) never answered")
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    if errors:
        raise BurstFailed(errors, len(errors))
    return Burst(count, state["last"] - started, latencies, 0)


def multi_daemon(
    daemons: list[IpamDaemon],
    refs: list[HostLocal],
    p: dict[str, int],
    fig: IpamFigures,
    say: Progress,
) -> None:
    """Per round: `multi` IPs over all daemons at once (then all released, not timed), and the
    same count of host-local ADDs over one data dir per node, `callers` execs at a time."""
    count, callers = p["multi"], p["callers"]
    fig.multi = {"moor": [], "reference": []}
    for r in range(p["rounds"]):
        sides = ["moor", "reference"] if r % 2 == 0 else ["reference", "moor"]
        for side in sides:
            tag = f"mbi-multi{r}"
            nodes: list[IpamDaemon] | list[HostLocal] = daemons if side == "moor" else refs
            ops = [_ops(node, tag) for node in nodes]
            alloc, free = _spread([a for a, _ in ops]), _spread([f for _, f in ops])
            if side == "moor":
                b = fan_out_allocate(daemons, count, tag)
            else:
                b = burst(alloc, count, callers)
            burst(free, count, callers)
            fig.multi[side].append(b)
            say(f"  round {r + 1} {side}: {count} IPs over {len(nodes)} nodes in {b.wall:.2f} s")


def _spread(per_node: list[Callable[[int], object]]) -> Callable[[int], object]:
    """Call number i goes to node i mod n, as `fan_out_allocate` spreads moor's."""
    return lambda i: per_node[i % len(per_node)](i)


# -- scale simulation --------------------------------------------------------------------------


def _sim_allocation(subnet: ipaddress.IPv4Network, node: str, j: int, now: float) -> Allocation:
    """A realistic pod IP record: 64-hex container ID, pod name/namespace/UID, netns, veth."""
    seed = f"{node}/{j}".encode()
    digest = hashlib.sha256(seed).hexdigest()
    return Allocation(
        ip=subnet.network_address + 2 + j,
        subnet=subnet,
        owner=Owner(
            network=SIM_NETWORK,
            container_id=digest,
            ifname="eth0",
            pod_namespace=f"team-{int(digest[:4], 16) % 64:02d}",
            pod_name=f"app-{digest[4:14]}-{digest[14:19]}",
            pod_uid=str(uuid.UUID(digest[32:64])),
        ),
        node=node,
        since=now - (int(digest[19:24], 16) % 86400),
        netns=f"/var/run/netns/cni-{uuid.UUID(digest[:32])}",
        netns_inode=4026531840 + j,
        host_veth=f"veth{digest[24:32]}",
    )


def sim_node_name(index: int, scale_index: int) -> str:
    return SCALE_NODE if index == scale_index else f"sim-{index:04d}"


def preload(url: str, keys: Keys, nodes: int, per_node: int, say: Progress) -> tuple[float, int]:
    """Write the network config, `nodes` subnet leases (each node's subnet key on a store lease of
    its own, as live daemons keep them) and `per_node` allocations per subnet (IP record + handle),
    in txns of at most 128 ops from parallel writers. Returns (seconds, keys written)."""
    config = NetworkConfig(ipaddress.ip_network(SCALE_NETWORK), SCALE_SUBNET_LEN)
    subnets = config.leaseable_subnets()
    scale_index = nodes // 2
    now = time.time()
    store = open_store(url, timeout=60.0)
    written = 0
    try:
        started = time.perf_counter()
        store.put(keys.config(), config.to_json())
        with ThreadPoolExecutor(PRELOAD_WRITERS) as pool:
            lease_ids = list(pool.map(lambda _: store.grant_lease(SIM_LEASE_TTL), range(nodes)))
            say(f"  {nodes} store leases granted in {time.perf_counter() - started:.1f} s")
            lease_ops: list[Put] = []
            alloc_ops: list[Put] = []
            for i in range(nodes):
                subnet = next(subnets)
                node = sim_node_name(i, scale_index)
                public_ip = str(ipaddress.ip_address("172.16.0.0") + i)
                lease = SubnetLease(subnet, node, now - 86400, public_ip, config.backend_data(node))
                lease_ops.append(Put(keys.subnet(subnet), lease.to_json(), lease_ids[i]))
                for j in range(per_node):
                    a = _sim_allocation(subnet, node, j, now)
                    alloc_ops.append(Put(keys.ip(a.ip), a.to_json()))
                    alloc_ops.append(Put(keys.handle(*a.owner.handle), str(a.ip).encode()))
            say(f"  records built in {time.perf_counter() - started:.1f} s; writing")
            batches = [
                ops[k : k + ETCD_TXN_OPS]
                for ops in (lease_ops, alloc_ops)
                for k in range(0, len(ops), ETCD_TXN_OPS)
            ]
            for result in pool.map(lambda batch: store.txn([], batch), batches):
                if not result.succeeded:
                    raise RuntimeError("a preload txn did not apply")
            written = 1 + len(lease_ops) + len(alloc_ops)
        return time.perf_counter() - started, written
    finally:
        store.close()


def scale_sim(
    etcd: EtcdServer,
    workdir: Path,
    p: dict[str, int],
    fig: IpamFigures,
    say: Progress,
    daemons: list[IpamDaemon],
) -> None:
    keys = Keys(f"{KEY_ROOT}/scale")
    nodes, per_node = p["nodes"], p["per_node"]
    say(f"scale sim: preloading {nodes} node leases and {nodes * per_node} allocations")
    seconds, written = preload(etcd.url, keys, nodes, per_node, say)
    say(f"  preload: {written} keys in {seconds:.1f} s")
    scale = fig.scale = ScaleFigures(nodes, nodes * per_node, seconds, written)
    daemon = IpamDaemon(
        workdir / SCALE_NODE,
        SCALE_NODE,
        f"{BRIDGE_PREFIX}s",
        SCALE_NETWORK,
        subnet_len=SCALE_SUBNET_LEN,
        store_url=etcd.url,
        key_prefix=keys.prefix,
    )
    daemons.append(daemon)
    for n in range(p["starts"]):
        start = daemon.start()
        mem = daemon.memory_kb()
        scale.starts.append(start)
        scale.rss_kb.append(mem["VmRSS"])
        say(
            f"  {SCALE_NODE} start {n + 1}: ready in {start:.2f} s, RSS {mem['VmRSS'] / 1024:.0f} MB"
        )
        if n + 1 < p["starts"]:
            daemon.stop()
    assert daemon.stub is not None
    status = daemon.stub.Status(ipam_pb2.StatusRequest(), timeout=RPC_TIMEOUT)
    scale.own_allocations = len(status.allocations)
    if scale.own_allocations != per_node:
        fig.failures.append(
            f"{SCALE_NODE} reports {scale.own_allocations} allocations, expected {per_node}"
        )
    moorctl_figures(daemon, scale, p["ctl_runs"], sim_node_name(0, nodes // 2), say)
    scale.churn = min(p["count"], nodes * 10)
    scale.churn_cpu = foreign_churn(etcd.url, keys, daemon, scale.churn, nodes)
    say(
        f"  {scale.churn} allocations + releases on other nodes cost {SCALE_NODE} "
        f"{scale.churn_cpu * 1000:.3f} CPU ms each"
    )
    scale.hwm_kb.append(daemon.memory_kb()["VmHWM"])


def foreign_churn(url: str, keys: Keys, daemon: IpamDaemon, count: int, nodes: int) -> float:
    """What the rest of the cluster's churn costs one daemon: `count` allocations, then their
    releases, written for other nodes' subnets in the allocator's own txn shapes; returns the
    daemon's CPU seconds per allocation + release, its idle rate over as long subtracted."""
    assert daemon.proc is not None
    cpu = ProcessCpu(daemon.proc.pid)
    config = NetworkConfig(ipaddress.ip_network(SCALE_NETWORK), SCALE_SUBNET_LEN)
    subnets = list(itertools.islice(config.leaseable_subnets(), min(nodes, 500)))
    scale_index = nodes // 2
    now = time.time()
    allocs = [
        _sim_allocation(subnets[i % len(subnets)], sim_node_name(i % len(subnets), scale_index),
                        100 + i // len(subnets), now)
        for i in range(count)
        if i % len(subnets) != scale_index
    ]  # fmt: skip
    store = open_store(url, timeout=60.0)

    def allocate(a: Allocation) -> None:
        ip, handle = keys.ip(a.ip), keys.handle(*a.owner.handle)
        ops = [Put(ip, a.to_json()), Put(handle, str(a.ip).encode()), Delete(keys.released(a.ip))]
        if not store.txn([Compare(ip, 0), Compare(handle, 0)], ops).succeeded:
            raise RuntimeError(f"churn: {a.ip} is taken")

    def release(a: Allocation) -> None:
        mark = json.dumps({"releasedAt": now, "node": a.node}).encode()
        ops = [Delete(keys.ip(a.ip)), Delete(keys.handle(*a.owner.handle))]
        store.txn([], [*ops, Put(keys.released(a.ip), mark)])

    try:
        idle_from, idle_cpu = time.perf_counter(), cpu.seconds()
        time.sleep(1.0)
        idle_rate = (cpu.seconds() - idle_cpu) / (time.perf_counter() - idle_from)
        started, before = time.perf_counter(), cpu.seconds()
        with ThreadPoolExecutor(PRELOAD_WRITERS) as pool:
            list(pool.map(allocate, allocs))
            list(pool.map(release, allocs))
        time.sleep(0.5)  # let the daemon's watch drain
        spent = cpu.seconds() - before - idle_rate * (time.perf_counter() - started)
    finally:
        store.close()
    return max(0.0, spent) / len(allocs)


def moorctl_figures(
    daemon: IpamDaemon, scale: ScaleFigures, runs: int, other: str, say: Progress
) -> None:
    """`moorctl ips --node` for the restarting node and for another node, and `moorctl status`;
    each one exec of the CLI, spawn to exit, as an operator sees it."""
    probe = moorctl(daemon.grpc_socket, "ips", "--node", SCALE_NODE)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
        if "invalid choice" in probe.stderr:
            scale.ips_note = "n/a: not built yet"
        else:
            scale.ips_note = f"n/a: failed ({reason[:120]})"
        say(f"  moorctl ips: {scale.ips_note}")
    else:
        scale.ips_rows = sum(1 for line in probe.stdout.splitlines() if SCALE_NODE in line)
        for target, samples in ((SCALE_NODE, scale.ips), (other, scale.ips_other)):
            for _ in range(runs):
                t0 = time.perf_counter()
                done = moorctl(daemon.grpc_socket, "ips", "--node", target)
                samples.append(time.perf_counter() - t0)
                if done.returncode != 0:
                    raise RuntimeError(f"moorctl ips --node {target}: {done.stderr.strip()}")
        say(f"  moorctl ips --node {SCALE_NODE}: p50 {p50(scale.ips) * 1000:.0f} ms")
        admin = ipam_pb2_grpc.AdminStub(daemon.channel)
        for _ in range(runs):
            t0 = time.perf_counter()
            request = ipam_pb2.ListAllocationsRequest(node=SCALE_NODE)
            list(admin.ListAllocations(request, timeout=RPC_TIMEOUT))
            scale.list_rpc.append(time.perf_counter() - t0)
    for _ in range(runs):
        t0 = time.perf_counter()
        done = moorctl(daemon.grpc_socket, "status")
        scale.status.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"moorctl status: {done.stderr.strip()}")


# -- the whole IPAM part -----------------------------------------------------------------------


def start_all(daemons: list[IpamDaemon]) -> list[float]:
    """Start the daemons at once (as nodes of a cluster would), each timed on its own: spawned
    one after the other from this thread, then awaited in parallel."""
    for d in daemons:
        d.spawn()
    with ThreadPoolExecutor(len(daemons)) as pool:
        return list(pool.map(lambda d: d.wait_ready(), daemons))


def measure(workdir: Path, p: dict[str, int], fig: IpamFigures, say: Progress) -> None:
    """Set up etcd and daemons, run every figure; the caller stops everything (`teardown`)."""
    etcd = BenchEtcd(workdir / "etcd", name="mbi-bench")
    _RUNNING["etcd"] = etcd
    daemons: list[IpamDaemon] = _RUNNING.setdefault("daemons", [])
    say(f"starting etcd ({etcd_version()})")
    etcd.start()

    say(f"starting {NODE_PREFIX}0 on etcd (prefix {KEY_ROOT}/one)")
    one = IpamDaemon(
        workdir / "mbi0",
        f"{NODE_PREFIX}0",
        f"{BRIDGE_PREFIX}0",
        ALLOC_NETWORK,
        store_url=etcd.url,
        key_prefix=f"{KEY_ROOT}/one",
    )
    daemons.append(one)
    fig.empty_start = one.start()
    fig.empty_rss_kb = one.memory_kb()["VmRSS"]
    ref = HostLocal(workdir / "host-local" / "one", "mbi-ref", REF_NETWORK)
    warm_up(one, ref)
    say(f"sequential Allocate/Release of {p['seq']} IPs per side, interleaved")
    floor = EtcdFloor(etcd.url, Keys(f"{KEY_ROOT}/floor"))
    try:
        for i in range(5):  # connect, not counted
            floor.allocate(f"mbi-warm-{i}")
            floor.release(f"mbi-warm-{i}")
        sequential(one, ref, floor, p["seq"], fig)
    finally:
        floor.close()
    say(
        f"  Allocate p50: moor {p50(fig.seq['moor']['alloc']) * 1000:.2f} ms, "
        f"host-local {p50(fig.seq['reference']['alloc']) * 1000:.2f} ms, "
        f"etcd txn alone {p50(fig.seq['etcd']['alloc']) * 1000:.2f} ms"
    )
    say(
        f"{p['count']} Allocate then {p['count']} Release, {p['callers']} callers, "
        f"{p['rounds']} round(s), alternating"
    )
    throughput(one, ref, p, fig, say, cpu_readers(one, etcd, ref))
    one.stop()

    n = p["daemons"]
    say(f"starting {n} daemons {NODE_PREFIX}0..{NODE_PREFIX}{n - 1} on one etcd")
    multi = [
        IpamDaemon(
            workdir / f"multi-{NODE_PREFIX}{i}",
            f"{NODE_PREFIX}{i}",
            f"{BRIDGE_PREFIX}{i}",
            ALLOC_NETWORK,
            store_url=etcd.url,
            key_prefix=f"{KEY_ROOT}/multi",
        )
        for i in range(n)
    ]
    daemons.extend(multi)
    fig.multi_starts = start_all(multi)
    refs = [
        HostLocal(workdir / "host-local" / f"node{i}", "mbi-ref", REF_NODE_SUBNET.format(i=i))
        for i in range(n)
    ]
    for i, d in enumerate(multi):  # connect each channel; not counted
        d.allocate(f"mbi-warm-{i}")
        d.release(f"mbi-warm-{i}")
    say(f"{p['multi']} IPs over {n} daemons at once, {p['rounds']} round(s), alternating")
    multi_daemon(multi, refs, p, fig, say)
    for d in multi:
        d.stop()

    scale_sim(etcd, workdir, p, fig, say, daemons)


_RUNNING: dict[str, Any] = {}


def teardown() -> list[str]:
    """Stop every process the IPAM part started (by PID), then remove its host state; returns
    what could not be stopped or removed."""
    problems: list[str] = []
    daemons: list[IpamDaemon] = _RUNNING.pop("daemons", [])
    pids = []
    for d in daemons:
        if d.proc is not None:
            pids.append(("moor-ipamd " + d.name, d.proc))
        try:
            d.stop()
        except Exception as exc:  # noqa: BLE001 - report, keep cleaning
            problems.append(f"stopping {d.name}: {exc}")
    etcd: BenchEtcd | None = _RUNNING.pop("etcd", None)
    if etcd is not None:
        if etcd.proc is not None:
            pids.append(("etcd", etcd.proc))
        try:
            etcd.stop()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"stopping etcd: {exc}")
    for what, proc in pids:
        if proc.poll() is None:
            problems.append(f"{what} (pid {proc.pid}) still running")
    return problems + cleanup_host(daemons)


def _our_links() -> list[str]:
    out = sh("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [name for name in names if name.startswith(BRIDGE_PREFIX)]


def _our_chains() -> list[str]:
    rules = sh("iptables", "--wait=10", "-t", "nat", "-S", check=False).stdout.splitlines()
    return sorted({line.split()[1] for line in rules if re.match(r"-N MBI[0-9A-Z-]*-MASQ$", line)})


def cleanup_host(daemons: Iterable[IpamDaemon] = ()) -> list[str]:
    """Bridges `mbibr*` and nat chains `MBI*-MASQ` (none is made by gRPC calls; a check)."""
    for link in _our_links():
        sh("ip", "link", "del", link, check=False)
    chains = set(_our_chains()) | {d.masq_chain for d in daemons}
    if chains & set(_our_chains()):
        from cni_plugin.datapath.masq import MasqueradeRules

        for chain in sorted(chains):
            with contextlib.suppress(Exception):
                MasqueradeRules(chain).remove()
    return [f"link {name}" for name in _our_links()] + [f"nat chain {c}" for c in _our_chains()]


def leftovers() -> list[str]:
    return [f"link {name}" for name in _our_links()] + [f"nat chain {c}" for c in _our_chains()]


def collect_warnings(fig: IpamFigures, daemons: Iterable[IpamDaemon]) -> None:
    for d in daemons:
        fig.daemon_warnings += [f"{d.name}: {line}" for line in d.warnings()]


def etcd_version() -> str:
    try:
        out = subprocess.run(
            [ETCD_BINARY, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError:
        return "etcd ?"
    return out.splitlines()[0] if out else "etcd ?"


# -- report ------------------------------------------------------------------------------------

START, END = "<!-- bench:ipam:start -->", "<!-- bench:ipam:end -->"


@dataclass
class IpamRow:
    figure: str
    moor: float | None
    reference: float | None = None
    target: float | None = None  # None: reported only
    op: str = "≤"  # how moor must compare with the target: ≤, < or ≥
    unit_fmt: str = "{:.1f}"
    note: str = ""  # shown instead of a missing moor value
    target_applies: bool = True  # False: the counts were shrunk (--quick), target not judged

    def target_text(self) -> str:
        if self.target is None:
            return "—"
        text = f"{self.op} {self.target:g}"
        return text if self.target_applies else f"{text} (at full counts)"

    @property
    def met(self) -> str:
        if self.target is None or not self.target_applies:
            return "—"
        if self.moor is None:
            return "not run"
        ok = {"≤": self.moor <= self.target, "<": self.moor < self.target}.get(
            self.op, self.moor >= self.target
        )
        return "yes" if ok else "**NO**"

    def cells(self) -> list[str]:
        def num(v: float | None, note: str = "") -> str:
            return (note or "—") if v is None else self.unit_fmt.format(v)

        return [
            self.figure,
            num(self.moor, self.note),
            num(self.reference),
            self.target_text(),
            self.met,
        ]


HEADER = ["figure", "moor", "reference (host-local)", "target", "met?"]


SIDES = ("moor", "reference")


def stat(fn: Callable[[list[float]], float], values: list[float], k: float = 1.0) -> float | None:
    """`fn(values) * k`, or None when a run broke before these values were measured."""
    return fn(values) * k if values else None


def rows(fig: IpamFigures) -> list[IpamRow]:
    p = fig.params
    full = {k: p[k] == DEFAULTS[k] for k in p}
    out: list[IpamRow] = []
    if fig.seq:
        m, r = fig.seq["moor"], fig.seq["reference"]
        n = p["seq"]
        out += [
            IpamRow(
                f"Allocate p50, sequential (ms, {n} IPs)",
                stat(p50, m["alloc"], 1000),
                stat(p50, r["alloc"], 1000),
                TARGETS["alloc_p50_ms"],
                unit_fmt="{:.2f}",
            ),
            IpamRow(
                f"Allocate p90, sequential (ms, {n} IPs)",
                stat(p90, m["alloc"], 1000),
                stat(p90, r["alloc"], 1000),
                unit_fmt="{:.2f}",
            ),
            IpamRow(
                f"Release p50, sequential (ms, {n} IPs)",
                stat(p50, m["release"], 1000),
                stat(p50, r["release"], 1000),
                unit_fmt="{:.2f}",
            ),
        ]
    if fig.bursts:
        c, k = p["count"], p["callers"]
        for op, label, target in (
            ("alloc", "Allocate", TARGETS["allocs_per_s"]),
            ("release", "Release", None),
        ):
            vals = [stat(p50, [b.per_second for b in fig.bursts[s][op]]) for s in SIDES]
            out.append(
                IpamRow(
                    f"{label}s per second, 1 daemon, {k} callers ({c} IPs)",
                    *vals,
                    target,
                    op="≥",
                    unit_fmt="{:.0f}",
                    target_applies=full["count"] and full["callers"],
                )
            )
    if fig.multi:
        walls = [stat(p50, [b.wall for b in fig.multi[s]]) for s in SIDES]
        out.append(
            IpamRow(
                f"{p['multi']} IPs over {p['daemons']} daemons at once, wall (s)",
                *walls,
                TARGETS["multi_wall_s"],
                op="<",
                unit_fmt="{:.2f}",
                target_applies=full["multi"] and full["daemons"],
            )
        )
    if fig.empty_start is not None:
        out.append(
            IpamRow(
                "daemon start to ready, empty store (s)", fig.empty_start, None, unit_fmt="{:.2f}"
            )
        )
    if fig.empty_rss_kb is not None:
        out.append(
            IpamRow(
                "daemon RSS, empty store (MB)", fig.empty_rss_kb / 1024, None, unit_fmt="{:.0f}"
            )
        )
    s = fig.scale
    if s is not None:
        scale_full = full["nodes"] and full["per_node"]
        size = f"{s.nodes} nodes / {s.allocations // 1000}k IPs"
        out += [
            IpamRow(
                f"daemon start to ready, {size} (s)",
                stat(p50, s.starts),
                None,
                TARGETS["scale_start_s"],
                "<",
                unit_fmt="{:.2f}",
                target_applies=scale_full,
            ),
            IpamRow(
                f"daemon RSS when ready, {size} (MB)",
                stat(p50, s.rss_kb, 1 / 1024),
                None,
                TARGETS["scale_rss_mb"],
                "<",
                unit_fmt="{:.0f}",
                target_applies=scale_full,
            ),
            IpamRow(
                f"`moorctl ips --node` p50, {size} (ms)",
                stat(p50, s.ips, 1000),
                None,
                unit_fmt="{:.0f}",
                note=s.ips_note,
            ),
            IpamRow(
                f"`moorctl status` p50, {size} (ms)",
                stat(p50, s.status, 1000),
                None,
                unit_fmt="{:.0f}",
            ),
        ]
    return out


def markdown_table(table: list[IpamRow]) -> str:
    return report.markdown_table(table, HEADER)


def text_table(table: list[IpamRow]) -> str:
    return report.text_table(table, HEADER)


def details(fig: IpamFigures) -> list[str]:
    """Stdout and BENCHMARKS.md: per-round numbers and what the table's medians hide."""
    lines = []
    floor = fig.seq.get("etcd", {})
    if floor.get("alloc") and floor.get("release"):
        lines.append(
            "the floor, etcd alone (the allocator's round trips from the bench process, taking "
            f"turns with the two above): Allocate's txn p50 {p50(floor['alloc']) * 1000:.2f} ms "
            f"p90 {p90(floor['alloc']) * 1000:.2f} ms; Release's get + get + txn p50 "
            f"{p50(floor['release']) * 1000:.2f} ms"
        )
    for op in ("alloc", "release"):
        parts = []
        for side in SIDES if fig.bursts else ():
            rounds = fig.bursts[side][op]
            lat = [x for b in rounds for x in b.latencies]
            if not lat:
                continue
            per_s = ", ".join(f"{b.per_second:.0f}" for b in rounds)
            cpu = {k: p50([b.cpu[k] for b in rounds]) * 1000 for k in rounds[0].cpu}
            split = " + ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            parts.append(
                f"{side} [{per_s}]/s, per-call p50 {p50(lat) * 1000:.1f} ms "
                f"p90 {p90(lat) * 1000:.1f} ms, CPU ms/op {sum(cpu.values()):.2f} = {split}"
            )
        if parts:
            label = "Allocate" if op == "alloc" else "Release"
            lines.append(f"{label} rounds: " + "; ".join(parts))
    if fig.multi and all(fig.multi.values()):
        parts = [
            f"{side} [{', '.join(f'{b.wall:.2f}' for b in fig.multi[side])}] s" for side in SIDES
        ]
        lines.append(
            f"{fig.params['multi']} IPs over {fig.params['daemons']} nodes, rounds: "
            + "; ".join(parts)
        )
        if fig.multi_starts:
            lines.append(
                f"the {len(fig.multi_starts)} daemons started together, each ready in "
                f"{min(fig.multi_starts):.2f}–{max(fig.multi_starts):.2f} s"
            )
    s = fig.scale
    if s is not None:
        lines.append(
            f"preload: {s.preload_keys} keys ({s.nodes} leases on {s.nodes} store leases, "
            f"{s.allocations} IP records + {s.allocations} handles) in {s.preload_seconds:.1f} s, "
            f"txns of ≤ {ETCD_TXN_OPS} ops from {PRELOAD_WRITERS} writers"
        )
        if s.starts and s.hwm_kb:
            lines.append(
                f"{SCALE_NODE} starts: [{', '.join(f'{x:.2f}' for x in s.starts)}] s; RSS when "
                f"ready [{', '.join(f'{kb / 1024:.0f}' for kb in s.rss_kb)}] MB; peak RSS "
                f"(VmHWM) at the end {max(s.hwm_kb) / 1024:.0f} MB; it reports "
                f"{s.own_allocations} allocations of its own"
            )
        if s.ips and s.ips_other and s.list_rpc:
            lines.append(
                f"`moorctl ips --node {SCALE_NODE}` p50 {p50(s.ips) * 1000:.0f} ms "
                f"({s.ips_rows} rows; the `Admin.ListAllocations` RPC alone p50 "
                f"{p50(s.list_rpc) * 1000:.1f} ms, the rest is the CLI's start-up); --node of "
                f"another (sim) node p50 {p50(s.ips_other) * 1000:.0f} ms"
            )
        if s.churn_cpu is not None:
            lines.append(
                f"cluster churn: {s.churn} allocations + releases written for other nodes "
                f"cost {SCALE_NODE} {s.churn_cpu * 1000:.3f} CPU ms each (its store watch covers "
                "the whole key prefix, so every daemon sees every node's changes)"
            )
    return lines


def how_measured(fig: IpamFigures) -> str:
    p = fig.params
    return (
        "One run of `python -m bench` starts a real etcd (Debian etcd-server, its own data dir "
        "in a temp dir, default settings) and real `moor-ipamd` processes on it (`--store "
        "etcd://…`, a key prefix per figure, `--log-level warning`, default cooldown 60 s, "
        "network 10.236.0.0/16 in /24s; a node leases one more /24 when its subnets are "
        "full). moor is called over its gRPC API on the unix socket (`Ipam.Allocate`/"
        "`Release`, Python grpcio client in the bench process; latency is call to answer). "
        "The reference is `/usr/lib/cni/host-local` exec'd per IP (ADD allocates, DEL releases; "
        "its own data dir, a /16 or one /24 per simulated node; `posix_spawn` to reap), as a "
        "runtime would run it. Sequential: moor, host-local and the bare etcd round trips "
        "(the floor) take turns op by op, rotating who goes first, "
        f"{p['seq']} IPs each after 5 uncounted warm-ups. Throughput: "
        f"{p['callers']} threads take call numbers from a shared counter until {p['count']} "
        f"Allocates (then {p['count']} Releases) are done; per second = calls / (release of "
        "the callers to the last answer); the host-local column is the same with "
        f"{p['callers']} concurrent execs; {p['rounds']} round(s), sides alternating, median "
        "shown. CPU ms/op (below the table): each process's CPU over the burst (the daemon's "
        "and etcd's CPU-time clocks, `wait4` of each host-local exec, the bench process's own "
        "CPU: the gRPC client or the spawner) divided by the calls; the machine has 2 CPUs for "
        "all of them. Multi-node: {p['daemons']} daemons on the one etcd (a /24 each), "
        f"{p['multi']} Allocates spread round-robin and all in flight at once (gRPC futures, a "
        "channel per daemon), wall = first call issued to last answer; host-local beside it "
        f"allocates the same count over {p['daemons']} data dirs, {p['callers']} execs at a "
        "time (a thousand concurrent execs would only measure the scheduler). Scale sim: etcd "
        f"preloaded with {p['nodes']} node subnet leases of 10.0.0.0/8 in /24s (SubnetLease "
        "JSON, each on a store lease of its own with a 24 h TTL, as live daemons keep them) "
        f"and {p['per_node']} allocations per subnet (Allocation JSON with 64-hex container "
        "IDs, pod name/namespace/UID, netns and veth, plus the handle key); then "
        f"`{SCALE_NODE}`, whose node already holds one of those subnets with its "
        f"{p['per_node']} allocations (a restarting node of a big cluster), is started "
        f"{p['starts']} time(s): start to ready = process spawn until `Ipam.Status` answers "
        "ready (polled every 5 ms); RSS = VmRSS from /proc right then. `moorctl` figures: "
        f"the CLI exec'd as an operator runs it (interpreter start-up included), "
        f"{p['ctl_runs']} runs each. Cluster churn: while `{SCALE_NODE}` idles, the bench writes "
        "allocations and then releases for other nodes' subnets straight into etcd, in the "
        "allocator's own txn shapes, and meters the daemon's CPU (its idle rate subtracted)."
    )


def load_note(fig: IpamFigures) -> str:
    """The machine's 1-min load average around the run: other work shares its CPUs."""
    if not fig.load:
        return ""
    loads = " → ".join(f"{x:.1f}" for x in fig.load)
    return f"Load average (1 min) at start → end of the IPAM part: {loads}."


def section(fig: IpamFigures, table: list[IpamRow], env: dict[str, str], command: str) -> str:
    extra = details(fig)
    return "\n".join(
        [
            START,
            "## IPAM: moor-ipamd on etcd vs the reference host-local",
            "",
            f"Measured {env['date']} with `{command}` on {env['kernel']}, {env['cpus']} CPUs. "
            f"Python {env['python']}; store: {env['etcd']}; "
            f"reference: {env['reference']}. {load_note(fig)}".rstrip(),
            "",
            markdown_table(table),
            "",
            *[f"- {line}" for line in extra],
            *([""] if extra else []),
            f"**How measured.** {how_measured(fig)}",
            END,
        ]
    )


def etcd_package() -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "etcd-server"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    version = etcd_version().removeprefix("etcd Version: ")
    return f"etcd {version} (Debian etcd-server {proc.stdout.strip() or '?'})"


def run(fig: IpamFigures, workdir: Path, say: Progress) -> None:
    """Measure everything into `fig`; always tear down. Raises what broke the run, after the
    tear-down (`fig` keeps what was measured until then)."""
    fig.load.append(os.getloadavg()[0])
    try:
        measure(workdir, fig.params, fig, say)
        fig.load.append(os.getloadavg()[0])
    finally:
        with no_interrupts():
            collect_warnings(fig, _RUNNING.get("daemons", []))
            fig.failures += [f"NOT CLEANED UP: {x}" for x in teardown()]
