"""A sticky pod's move on the simulated 3-node cluster: from the ADD on the new node until a pod on
another node reaches the new pod.

`prod/db-0`, under a sticky rule for `prod/db-[0-9]+` (`moorctl sticky add`), takes the lowest
free fixed IP, DB_IP, on n1; a pod on n3 probes it without pause. Each move recreates db-0 on the
other one of n1 and n2 with a new pod UID (a StatefulSet pod rescheduled: CNI_ARGS name the pod,
no IP), and the old node's DEL comes only after the new node's ADD (tests/test_fixed_move.py's
flow). Every db-0 generation runs a UDP echo server on the same port that prefixes its answer with
its own tag, so an answer tells the new pod from the old one. Every node filters reverse paths
strictly (rp_filter=1), as in the move test.

The prober is one process in n3's pod for the whole run (Debian's python3 -S): a probe every
PROBE_INTERVAL carries its sequence number, stamped with time.perf_counter (CLOCK_MONOTONIC, the
bench's clock too) when sent; answers are stamped when received. Told which tag to wait for, it
reports the first probe sent after that the new pod answered: its send time (the pod was reachable
by then, to within one interval) and its answer's arrival, and the last answer of the old pod.
Netlink watches in the three node netns stamp the /32's RTM_NEWROUTE on each (bench/cluster_probe).
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.cluster_probe import RouteWatch
from tests.helpers.cluster import Cluster
from tests.helpers.traffic import PYTHON, in_netns

Progress = Callable[[str], None]
DB_IP = "10.213.250.1"  # the lowest free IP of the fixed range: the sticky rule's pick
STICKY = ("--namespace", "prod", "--pod-regex", "db-[0-9]+")
PORT = 7300
PROBE_INTERVAL = 0.001
MOVE_TIMEOUT = 10.0  # a move whose new pod does not answer by then is a failure
COLLECT = 0.05  # after the new pod's first answer: later answers to earlier probes still count
SETTLE = 0.2  # after the old pod's DEL, before the next move

SERVER = r"""
import socket, sys
tag, port = sys.argv[1].encode(), int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", port))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(512)
    try:  # a probe can come in before the pod's routes are there: no answer, no exit
        u.sendto(tag + b" " + data, peer)
    except OSError:
        pass
"""

CLIENT = r"""
import json, os, select, socket, sys, time
dst, port = sys.argv[1], int(sys.argv[2])
interval, collect = float(sys.argv[3]), float(sys.argv[4])
clock = time.perf_counter
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, seq, want, pending, due = {}, 0, None, b"", clock()
print("ready", time.get_clock_info("perf_counter").implementation, flush=True)
while True:
    now = clock()
    if now >= due:
        seq += 1
        try:
            s.sendto(str(seq).encode(), (dst, port))
        except OSError:
            pass
        sent[seq] = now
        sent.pop(seq - 100000, None)
        due = now + interval
    ready = select.select([s, 0], [], [], max(0.0, due - clock()))[0]
    if 0 in ready:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            tag, timeout = line.decode().split()
            want, deadline, first_seq = tag, clock() + float(timeout), seq + 1
            best, report_at, old_last, old_n = None, None, None, 0
            print("armed", flush=True)
    if s in ready:
        while True:
            try:
                data = s.recv(512)
            except OSError:
                break
            t = clock()
            tag, _, q = data.decode().partition(" ")
            q = int(q)
            if want is None or q < first_seq:
                continue
            if tag == want:
                if best is None or q < best[0]:
                    best = (q, t)
                if report_at is None:
                    report_at = t + collect
            else:
                old_last, old_n = t, old_n + 1
    if want is not None and report_at is not None and clock() >= report_at:
        q, t = best
        print(json.dumps({"ok": True, "sent": sent[q], "received": t, "old_last": old_last,
                          "old_answers": old_n, "probes": seq - first_seq + 1}), flush=True)
        want = None
    elif want is not None and clock() > deadline:
        print(json.dumps({"ok": False, "old_last": old_last, "old_answers": old_n,
                          "probes": seq - first_seq + 1}), flush=True)
        want = None
