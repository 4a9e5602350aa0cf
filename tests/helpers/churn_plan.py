"""The churn property test's workload (issue 14): a seeded plan of pod operations on a 3-node
cluster, with the order a runtime would impose, and nothing about how they turn out.

A `Gen` is one generation of a pod identity: one sandbox (its own container ID, netns and, unless
it is a new sandbox of the same pod, its own pod UID). An `Op` acts on one generation (ADD, DEL,
or VANISH: the netns goes without a DEL, a DEL the runtime lost) or on a node's daemon (KILL -9,
START), or is a CHECK (a barrier). `after` lists the ops that must have finished first;
everything else may run at once.

What a plan holds, by design:
  * ADDs of one identity run in plan order (a StatefulSet has one pod of a name at a time; it is
    the DELs that come late);
  * a recreate ADDs the identity on another node while its old generation is still there; the old
    DEL comes later, after the new ADD (delayed), or at the same time (racing);
  * a new sandbox of the same pod (same UID, new container ID) on the same node, old DEL delayed;
  * DELs are sometimes repeated; some netns vanish without a DEL (the final GC's work: at least
    two fixed pods and an ordinary one at the end);
  * per-request fixed IPs (CNI_ARGS IP=), ordinary pods, and intruders asking for an IP a sticky
    pod is bound to (which must fail);
  * in the middle, one node's daemon is killed (-9) and started again a few ops later;
  * at a quarter and three quarters, a CHECK: every op before it finishes, the invariants are
    checked while late DELs are still outstanding, and the ops go on.
Every DEL a plan defers is in it by its end, so every old generation is deleted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STICKY, REQUEST, PLAIN, INTRUDER, CLIENT = "sticky", "request", "plain", "intruder", "client"
ADD, DEL, VANISH, KILL, START, CHECK = "ADD", "DEL", "VANISH", "KILL", "START", "CHECK"


@dataclass(frozen=True)
class Gen:
    number: int
    kind: str
    namespace: str
    name: str
    node: str
    uid: str
    requested: str = ""  # CNI_ARGS IP= ("?" for an intruder: a sticky IP, chosen when it runs)

    @property
    def identity(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Op:
    index: int
    verb: str
    gen: int = -1  # ADD, DEL, VANISH
    node: str = ""  # KILL, START
    after: tuple[int, ...] = ()


@dataclass
class Plan:
    ops: list[Op]
    gens: dict[int, Gen]
    killed: str  # the node whose daemon is killed


class Planner:
    def __init__(self, seed: int, nodes: list[str], sticky: int = 20, request: int = 4,
                 request_ips: list[str] | None = None) -> None:  # fmt: skip
        self.rng = random.Random(seed)
        self.nodes = nodes
        self.sticky = [f"db-{i}" for i in range(sticky)]
        self.request = [f"web-{i}" for i in range(request)]
        self.request_ips = request_ips or []
        self.ops: list[Op] = []
        self.gens: dict[int, Gen] = {}
        self.alive: dict[str, int] = {}  # identity -> its newest generation still there
        self.last_add: dict[str, int] = {}  # identity -> the op index of its newest ADD
        self.gate: dict[str, int] = {}  # identity -> a DEL its next ADD waits for
        self.deferred: list[tuple[int, str, int, tuple[int, ...], bool]] = []  # (due, verb, gen,
        # after, may be repeated)
        self.plain_alive: list[int] = []
        self.check_after_start = False

    def make(self, total: int, check_after_start: bool = False) -> Plan:
        """`total` ops (a few more when deferred DELs are due at the end); with
        `check_after_start`, a CHECK a few ops after the killed daemon's START too."""
        self.check_after_start = check_after_start
        kill_at, checks = total // 2, [total // 4, 3 * total // 4]
        killed, kill = self.rng.choice(self.nodes), -1
        while len(self.ops) + len(self.deferred) < total:
            self._emit_due(len(self.ops))
            if checks and len(self.ops) >= checks[0]:
                self._op(CHECK)
                checks.pop(0)
            elif kill < 0 and len(self.ops) >= kill_at:
                kill = self._op(KILL, node=killed)
                self._defer(len(self.ops) + self.rng.randint(8, 20), START, -1, (kill,))
            else:
                self._step()
        while self.deferred:  # every deferred DEL (and the restart) is in the plan
            self._emit_due(max(d[0] for d in self.deferred))
        # Two fixed pods and an ordinary one lose their netns without a DEL: the GC's work.
        fixed = sorted(self.alive.items())
        lost = self.rng.sample(fixed, min(2, len(fixed)))
        lost += [(f"mc/plain-{g}", g) for g in self.plain_alive[:1]]
        for identity, gen in lost:
            self._op(VANISH, gen, (self._add_of(gen),))
            self.alive.pop(identity, None)
        return Plan(self.ops, self.gens, killed)

    # ---- one step ----------------------------------------------------------------------------
    def _step(self) -> None:
        r = self.rng.random()
        if r < 0.70:
            self._fixed(STICKY, "prod", self.rng.choice(self.sticky))
        elif r < 0.82 and self.request:
            i = self.rng.randrange(len(self.request))
            self._fixed(REQUEST, "req", self.request[i], self.request_ips[i])
        elif r < 0.97:
            if self.plain_alive and self.rng.random() < 0.5:
                gen = self.plain_alive.pop(self.rng.randrange(len(self.plain_alive)))
                self._del(gen)
            else:
                number = len(self.gens)
                gen = self._gen(PLAIN, "mc", f"plain-{number}", self._node())
                self._op(ADD, gen)
                self.plain_alive.append(gen)
        else:  # an intruder asks for an IP a sticky pod is bound to; it must be refused
            number = len(self.gens)
            gen = self._gen(INTRUDER, "req", f"intruder-{number}", self._node(), requested="?")
            add = self._op(ADD, gen)
            self._op(DEL, gen, (add,))

    def _fixed(self, kind: str, namespace: str, name: str, requested: str = "") -> None:
        identity = f"{namespace}/{name}"
        old = self.alive.get(identity)
        if old is None:
            self._add(kind, namespace, name, self._node(), requested)
            return
        r = self.rng.random()
        here = self.gens[old].node
        if r < 0.35:  # recreate elsewhere, the old DEL delayed until after the new ADD
            add = self._add(kind, namespace, name, self._node(not_=here), requested)
            self._defer(len(self.ops) + self.rng.randint(1, 12), DEL, old,
                        (self._add_of(old), add), repeat=True)  # fmt: skip
        elif r < 0.45:  # recreate elsewhere, the old DEL racing the new ADD
            self._add(kind, namespace, name, self._node(not_=here), requested)
            self._del(old)
        elif r < 0.55 and kind == STICKY:  # a new sandbox of the same pod on the same node
            add = self._add(kind, namespace, name, here, requested, uid=self.gens[old].uid)
            self._defer(len(self.ops) + self.rng.randint(1, 12), DEL, old,
                        (self._add_of(old), add), repeat=True)  # fmt: skip
        elif r < 0.90:  # deleted (scaled down); the next ADD waits for this DEL
            self.gate[identity] = self._del(old)
            del self.alive[identity]
        else:  # the netns vanishes and the runtime never sends the DEL
            self._op(VANISH, old, (self._add_of(old),))
            del self.alive[identity]

    # ---- building blocks ---------------------------------------------------------------------
    def _add(self, kind: str, namespace: str, name: str, node: str, requested: str = "",
             uid: str = "") -> int:  # fmt: skip
        identity = f"{namespace}/{name}"
        gen = self._gen(kind, namespace, name, node, requested, uid)
        after = tuple(i for i in (self.last_add.get(identity), self.gate.pop(identity, None))
                      if i is not None)  # fmt: skip
        index = self._op(ADD, gen, after)
        self.last_add[identity] = index
        self.alive[identity] = gen
        return index

    def _del(self, gen: int, after: tuple[int, ...] = ()) -> int:
        """A DEL of `gen`; a quarter of them are sent again a little later."""
        index = self._op(DEL, gen, after or (self._add_of(gen),))
        if self.rng.random() < 0.25:
            self._defer(len(self.ops) + self.rng.randint(0, 8), DEL, gen, (index,))
        return index

    def _add_of(self, gen: int) -> int:
        return next(op.index for op in self.ops if op.verb == ADD and op.gen == gen)

    def _gen(self, kind: str, namespace: str, name: str, node: str, requested: str = "",
             uid: str = "") -> int:  # fmt: skip
        number = len(self.gens)
        self.gens[number] = Gen(number, kind, namespace, name, node, uid or f"uid-{number}",
                                requested)  # fmt: skip
        return number

    def _node(self, not_: str = "") -> str:
        return self.rng.choice([n for n in self.nodes if n != not_])

    def _op(self, verb: str, gen: int = -1, after: tuple[int, ...] = (), node: str = "") -> int:
        index = len(self.ops)
        self.ops.append(Op(index, verb, gen, node, after))
        return index

    def _defer(self, due: int, verb: str, gen: int, after: tuple[int, ...],
               repeat: bool = False) -> None:  # fmt: skip
        self.deferred.append((due, verb, gen, after, repeat))

    def _emit_due(self, now: int) -> None:
        """Emit every deferred op due by `now`, earliest first."""
        due = sorted(d for d in self.deferred if d[0] <= now)
        self.deferred = [d for d in self.deferred if d[0] > now]
        for _, verb, gen, after, repeat in due:
            if verb == START:
                self._op(START, node=self.ops[after[0]].node, after=after)
                if self.check_after_start:  # a few ops on, so that some run during the start
                    self._defer(len(self.ops) + 4, CHECK, -1, ())
            elif verb == CHECK:
                self._op(CHECK)
            elif repeat:
                self._del(gen, after)
            else:
                self._op(verb, gen, after)
