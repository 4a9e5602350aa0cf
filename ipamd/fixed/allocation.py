"""The node's side of fixed IPs: which fixed IP (if any) an ADD gets, claiming it, releasing it,
and the node's memory of the fixed IPs it hosts.

Precedence (SPEC-NOTES, fixed IPs), for the pod identity of the request:
  1. a reservation of the identity (`moorctl reserve`): its IP, whatever the request asks;
  2. a sticky rule that matches the identity: the IP it is bound to (on any node, within the
     retention period), else a free IP of the fixed ranges;
  3. a requested IP (CNI_ARGS IP=, args.cni.ips, runtimeConfig.ips) inside a fixed range: that one,
     if it is free or bound to this identity;
  4. anything else is the node allocator's (an IP of the node's subnets, requested or not).
A requested IP that differs from what 1 or 2 gives is refused, never silently ignored.

A sticky pod bound to nothing yet gets the lowest free fixed IP; another node's ADD may claim the
same one between this node's choice and its claim (a StatefulSet scaled up in parallel). The claim
then fails on the binding's compare, and the ADD chooses again (at most FRESH_TRIES times) rather
than failing: only an IP the pod did not ask for and was not bound to is chosen again, and the
second choice is one at random of the RETRY_SPREAD lowest free IPs, so that a burst of racing
first ADDs spreads out instead of all trying the same lowest one again.

Memory: `_held` maps the handles of this node's fixed attachments to their allocations and the
store revision of their claim, under `_lock`; it is what CHECK, GC, the leak GC and the route
reconcile (the /32s this node hosts) see. It is loaded at start from the bindings that name this
node; the fixed-binding watcher (`forget_moved`) drops what a binding newer than the claim says
moved to another node or was released; a binding older than the claim (the watch lags behind
this node's own write) never drops it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from cni_plugin.datapath.errors import DatapathError
from ipamd.audit import audit
from ipamd.errors import IpamError
from ipamd.fixed.bindings import Claimed, FixedBindings, FixedIPUnavailable
from ipamd.fixed.model import REQUEST, RESERVATION, STICKY, FixedBinding, Identity
from ipamd.fixed.sticky import StickyRules
from ipamd.model import Allocation, IPAddress, IPNetwork, Owner

log = logging.getLogger(__name__)
SCAN_LIMIT = 1 << 16  # addresses looked at for a free fixed IP before giving up
FRESH_TRIES = 8  # claims of a freshly chosen free IP before a concurrent ADD's win is the answer
RETRY_SPREAD = 32  # after a lost race: a free IP at random among this many lowest


class Choice(NamedTuple):
    """The fixed IP an ADD gets, its source and (sticky) retention."""

    ip: IPAddress
    source: str
    retain: float
    fresh: bool = False  # a free IP picked for a sticky pod bound to none: may be chosen again


class FixedRangesExhausted(IpamError):
    """A sticky pod needs a fixed IP and the fixed ranges have none free."""


class FixedAllocator:
    def __init__(
        self,
        bindings: FixedBindings,
        rules: StickyRules,
        node: str,
        *,
        detach: Callable[[str, IPAddress], None] = lambda host_veth, ip: None,
        on_move: Callable[[], None] = lambda: None,
        on_moved_away: Callable[[float], None] = lambda seconds: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bindings = bindings
        self.rules = rules
        self.node = node
        self.detach = detach  # forget the neighbour toward a pod whose IP moved away
        self.on_move = on_move  # metrics: this node took a fixed IP over
        self.on_moved_away = on_moved_away  # metrics: the new claim's age when this node let go
        self.clock = clock
        self._lock = threading.Lock()
        # handle -> (allocation, claim revision, binding as claimed)
        self._held: dict[tuple[str, str, str], tuple[Allocation, int, FixedBinding | None]] = {}

    # ---- memory -------------------------------------------------------------------------------
    def load(self) -> None:
        """This node's fixed attachments, from the bindings in the store."""
        held: dict[tuple[str, str, str], tuple[Allocation, int, FixedBinding | None]] = {}
        for binding in self.bindings.held_on(self.node):
            if binding.held and binding.node == self.node and binding.handle is not None:
                alloc = self.bindings.allocation(binding)
                if alloc is not None:
                    held[binding.handle] = (alloc, 0, binding)
        with self._lock:
            self._held = held

    def get(self, handle: tuple[str, str, str]) -> Allocation | None:
        with self._lock:
            entry = self._held.get(handle)
        return entry[0] if entry is not None else None

    def allocations(self, network: str | None = None) -> list[Allocation]:
        with self._lock:
            held = [entry[0] for entry in self._held.values()]
        return [a for a in held if network is None or a.owner.network == network]

    def forget_moved(self, bindings: Iterable[FixedBinding], revision: int) -> list[Allocation]:
        """Drop from memory what `bindings` (the store at `revision`) say another attachment or
        node holds now (a newer generation took it over), unless this node's claim is newer than
        that view; the allocations dropped. A binding that is simply gone is kept: only a release
        by this node ends a held binding (and forgets it itself), so a held binding that vanished
        was lost by the store, and the store guard puts it back."""
        current = {b.ip: b for b in bindings}
        dropped = []
        with self._lock:
            for handle, (alloc, claimed_at, _) in list(self._held.items()):
                if claimed_at > revision:
                    continue
                binding = current.get(alloc.ip)
                if binding is not None and (binding.handle != handle or binding.node != self.node):
                    dropped.append(self._held.pop(handle)[0])
        return dropped

    def follow(self, snapshot: Mapping[IPAddress, FixedBinding], revision: int) -> None:
        """The fixed-binding watcher's view changed: what moved away leaves memory, and the
        node's neighbour entry toward the old pod goes (the reconcile changes the route)."""
        for alloc in self.forget_moved(snapshot.values(), revision):
            now = snapshot.get(alloc.ip)
            audit("moved-away", ip=alloc.ip, pod=alloc.owner.pod or "-", node=self.node,
                  to=now.node if now is not None and now.held else "-")  # fmt: skip
            if now is not None and now.held and now.node != self.node:
                self.on_moved_away(max(0.0, self.clock() - now.since))
            if alloc.host_veth:
                try:
                    self.detach(alloc.host_veth, alloc.ip)
                except DatapathError as exc:
                    log.warning("forgetting the neighbour of %s: %s", alloc.ip, exc)

    # ---- ADD / DEL ----------------------------------------------------------------------------
    def choose(
        self, owner: Owner, requested: IPAddress | None, *, spread: int = 1
    ) -> Choice | None:
        """The fixed IP for this ADD, or None: the node allocator's turn (`spread`: see
        `_free_ip`)."""
        identity = Identity.of(owner)
        bound = self.bindings.of_identity(identity)
        if bound is not None and bound.source == RESERVATION:
            self._check_request(requested, bound.ip, "reserved for", identity)
            return Choice(bound.ip, RESERVATION, 0.0)
        rule = self.rules.match(identity)
        if rule is not None:
            ip = bound.ip if bound is not None else requested or self._free_ip(spread)
            self._check_request(requested, ip, "bound to", identity)
            return Choice(ip, STICKY, rule.retain, fresh=bound is None and requested is None)
        if requested is not None and self.bindings.is_fixed(requested):
            return Choice(requested, REQUEST, 0.0)
        return None

    def claim(
        self,
        owner: Owner,
        choice: Choice,
        *,
        host_veth: str = "",
        netns: str = "",
        netns_inode: int = 0,
    ) -> Claimed:
        """Claim `choice`; a fresh choice another ADD claimed first is chosen again (above)."""
        for attempt in range(1, FRESH_TRIES + 1):
            try:
                claimed = self.bindings.claim(
                    choice.ip, owner, self.node, source=choice.source, retain=choice.retain,
                    host_veth=host_veth, netns=netns, netns_inode=netns_inode,
                )  # fmt: skip
                break
            except FixedIPUnavailable:
                again = self.choose(owner, None, spread=RETRY_SPREAD) if choice.fresh else None
                if again is None or attempt == FRESH_TRIES:
                    raise
                log.info("fixed IP %s went to another pod first; %s takes %s",
                         choice.ip, owner.pod or "-", again.ip)  # fmt: skip
                choice = again
        with self._lock:
            self._held[owner.handle] = (claimed.allocation, claimed.revision, claimed.binding)
        if claimed.replaced is not None:
            new = claimed.binding.generation
            audit(
                "move", ip=choice.ip, pod=claimed.binding.identity.text, node=self.node,
                uid=new.uid if new else "-", container=new.container_id if new else "-",
                replaces=claimed.replaced.uid or claimed.replaced.container_id,
                was_on=claimed.previous_node or "-",
            )  # fmt: skip
            self.on_move()
        return claimed

    def release(self, handle: tuple[str, str, str]) -> Allocation | None:
        """Owner-checked; None when the handle holds no fixed IP (or lost it to a newer pod)."""
        alloc = self.get(handle)
        let_go = self.bindings.release(handle, self.node)
        with self._lock:
            self._held.pop(handle, None)
        if let_go is None:
            return None
        return alloc

    # ---- after a store loss ---------------------------------------------------------------------
    def put_back(self, alloc: Allocation) -> str:
        """Put back a live pod's fixed IP (from memory, or from its host veth's record after a
        restart); "" when done, else the conflict."""
        with self._lock:
            entry = self._held.get(alloc.owner.handle)
        problem = self.bindings.put_back(alloc, entry[2] if entry is not None else None)
        if not problem:
            with self._lock:
                self._held.setdefault(alloc.owner.handle, (alloc, 0, entry[2] if entry else None))
        return problem

    def superseded(self, alloc: Allocation) -> bool:
        """Its binding names another attachment of the same pod identity: a newer generation
        took the IP over, and `alloc` is what an old one left behind."""
        binding = self.bindings.get(alloc.ip)
        return (
            binding is not None
            and binding.identity == Identity.of(alloc.owner)
            and binding.handle != alloc.owner.handle
        )

    def forget(self, alloc: Allocation) -> bool:
        """Drop a pod that is gone and whose records the store lost: memory only."""
        with self._lock:
            entry = self._held.get(alloc.owner.handle)
            if entry is None or entry[0] != alloc:
                return False
            del self._held[alloc.owner.handle]
        return True

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _check_request(
        requested: IPAddress | None, ip: IPAddress, how: str, identity: Identity
    ) -> None:
        if requested is not None and requested != ip:
            raise FixedIPUnavailable(
                f"{identity.text} asks for {requested} but {ip} is {how} it; "
                "unreserve it (or remove the sticky rule) first"
            )

    def _free_ip(self, spread: int = 1) -> IPAddress:
        """The lowest fixed IP with no binding, no IP record and no cooldown; with `spread`, one
        at random of that many lowest (fewer when fewer are free)."""
        taken = {b.ip for b in self.bindings.all()} | self.bindings.unavailable()
        free: list[IPAddress] = []
        looked = 0
        for network in sorted(self.bindings.fixed_ranges(), key=_order):
            for ip in _usable(network):
                looked += 1
                if looked > SCAN_LIMIT or len(free) >= spread:
                    break
                if ip not in taken:
                    free.append(ip)
        if not free:
            raise FixedRangesExhausted("no free IP left in the fixed ranges for a sticky pod")
        return random.choice(free)


def _order(network: IPNetwork) -> tuple[int, int]:
    return network.version, int(network.network_address)


def _usable(network: IPNetwork) -> Iterable[IPAddress]:
    """Hosts of a fixed range: a /32 (/31) range is its own address(es)."""
    if network.num_addresses <= 2:
        return iter(network)
    return network.hosts()