"""


@dataclass
class Move:
    """One move; times in seconds from the ADD's exec on the new node (perf_counter)."""

    src: str
    dst: str
    reached: float  # the first probe the new pod answered was sent
    answered: float  # ... its answer arrived back
    add: float  # the ADD returned
    route_remote: float | None  # n3's /32 toward the new node (RTM_NEWROUTE)
    route_local: float | None  # the new node's /32 to the new pod's veth
    route_old: float | None  # the old node's /32 toward the new node
    old_last: float | None  # the old pod's last answer (None: it answered none after the zero)
    probes: int  # probes sent from the zero until the report

    @property
    def after_add(self) -> float:
        """From the ADD's return instead (negative: reached before the runtime heard back)."""
        return self.reached - self.add


@dataclass
class Moves:
    backend: str
    moves: list[Move] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class TaggedServer:
    """The UDP echo server of one db-0 generation, in its netns; `stop()` kills it by PID."""

    def __init__(self, netns: str, tag: str) -> None:
        self.proc = subprocess.Popen(in_netns(netns, PYTHON, "-S", "-c", SERVER, tag, str(PORT)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 10)[0]
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"echo server in {netns} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class Prober:
    """The probing client in `netns` (see the module docstring); `stop()` kills it by PID."""

    def __init__(self, netns: str) -> None:
        argv = in_netns(
            netns, PYTHON, "-S", "-c", CLIENT, DB_IP, str(PORT), str(PROBE_INTERVAL), str(COLLECT)
        )
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)  # fmt: skip
        words = self._line(10).split()
        ours = time.get_clock_info("perf_counter").implementation
        if words[:1] != ["ready"] or " ".join(words[1:]) != ours:
            self.stop()
            raise RuntimeError(f"the prober's clock is not the bench's ({ours}): {words}")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"the prober said nothing for {timeout} s")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError("the prober exited")
        return line

    def want(self, tag: str, timeout: float = MOVE_TIMEOUT) -> None:
        """From now, wait for an answer of `tag` (for `timeout` s at most)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tag} {timeout}\n".encode())
        self.proc.stdin.flush()
        if self._line(5).strip() != "armed":
            raise RuntimeError("the prober did not arm")

    def result(self) -> dict:
        return json.loads(self._line(MOVE_TIMEOUT + 5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def db0_args(uid: str) -> str:
    return f"K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID={uid}"


@dataclass
class Db0:
    """One generation of db-0: its node, netns, pod UID and echo server."""

    node: str
    netns: str
    uid: str
    server: TaggedServer


def strict_rp_filter(c: Cluster) -> None:
    for node in c.nodes.values():
        subprocess.run(in_netns(node.netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"),
                       check=True, capture_output=True)  # fmt: skip


def moves(c: Cluster, count: int, say: Progress) -> Moves:
    """db-0 placed on n1, then moved `count` times between n1 and n2 while n3's pod probes it."""
    fig = Moves(c.backend)
    strict_rp_filter(c)
    rule = c.moorctl("n1", "sticky", "add", *STICKY)
    if rule.returncode != 0:
        raise RuntimeError(f"moorctl sticky add failed: {rule.stderr.strip()}")
    client = c.add_pods(1, ["n3"])[0]
    watch = RouteWatch([c.nodes[n].netns for n in ("n1", "n2", "n3")])
    prober: Prober | None = None
    live: list[Db0] = []
    try:
        watch.start()
        prober = Prober(client.name)
        live.append(_start(c, "n1", 0))
        prober.want("g0")
        first = c.cni("ADD", "n1", live[0].netns, live[0].netns, db0_args(live[0].uid))
        got = first["ips"][0]["address"].split("/")[0]
        if got != DB_IP:
            raise RuntimeError(f"db-0 got {got} under the sticky rule, not {DB_IP}")
        if not prober.result()["ok"]:
            raise RuntimeError(f"n3's pod never reached db-0 on n1 ({DB_IP})")
        for k in range(1, count + 1):
            old = live[-1]
            new = _start(c, "n2" if old.node == "n1" else "n1", k)
            live.append(new)
            move = _move(c, prober, watch, old, new, f"g{k}")
            if isinstance(move, str):
                fig.failures.append(f"move {k} ({old.node} -> {new.node}): db-0 not reached "
                                    f"within {MOVE_TIMEOUT:g} s; {move}")  # fmt: skip
                break
            fig.moves.append(move)
            _retire(c, old)  # the late DEL of the old generation
            live.remove(old)
            time.sleep(SETTLE)
            if k % 5 == 0:
                say(f"  {k}/{count} moves")
    finally:
        for gen in live:
            gen.server.stop()
        if prober is not None:
            prober.stop()
        watch.stop()
    if watch.overflow:
        fig.failures.append(
            f"netlink notifications lost (ENOBUFS) in {sorted(set(watch.overflow))}"
        )
    return fig


