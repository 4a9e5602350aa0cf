"""What operators do with fixed pod IPs, on the cluster-wide store: reservations, sticky rules,
listings; and the daemon's retention sweep. `moorctl` reaches it through the Admin service
(`ipamd/admin_fixed.py`); it is tested without gRPC.

Every change is logged as one AUDIT line (`ipamd/audit.py`) by the daemon that made it, with the
actor: the `user@host` moorctl sends and the peer uid the gRPC gate let in. The actor name is an
attribution, not an authentication: only root reaches this API, and root may claim any name.

No state in memory: the store is the truth, and every change is one compare-guarded transaction
(`FixedBindings`), so operators on several nodes, the sweeps of every daemon and the CNI path race
freely. Every daemon sweeps; a binding ends in exactly one transaction, so it is audited once.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ipamd.audit import audit
from ipamd.errors import NotFound
from ipamd.fixed.bindings import FixedBindings, FixedIPUnavailable
from ipamd.fixed.model import RESERVATION, SOURCES, FixedBinding, Identity
from ipamd.fixed.sticky import DEFAULT_RETAIN, StickyRule, StickyRules
from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig
from ipamd.ops import NO_NETWORK
from ipamd.store.base import Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)

STATES = ("held", "reserved", "retained")
MAX_ACTOR = 128
UNKNOWN_ACTOR = "unknown"


@dataclass(frozen=True)
class Actor:
    """Who asked: `user@host` as the client says (sanitised), and the peer uid if known."""

    name: str = UNKNOWN_ACTOR
    uid: int | None = None

    @classmethod
    def claimed(cls, name: str | None, uid: int | None = None) -> Actor:
        """A client-sent name, made safe to store and log: printable ASCII without spaces, at
        most 128 characters; anything else is replaced by `?`."""
        text = "".join(c if "\x21" <= c <= "\x7e" else "?" for c in (name or "")[:MAX_ACTOR])
        return cls(text or UNKNOWN_ACTOR, uid)


@dataclass(frozen=True)
class Unreserved:
    binding: FixedBinding  # the reservation as it was
    cooldown: float  # seconds the IP now cools down (0: a pod holds it until its DEL)


@dataclass(frozen=True)
class StickyAdded:
    rule: StickyRule
    created: bool
    outcome: str  # created, updated (another retention), unchanged


class FixedOps:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        *,
        network: Callable[[], NetworkConfig | None],
        node: str = "",
        cooldown: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`network` reads the cluster network config (its fixed ranges) when a reservation
        needs it; `node` is the serving daemon's, recorded by the retention sweep."""
        self.store = store
        self.keys = keys
        self.network = network
        self.node = node
        self.cooldown = cooldown
        self.bindings = FixedBindings(store, keys, self._ranges, cooldown=cooldown, clock=clock)
        self.rules = StickyRules(store, keys, clock)

    def _ranges(self) -> Iterable[IPNetwork]:
        config = self.network()
        if config is None:
            raise NotFound(NO_NETWORK)
        if not config.fixed_ranges:
            raise FixedIPUnavailable(
                "the network has no fixed ranges: they are set by `moorctl network init "
                "--fixed-range CIDR` when the network config is first written"
            )
        return config.fixed_ranges

    # ---- reservations ---------------------------------------------------------------------
    def reserve(self, pod: str, ip: str, actor: Actor) -> FixedBinding:
        """Pin `ip` to the pod NAMESPACE/POD (or POD) until `unreserve`."""
        identity = self._identity(pod)
        binding = self.bindings.reserve(identity, _ip(ip), actor.name)
        audit("reserve", ip=binding.ip, pod=identity.text, state=binding.state,
              by=actor.name, uid=actor.uid)  # fmt: skip
        return binding

    def unreserve(self, actor: Actor, *, ip: str = "", pod: str = "") -> Unreserved:
        """End the reservation of `ip`, or of the pod's fixed IP."""
        expect = None
        if pod:
            expect = self._identity(pod)
            bound = self.bindings.of_identity(expect)
            if bound is None or bound.source != RESERVATION:
                what = (
                    f" (its fixed IP {bound.ip} is {bound.source}, {bound.state})" if bound else ""
                )
                raise NotFound(f"{expect.text} has no reservation{what}")
            address = bound.ip
        elif ip:
            address = _ip(ip)
        else:
            raise ValueError("give the IP or the NAMESPACE/POD whose reservation ends")
        was = self.bindings.unreserve(address, expect)
        audit("unreserve", ip=was.ip, pod=was.identity.text, state=was.state,
              by=actor.name, uid=actor.uid)  # fmt: skip
        return Unreserved(was, 0.0 if was.held else self.cooldown)

    def _identity(self, text: str) -> Identity:
        """NAMESPACE/POD or POD, each a valid Kubernetes name (ValueError saying which is not)."""
        identity = Identity.parse(text.strip())
        self.keys.fixed_identity(identity.namespace, identity.name)  # validates both names
        return identity

    # ---- listing --------------------------------------------------------------------------
    def list(
        self,
        *,
        node: str = "",
        namespace: str = "",
        pod: str = "",
        source: str = "",
        state: str = "",
    ) -> list[FixedBinding]:
        """Every fixed binding in address order, filtered (node: where it is or was last)."""
        if source and source not in SOURCES:
            raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
        if state and state not in STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        return [
            b
            for b in self.bindings.all()
            if (not node or b.node == node)
            and (not namespace or b.identity.namespace == namespace)
            and (not pod or b.identity.name == pod)
            and (not source or b.source == source)
            and (not state or b.state == state)
        ]

    # ---- sticky rules ---------------------------------------------------------------------
    def sticky_add(
        self, namespace: str, pod_regex: str, retain: float, actor: Actor
    ) -> StickyAdded:
        """Add (or re-add: the retention is updated) the rule for `namespace` and `pod_regex`."""
        rule = StickyRule(namespace, pod_regex, retain or DEFAULT_RETAIN, actor.name)
        old = self._rule(rule.name)
        stored, created = self.rules.add(rule)
        if created:
            outcome = "created"
        else:
            outcome = "unchanged" if old is not None and old.retain == stored.retain else "updated"
        audit("sticky-add", rule=stored.name, namespace=stored.namespace, regex=stored.pod_regex,
              retain=f"{stored.retain:g}s", outcome=outcome, by=actor.name,
              uid=actor.uid)  # fmt: skip
        return StickyAdded(stored, created, outcome)

    def sticky_list(self) -> list[StickyRule]:
        return self.rules.all()

    def sticky_remove(self, name: str, actor: Actor) -> StickyRule | None:
        """Remove the rule `name`; what it was (None if its record was unreadable). Bindings it
        made keep their own retention: they end on their own."""
        key = self.keys.sticky(name)  # ValueError for a name no rule can have
        if self.store.get(key) is None:
            raise NotFound(f"no sticky rule {name} (`moorctl sticky list` shows them)")
        rule = self._rule(name)
        if not self.rules.remove(name):
            raise NotFound(f"no sticky rule {name} (removed meanwhile)")
        audit("sticky-remove", rule=name, namespace=rule.namespace if rule else None,
              regex=rule.pod_regex if rule else None, by=actor.name,
              uid=actor.uid)  # fmt: skip
        return rule

    def _rule(self, name: str) -> StickyRule | None:
        kv = self.store.get(self.keys.sticky(name))
        if kv is None:
            return None
        try:
            return StickyRule.from_json(kv.value)
        except (ValueError, KeyError, TypeError):
            return None

    # ---- the daemon's sweep ---------------------------------------------------------------
    def expire_retained(self) -> list[FixedBinding]:
        """End sticky bindings whose retention is over (every daemon runs it each leak-GC
        interval); each one ended here is audited `retention-ended`."""
        try:
            ended = self.bindings.expire(self.node)
        except StoreError as exc:
            log.warning("fixed-IP retention sweep skipped: %s", exc)
            return []
        for b in ended:
            audit("retention-ended", ip=b.ip, pod=b.identity.text, node=b.node,
                  retain=f"{b.retain:g}s", released=_iso(b.released_at),
                  by=f"moor-ipamd@{self.node}")  # fmt: skip
        return ended


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else "-"
