"""Issue 14's churn property test: random ADD/DEL/recreate operations over 20 sticky identities
(`prod/db-0..19`), a few per-request fixed IPs, ordinary pods and intruders on the simulated
3-node cluster, with delayed, racing and repeated DELs, netns that vanish without a DEL, and one
node's daemon killed (-9) in the middle and started again (its spooled DELs replay); then CNI GC
on every node with the attachments still there.

Afterwards, from the store and the kernel (`tests/helpers/churn_checks.py`): no IP has two
owners, no identity holds two IPs, every sticky identity still has the IP it first got, exactly
the live pods hold IPs, every node's /32 routes agree with the bindings, every daemon's memory
agrees with the store, no spooled DEL is left, and live pods are reached from another node,
unNATed. The same invariants (but the GC's) hold at a quarter and at three quarters of the run,
while late DELs are still outstanding, and just before the GC.

Knobs (environment): MOOR_CHURN_SEED (default: random, printed; a failure's message names it
too), MOOR_CHURN_OPS (default 300, about 15 s per backend; fewer for a quick local run),
MOOR_CHURN_THREADS (default 4). The plan is a function of the seed alone; how its concurrent ops
interleave is not.

CNI calls keep reaching the killed node while its daemon starts again, and the invariants are
also checked a few ops after that start, with store conflicts counted. This is how the test found
two bugs, both fixed: a DEL the shim spooled after the start's spool replay and before the CNI
socket existed was never replayed (the socket now listens before the replay), and the start's
restore from the host veths took a fixed pod a newer generation had replaced for one whose record
the store lost (`test_a_restart_puts_back_no_record_of_a_superseded_fixed_pod`).
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random
import secrets
import subprocess
import time
from collections.abc import Callable

import pytest

from ipamd.model import IPNetwork
from tests.conftest import require
from tests.helpers import etcd
from tests.helpers.churn_checks import (
    address_problems,
    memory_problems,
    model_problems,
    route_problems,
    store_problems,
)
from tests.helpers.churn_plan import CLIENT, PLAIN, Gen, Plan, Planner
from tests.helpers.churn_run import ChurnRunner, spool_left
from tests.helpers.cluster import Cluster
from tests.helpers.fixed_store import StoreView, add_sticky_rule
from tests.helpers.traffic import Probe, probe_all

pytestmark = [pytest.mark.root, pytest.mark.netns]

FIXED_RANGE = "10.201.250.0/24"
REQUEST_IPS = [f"10.201.250.{200 + i}" for i in range(4)]
CONVERGE_WITHIN = 15.0  # reconcile interval 1 s; the watches are faster still
REACH_SAMPLE = 6


def settings() -> tuple[int, int, int]:
    """(seed, ops, threads) from the environment (the module docstring's knobs)."""
    env = os.environ.get
    seed = int(env("MOOR_CHURN_SEED") or secrets.randbelow(2**32))
    return seed, int(env("MOOR_CHURN_OPS", "300")), int(env("MOOR_CHURN_THREADS", "4"))


def converged(check: Callable[[], list[str]], timeout: float = CONVERGE_WITHIN) -> list[str]:
    """`check()` until it finds nothing wrong or `timeout` passes; what it found last."""
    deadline = time.monotonic() + timeout
    while (problems := check()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return problems


def invariants(c: Cluster, runner: ChurnRunner, fixed: IPNetwork, *, gc_done: bool = False
               ) -> list[str]:  # fmt: skip
    """Every invariant, with every op so far done: the store's at once, the kernel's and the
    daemons' memory once they caught up (or what is still wrong after CONVERGE_WITHIN). Before
    the GC, old pods whose late DEL is still to come have the IP in their netns too."""
    view = StoreView.read(c)
    problems = store_problems(view, fixed) + model_problems(view, runner, gc_done=gc_done)
    problems += spool_left(c)  # every DEL spooled while a daemon was down was replayed
    if problems:
        return problems
    return converged(lambda: route_problems(c, view, fixed) + memory_problems(c, view, True)
                     + (address_problems(runner) if gc_done else []))  # fmt: skip


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_fixed_ip_churn_keeps_every_invariant(backend: str) -> None:
    ok, why = etcd.available()
    require(ok, why)
    seed, total, threads = settings()
    print(f"churn: MOOR_CHURN_SEED={seed} MOOR_CHURN_OPS={total} MOOR_CHURN_THREADS={threads}")
    fixed = ipaddress.ip_network(FIXED_RANGE)
    started = time.monotonic()
    with Cluster(backend=backend, reconcile_interval=1, fixed_ranges=(FIXED_RANGE,),
                 prefix="mch", daemon_args=("--cooldown", "0")) as c:  # fmt: skip
        for node in c.nodes.values():  # strict reverse-path filtering, as the move test
            subprocess.run(["ip", "netns", "exec", node.netns, "sysctl", "-qw",
                            "net.ipv4.conf.all.rp_filter=1"], check=True)  # fmt: skip
        add_sticky_rule(c, "prod")
        plan = Planner(seed, list(c.nodes), request_ips=REQUEST_IPS).make(total, True)
        runner = ChurnRunner(c, plan, seed, threads, check=lambda r: invariants(c, r, fixed),
                             hold_during_start=False)  # fmt: skip
        clients = {n: runner.add_client(n) for n in ("n1", "n2")}
        runner.run()
        ran = time.monotonic() - started
        assert all(n.daemon.proc and n.daemon.proc.poll() is None for n in c.nodes.values())
        before = StoreView.read(c)
        runner.problems += [f"before the GC: {p}" for p in invariants(c, runner, fixed)]

        for name in c.nodes:
            rc, out = runner.gc(name)
            assert rc == 0, f"GC on {name}: {out}"
        after = StoreView.read(c)
        report(seed, plan, runner, ran, before, after)
        assert runner.problems == [], f"seed {seed}: " + "\n".join(runner.problems)
        problems = invariants(c, runner, fixed, gc_done=True)
        assert problems == [], f"seed {seed}: " + "\n".join(problems)
        problems = unreachable(c, runner, clients, random.Random(seed))
        assert problems == [], f"seed {seed}: " + "\n".join(problems)
    print(f"churn: seed {seed}: {time.monotonic() - started:.1f} s in all")


def unreachable(c: Cluster, runner: ChurnRunner, clients: dict[str, Gen], rng: random.Random
                ) -> list[str]:  # fmt: skip
    """A sample of the live pods (fixed ones first), each probed from a client pod on another
    node; one line per pod that does not answer or sees another source than the client's IP."""
    targets = [g for g in runner.live() if g.kind != CLIENT]
    fixed_pods = [g for g in targets if g.kind != PLAIN]
    plain_pods = [g for g in targets if g.kind == PLAIN]
    sample = rng.sample(fixed_pods, min(REACH_SAMPLE - 2, len(fixed_pods)))
    sample += rng.sample(plain_pods, min(REACH_SAMPLE - len(sample), len(plain_pods)))
    if not sample:
        return ["no live pod to reach"]
    c.echo(*[runner.netns(g) for g in sample])
    jobs: dict[str, list[Probe]] = collections.defaultdict(list)
    asked: dict[str, list[tuple[Gen, str]]] = collections.defaultdict(list)
    for gen in sample:
        client = clients["n2" if gen.node == "n1" else "n1"]
        jobs[runner.netns(client)].append(Probe(runner.outcomes[gen.number].ip))
        asked[runner.netns(client)].append((gen, runner.outcomes[client.number].ip))
    bad = []
    for source, replies in probe_all(dict(jobs)).items():
        for (gen, client_ip), reply in zip(asked[source], replies, strict=True):
            if not reply.ok or reply.src != client_ip:
                bad.append(f"{source} -> {gen} ({runner.outcomes[gen.number].ip}): {reply}")
    return bad


def report(seed: int, plan: Plan, runner: ChurnRunner, ran: float, before: StoreView,
           after: StoreView) -> None:  # fmt: skip
    """What the run did, for the log (pytest -s) and a failure's context."""
    verbs = collections.Counter(op.verb for op in plan.ops)
    codes = collections.Counter(
        (plan.gens[n].kind, o.code) for n, o in runner.outcomes.items() if o.code is not None
    )
    held = sum(b.held for b in after.bindings.values())
    print(
        f"churn: seed {seed}: {len(plan.ops)} ops {dict(verbs)} in {ran:.1f} s "
        f"(killed {plan.killed}); ADD outcomes by kind and code {dict(codes)}; "
        f"{dict(runner.counts)}; the GC released {len(before.ips) - len(after.ips)}; "
        f"{len(after.bindings)} bindings, {held} held; {len(runner.live())} live pods"
    )


def test_a_restart_puts_back_no_record_of_a_superseded_fixed_pod() -> None:
    """db-0 moves from n1 to n2 while n1 has not run its DEL, then is deleted (its sticky IP
    retained); n1's daemon restarts: the old pod's veth must not bring its record back."""
    ok, why = etcd.available()
    require(ok, why)
    with Cluster(backend="host-gw", fixed_ranges=(FIXED_RANGE,), prefix="mch") as c:
        add_sticky_rule(c, "prod")
        db0 = "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;K8S_POD_UID="
        old = c.add_pod("n1", db0 + "u1")
        c.delete_pod(c.add_pod("n2", db0 + "u2"))  # took the IP over; now scaled down
        c.kill("n1")
        c.start("n1")
        view = StoreView.read(c)
        (binding,) = view.bindings.values()
        assert binding.state == "retained" and str(binding.ip) == old.ip
        assert view.ips.get(binding.ip) is None, "the superseded pod's record is back"
        assert c.status("n1")["conflicts"] == []  # type: ignore[index]