def _start(c: Cluster, node: str, k: int) -> Db0:
    """Generation `k` of db-0's netns on `node`, its server listening (the ADD comes later)."""
    netns = f"{c.prefix}-db{k}"
    c.underlay.add_netns([netns])
    return Db0(node, netns, f"uid-{k}", TaggedServer(netns, f"g{k}"))


def _move(
    c: Cluster, prober: Prober, watch: RouteWatch, old: Db0, new: Db0, tag: str
) -> Move | str:
    """The move from `old` to `new`, measured; or what the nodes looked like when it failed."""
    prober.want(tag)
    watch.arm()
    zero = time.perf_counter()
    result = c.cni("ADD", new.node, new.netns, new.netns, db0_args(new.uid))
    returned = time.perf_counter()
    got = result["ips"][0]["address"].split("/")[0]
    if got != DB_IP:
        raise RuntimeError(f"db-0 got {got} on {new.node}, not its fixed IP {DB_IP}")
    report = prober.result()
    prefix = f"{DB_IP}/32"

    def route(node: str) -> float | None:
        at = watch.seen(c.nodes[node].netns)[0].get(prefix)
        return at - zero if at is not None else None

    if not report["ok"]:
        events = ", ".join(f"{n} {route(n)}" for n in ("n1", "n2", "n3"))
        return (
            f"the old pod answered {report['old_answers']} of {report['probes']} probes; "
            f"the /32's RTM_NEWROUTE after the zero (s): {events}; now: {_paths(c)}"
        )

    return Move(
        old.node, new.node, report["sent"] - zero, report["received"] - zero, returned - zero,
        route("n3"), route(new.node), route(old.node),
        report["old_last"] - zero if report["old_last"] is not None else None, report["probes"],
    )  # fmt: skip


def _paths(c: Cluster) -> str:
    """Each node's route toward DB_IP and neighbour entries for it, as `ip` prints them."""
    out = []
    for name, node in c.nodes.items():
        route = subprocess.run(["ip", "-n", node.netns, "route", "get", DB_IP],
                               capture_output=True, text=True).stdout  # fmt: skip
        neigh = subprocess.run(["ip", "-n", node.netns, "neigh", "show", "to", DB_IP],
                               capture_output=True, text=True).stdout  # fmt: skip
        out.append(f"{name}: {' '.join(route.split())} | neigh {' '.join(neigh.split()) or '-'}")
    return "; ".join(out)


def _retire(c: Cluster, gen: Db0) -> None:
    gen.server.stop()
    c.cni("DEL", gen.node, gen.netns, gen.netns, db0_args(gen.uid))
    subprocess.run(["ip", "netns", "del", gen.netns], capture_output=True, check=False)
