"""Sticky rules: which pods keep their IP across restarts and node moves without a reservation.

`moorctl sticky add --namespace NS [--pod-regex RE] [--retain DURATION]` stores one rule per
(namespace, regex) at `<prefix>/sticky/<name>`, the name derived from both so that adding the same
rule twice is idempotent. A pod matches when its namespace is the rule's and the regex (default:
every pod) matches its whole name; its first ADD then takes an IP from the fixed ranges, and the
IP stays bound to it for `retain` seconds after its last DEL (default 24 h): a StatefulSet's
`db-0` comes back, on any node, with its IP.

A regex is an operator's input, compiled once per rule and capped in length; Python's `re` has no
time limit, so the cap (and the anchored fullmatch on a pod name of at most 253 characters) is
what keeps a pathological pattern cheap enough.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from cni_plugin.naming import pod_namespace_problem
from ipamd.errors import Conflict
from ipamd.fixed.model import Identity
from ipamd.store.base import Store
from ipamd.store.keys import Keys

DEFAULT_RETAIN = 24 * 3600.0
MAX_REGEX = 256
MAX_RETAIN = 366 * 24 * 3600.0
ADD_RETRIES = 16


@dataclass(frozen=True)
class StickyRule:
    namespace: str
    pod_regex: str = ""  # empty: every pod of the namespace
    retain: float = DEFAULT_RETAIN
    created_by: str = ""
    created_at: float = 0.0
    _compiled: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if problem := pod_namespace_problem(self.namespace):
            raise ValueError(problem)
        if len(self.pod_regex) > MAX_REGEX:
            raise ValueError(f"--pod-regex is longer than {MAX_REGEX} characters")
        try:
            object.__setattr__(self, "_compiled", re.compile(self.pod_regex or ".*"))
        except re.error as exc:
            raise ValueError(f"--pod-regex {self.pod_regex!r} is not a valid regex: {exc}") from exc
        if not 0 < self.retain <= MAX_RETAIN:
            raise ValueError(f"--retain must be more than 0 and at most {MAX_RETAIN:.0f} seconds")

    @cached_property
    def name(self) -> str:
        """`<namespace>-<8 hex of the regex>`: a DNS label, the same for the same rule."""
        digest = hashlib.sha256(self.pod_regex.encode()).hexdigest()[:8]
        return f"{self.namespace[:54]}-{digest}"

    def matches(self, identity: Identity) -> bool:
        return (
            identity.named
            and identity.namespace == self.namespace
            and self._compiled is not None
            and self._compiled.fullmatch(identity.name) is not None
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "namespace": self.namespace,
                "podRegex": self.pod_regex,
                "retain": self.retain,
                "createdBy": self.created_by,
                "createdAt": self.created_at,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StickyRule:
        d = json.loads(data)
        return cls(
            str(d["namespace"]),
            str(d.get("podRegex", "")),
            float(d.get("retain", DEFAULT_RETAIN)),
            str(d.get("createdBy", "")),
            float(d.get("createdAt", 0)),
        )


class StickyRules:
    """The rules in the store. Reads go to the store each time (an ADD of a named pod reads one
    prefix); the list is small, written by operators only."""

    def __init__(self, store: Store, keys: Keys, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.clock = clock

    def all(self) -> list[StickyRule]:
        rules = []
        for kv in self.store.list_prefix(self.keys.sticky_prefix())[0]:
            try:
                rules.append(StickyRule.from_json(kv.value))
            except (ValueError, KeyError, TypeError):
                continue  # a hand-written bad rule matches nothing
        return sorted(rules, key=lambda r: r.name)

    def match(self, identity: Identity) -> StickyRule | None:
        """The first rule (by name) that matches `identity`, or None."""
        if not identity.named or not identity.namespace:
            return None
        return next((r for r in self.all() if r.matches(identity)), None)

    def add(self, rule: StickyRule) -> tuple[StickyRule, bool]:
        """Store `rule` (with its creation time); (the stored rule, created). Adding the same
        namespace and regex again changes only the retention, compare-and-swap: a `remove`
        racing with it is never undone (the add then creates the rule afresh)."""
        stamped = StickyRule(rule.namespace, rule.pod_regex, rule.retain, rule.created_by,
                             self.clock())  # fmt: skip
        key = self.keys.sticky(stamped.name)
        for _ in range(ADD_RETRIES):
            if self.store.create(key, stamped.to_json()):
                return stamped, True
            current = self.store.get(key)
            if current is None:
                continue  # removed in between: create it
            old = StickyRule.from_json(current.value)
            updated = StickyRule(old.namespace, old.pod_regex, rule.retain, old.created_by,
                                 old.created_at)  # fmt: skip
            if self.store.compare_and_swap(key, updated.to_json(), current.mod_revision):
                return updated, False
        raise Conflict(f"sticky rule {stamped.name} kept changing while being added; retry")

    def remove(self, name: str) -> bool:
        return self.store.delete(self.keys.sticky(name))
