"""Runs a churn plan (`churn_plan.py`) on a simulated cluster, as a runtime would, and records
what became of every generation.

Ops go to a small thread pool in plan order, each once the ops it waits for are done, so
independent ones (other identities, a racing or late DEL) run at the same time. Every pod is a
real netns networked by `bin/moor` exec'd in its node's netns. Like the kubelet, a failed ADD is
followed by a DEL (the spool takes it while the node's daemon is down) and the netns goes.

While a killed node's daemon starts again, no CNI call goes to it: a DEL the shim spools after
the daemon's spool replay and before its CNI socket exists is never replayed (a moor bug this
test found, reported with issue 14's churn test; `spool_left` shows it when it happens). Calls
made while the daemon is dead are spooled and replayed at its start, as they must be.

Locks: `lock` guards `outcomes`, `first_ip`, `problems`, `down` and `counts`; `starting` guards
`restarting` and `calling`. CNI calls run outside both.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tests.helpers.churn_plan import (
    ADD,
    CHECK,
    CLIENT,
    DEL,
    INTRUDER,
    KILL,
    PLAIN,
    REQUEST,
    START,
    STICKY,
    VANISH,
    Gen,
    Op,
    Plan,
)
from tests.helpers.cluster import Cluster
from tests.helpers.moor import REFERENCE_PLUGINS, SHIM

TRY_AGAIN_LATER, FIXED_IP_UNAVAILABLE = 11, 105
DEL_TRIES = 5
LOAD = ("deadline", "busy")  # an 11 on a running node is fine only for a machine under load


@dataclass
class Outcome:
    code: int | None = None  # None: its ADD never ran; 0: it succeeded; else the CNI code
    msg: str = ""
    requested: str = ""  # what it asked for (an intruder's choice is made when it runs)
    ip: str = ""
    host_veth: str = ""
    node_down: bool = False  # its node's daemon was killed while the ADD ran
    gone: bool = False  # deleted or vanished: the runtime holds it no more
    vanished: bool = False

    @property
    def live(self) -> bool:
        return self.code == 0 and not self.gone


def cni(c: Cluster, command: str, node: str, env: dict[str, str], conf: dict[str, Any] | None = None
        ) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """One call of bin/moor inside the node's netns: (exit code, parsed output)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", c.nodes[node].netns, str(SHIM)],
        input=json.dumps({**c.conf(node), **(conf or {})}).encode(),
        env={"CNI_COMMAND": command, "CNI_PATH": f"{SHIM.parent}:{REFERENCE_PLUGINS}",
             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        capture_output=True, timeout=60,
    )  # fmt: skip
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, out


class ChurnRunner:
    def __init__(
        self,
        c: Cluster,
        plan: Plan,
        seed: int,
        threads: int = 4,
        *,
        check: Callable[[ChurnRunner], list[str]] = lambda runner: [],
        hold_during_start: bool = True,
    ) -> None:
        self.c = c
        self.hold_during_start = hold_during_start  # False: show the spool race (see above)
        self.check = check  # the invariants, at a CHECK (every op before it done)
        self.plan = plan
        self.seed = seed
        self.threads = threads
        self.lock = threading.Lock()
        self.outcomes = {number: Outcome() for number in plan.gens}
        self.first_ip: dict[str, str] = {}  # sticky identity -> the IP of its first ADD
        self.problems: list[str] = []  # what must never happen, seen on the way
        self.down: set[str] = set()  # nodes whose daemon is killed and not ready again yet
        self.starting = threading.Condition()  # guards `restarting` and `calling`
        self.restarting: set[str] = set()
        self.calling: collections.Counter[str] = collections.Counter()  # CNI calls in flight
        self.counts: collections.Counter[str] = collections.Counter()  # for the report

    # ---- names -------------------------------------------------------------------------------
    def netns(self, gen: Gen) -> str:
        return f"{self.c.prefix}-g{gen.number}"

    def container_id(self, gen: Gen) -> str:
        return f"{self.c.prefix}g{gen.number}"

    def env(self, gen: Gen) -> dict[str, str]:
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={gen.namespace};K8S_POD_NAME={gen.name};"
                f"K8S_POD_UID={gen.uid}")  # fmt: skip
        requested = self.outcomes[gen.number].requested
        return {"CNI_CONTAINERID": self.container_id(gen), "CNI_IFNAME": "eth0",
                "CNI_NETNS": f"/run/netns/{self.netns(gen)}",
                "CNI_ARGS": f"{args};IP={requested}" if requested else args}  # fmt: skip

    def live(self) -> list[Gen]:
        with self.lock:
            return [self.plan.gens[n] for n, o in self.outcomes.items() if o.live]

    # ---- running -----------------------------------------------------------------------------
    def cni(self, command: str, node: str, env: dict[str, str],
            conf: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """`cni`, held back while the node's daemon starts."""
        with self.starting:
            self.starting.wait_for(lambda: node not in self.restarting)
            self.calling[node] += 1
        try:
            return cni(self.c, command, node, env, conf)
        finally:
            with self.starting:
                self.calling[node] -= 1
                self.starting.notify_all()

    def run(self) -> None:
        futures: dict[int, Future[None]] = {}
        with ThreadPoolExecutor(self.threads) as pool:
            for op in self.plan.ops:
                for before in futures if op.verb == CHECK else op.after:
                    futures[before].result()
                if op.verb == CHECK:
                    problems = self.check(self)
                    self.problems += [f"at op {op.index}: {p}" for p in problems]
                    continue
                futures[op.index] = pool.submit(self.do, op)
            for future in futures.values():
                future.result()

    def do(self, op: Op) -> None:
        if op.verb == KILL:
            with self.lock:
                self.down.add(op.node)
            self.c.kill(op.node)
        elif op.verb == START:
            with self.starting:  # no CNI call to the node while its daemon starts (see above)
                if self.hold_during_start:
                    self.restarting.add(op.node)
                self.starting.wait_for(lambda: not self.calling[op.node])
            try:
                self.c.start(op.node)
            finally:
                with self.starting:
                    self.restarting.discard(op.node)
                    self.starting.notify_all()
            with self.lock:
                self.down.discard(op.node)
        elif op.verb == ADD:
            self.add(self.plan.gens[op.gen])
        elif op.verb == DEL:
            self.delete(self.plan.gens[op.gen])
        elif op.verb == VANISH:
            subprocess.run(["ip", "netns", "del", self.netns(self.plan.gens[op.gen])],
                           capture_output=True)  # fmt: skip
            with self.lock:
                outcome = self.outcomes[op.gen]
                outcome.vanished = outcome.vanished or not outcome.gone
                outcome.gone = True

    def add_client(self, node: str) -> Gen:
        """An ordinary pod outside the plan, to probe from."""
        number = max(self.plan.gens) + 1
        gen = Gen(number, CLIENT, "mc", f"client-{number}", node, f"uid-{number}")
        self.plan.gens[number] = gen
        self.outcomes[number] = Outcome()
        self.add(gen)
        assert self.outcomes[number].code == 0, self.outcomes[number]
        return gen

    def add(self, gen: Gen) -> None:
        outcome = self.outcomes[gen.number]
        with self.lock:
            outcome.requested = gen.requested
            if gen.requested == "?":  # an IP some sticky pod is bound to
                taken = sorted(set(self.first_ip.values()))
                rng = random.Random(f"{self.seed}/{gen.number}")
                outcome.requested = rng.choice(taken) if taken else ""
            if gen.kind == INTRUDER and not outcome.requested:
                return  # nothing to intrude on yet
            was_down = gen.node in self.down
        self.c.underlay.add_netns([self.netns(gen)])
        rc, out = self.cni("ADD", gen.node, self.env(gen))
        with self.lock:
            outcome.node_down = was_down or gen.node in self.down
            if rc == 0:
                self._added(gen, outcome, out)
            else:
                outcome.code, outcome.msg = out.get("code", -rc), out.get("msg", str(out))
                state = "node down" if outcome.node_down else "node up"
                self.counts[f"ADD {outcome.code} {state}"] += 1
                later = outcome.code == TRY_AGAIN_LATER and (
                    outcome.node_down or any(w in outcome.msg for w in LOAD)
                )
                expected = later or (gen.kind == INTRUDER and outcome.code == FIXED_IP_UNAVAILABLE)
                if not expected:
                    self.problems.append(f"ADD {gen} failed: {outcome.code} {outcome.msg}")
        if rc != 0:  # the kubelet's clean-up of a failed ADD
            self.delete(gen)

    def _added(self, gen: Gen, outcome: Outcome, out: dict[str, Any]) -> None:
        outcome.code = 0
        outcome.ip = out["ips"][0]["address"].split("/")[0]
        host = [i["name"] for i in out["interfaces"] if "sandbox" not in i]
        outcome.host_veth = next(name for name in host if name.startswith("veth"))
        if gen.kind == STICKY:
            first = self.first_ip.setdefault(gen.identity, outcome.ip)
            if outcome.ip != first:
                self.problems.append(f"{gen} got {outcome.ip}, its sticky IP is {first}")
        elif gen.kind in (REQUEST, INTRUDER) and outcome.ip != outcome.requested:
            self.problems.append(f"{gen} asked for {outcome.requested}, got {outcome.ip}")
        if gen.kind == INTRUDER:
            self.problems.append(f"{gen} was given {outcome.ip}, bound to a sticky pod")
        if gen.kind in (PLAIN, CLIENT) and out["ips"][0]["address"].endswith("/32"):
            self.problems.append(f"{gen}, an ordinary pod, got the fixed IP {outcome.ip}")

    def delete(self, gen: Gen) -> None:
        """DEL never fails: not late, not repeated, not with the netns gone or the daemon down
        (the shim spools it). One the daemon was killed in the middle of answers 11, and the
        kubelet sends it again: so does this runtime, a few times."""
        for attempt in range(1, DEL_TRIES + 1):
            with self.lock:
                self.counts["DEL while down" if gen.node in self.down else "DEL"] += 1
            rc, out = self.cni("DEL", gen.node, self.env(gen))
            if rc == 0 or out.get("code") != TRY_AGAIN_LATER or attempt == DEL_TRIES:
                break
            with self.lock:
                self.counts["DEL sent again after 11"] += 1
            time.sleep(0.2)
        with self.lock:
            if rc != 0:
                self.problems.append(f"DEL {gen} failed: {out}")
            self.outcomes[gen.number].gone = True
        subprocess.run(["ip", "netns", "del", self.netns(gen)], capture_output=True)

    def gc(self, node: str) -> tuple[int, dict[str, Any]]:
        """CNI GC on `node` with the attachments the runtime has there."""
        keep = [{"containerID": self.container_id(g), "ifname": "eth0"}
                for g in self.live() if g.node == node]  # fmt: skip
        conf = {"cniVersion": "1.1.0", "cni.dev/valid-attachments": keep}
        return self.cni("GC", node, {}, conf)


def spool_left(c: Cluster) -> list[str]:
    """Spool entries still there on a running node: DELs that were never replayed, or failed."""
    out = []
    for name, node in c.nodes.items():
        spool = node.daemon.spool_dir
        for root, _, files in os.walk(spool):
            out += [f"{name}: {os.path.join(root, f)} left in the spool" for f in files
                    if not f.startswith(".")]  # fmt: skip
    return out
