"""Follow the store: changes other daemons or moorctl make to this node's IP records.

The allocator keeps its free set in memory (an allocation is one round trip, not a scan), so a
release done elsewhere — `moorctl release`, `moorctl node remove` through another node's daemon —
must reach that memory, or the IP stays "used" here until a restart.

Scope: one watch stream over this node's part of the store only (`watched_prefixes`): the IP
records of its own subnets, and their address conflict records (`ipamd/conflicts.py`). A watch
on the whole key prefix would bring every daemon every pod change of the cluster, a fan-out that
grows with nodes x churn. The subnet leases (every node's:
the routes need them) have their own watcher, `routing/lease_watch.py`, which also reports a
vanished lease of this node's to the lease manager.

Re-sync: when the watch breaks (store unreachable, history compacted, etcd restarted) the store
guard first compares this node's memory with the store, so that records the store lost are put
back rather than taken for released (`guard.py`); then the allocator reloads from a fresh listing
and the watch resumes from the revision read before it, so no change is missed. Events of several
prefixes may come out of revision order (Store.watch_prefixes), so the follower never resumes
from the last revision it saw: every new watch starts from a re-sync.

Re-scope: when the node takes a subnet its watch was not set up for (the lease manager calls
`subnets_changed`), the follower ends that watch and starts one over the new prefixes through the
same re-sync. The listing comes after the old watch ended and the new watch starts at the
revision read before the listing, so no change falls between the two watches. A re-sync costs
one probe, the node's own record listing and a reload, and a node takes a new subnet rarely: so
the same argument as for a break, rather than a second watch started from the allocator's own read
of the new subnet (whose revision it would have to hand over). A subnet the node stops holding
(removed by an admin, lost, taken) needs no re-scope: its events keep coming until the next
re-sync, applied to the pool the allocator keeps for it meanwhile (it allocates only from held
subnets); and a lost subnet that is claimed back never left the watch, so nothing of it is missed.

Locks: `_lock` guards `_watch_stop` (the stop event of the watch running now, or about to) and
`_scope` (the subnets it was set up for). The follower thread sets both together, and reads the
lease manager's subnets under it; `subnets_changed`, called by whichever thread changed them,
reads them first and takes `_lock` after (so `_lock` is taken before the lease manager's `_lock`,
never the other way round). A change after the follower set up its scope sets that watch's stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator

from ipamd.allocator import NodeAllocator
from ipamd.guard import StoreGuard
from ipamd.leases import SubnetLeaseManager
from ipamd.model import IPNetwork
from ipamd.store.base import Store, StoreError, StoreUnavailable, WatchEvent
from ipamd.store.keys import Keys, covering_prefixes

log = logging.getLogger(__name__)
RETRY = 1.0


class StoreFollower:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        leases: SubnetLeaseManager,
        allocator: NodeAllocator,
        guard: StoreGuard,
        stop: threading.Event,
        *,
        on_event: Callable[[str], None] = lambda key_kind: None,
        on_restart: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.leases = leases
        self.allocator = allocator
        self.guard = guard
        self.stop = stop
        self.on_event = on_event  # "ip", "subnet" or "other": what each watch event was about
        self.on_restart = on_restart  # "error" or "rescope": a new watch runs after a re-sync
        self._lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._scope: frozenset[IPNetwork] = frozenset()

    def watched_prefixes(self, subnets: Iterable[IPNetwork]) -> list[str]:
        """The one place that says what a node watches: the IP records of its subnets, and their
        address conflict records (an operator's clear, made through any node, unblocks the IP)."""
        subnets = list(subnets)
        return covering_prefixes(
            [self.keys.ips_prefix_for(s) for s in subnets]
            + [self.keys.conflicts_prefix_for(s) for s in subnets]
        )

    def subnets_changed(self) -> None:
        """The lease manager's subnets changed: end the watch if it misses one of them."""
        held = set(self.leases.subnets)
        with self._lock:
            if not held <= self._scope:
                self._watch_stop.set()

    def run(self, start_revision: int) -> None:
        """Watch from `start_revision` (the revision the allocator was loaded at, + 1), then
        re-sync and watch again each time the watch breaks or must be re-scoped."""
        threading.Thread(target=self._end_on_stop, name="store-follower-stop", daemon=True).start()
        revision = start_revision
        reason = ""
        while not self.stop.is_set():
            watch_stop, prefixes = self._set_up_scope()
            if reason:  # at once for a re-scope; after a pause for a broken watch
                resynced = self._resync(RETRY if reason == "error" else 0.0)
                if resynced is None:
                    return
                revision = resynced
            try:
                reason = self._follow(prefixes, revision, watch_stop, reason)
            except StoreError as exc:
                log.info("store watch interrupted (%s); verifying and reloading", exc)
                reason = "error"

    def _set_up_scope(self) -> tuple[threading.Event, list[str]]:
        """A fresh stop event and the prefixes of the subnets held now, published together."""
        with self._lock:
            self._watch_stop = threading.Event()
            if self.stop.is_set():
                self._watch_stop.set()
            subnets = self.leases.subnets
            self._scope = frozenset(subnets)
            return self._watch_stop, self.watched_prefixes(subnets)

    def _follow(
        self, prefixes: list[str], revision: int, watch_stop: threading.Event, reason: str
    ) -> str:
        """Apply the watch's events until it is stopped; why it was ("" for the daemon's stop)."""
        events: Iterator[WatchEvent] = iter(())
        if prefixes:  # empty while the node holds no subnet
            events = self.store.watch_prefixes(prefixes, revision, watch_stop)
        if reason:
            self.on_restart(reason)
        log.debug("watching %s from revision %d", " ".join(prefixes) or "nothing", revision)
        if not prefixes:
            watch_stop.wait()  # until the node holds a subnet again, or the daemon stops
        for event in events:
            self.guard.saw_revision(event.revision)
            self._apply(event.kind, event.key, event.revision)
        if self.stop.is_set():
            return ""
        log.info("node %s holds a subnet its store watch was not set up for; re-scoping it",
                 self.leases.node)  # fmt: skip
        return "rescope"

    def _resync(self, wait: float) -> int | None:
        """The revision to watch from after a re-sync (None: the daemon stops)."""
        while not self.stop.wait(wait):
            wait = RETRY
            try:
                return self.guard.resync() + 1
            except StoreUnavailable:
                continue
            except StoreError as exc:
                log.warning("store resync not finished, retrying: %s", exc)
        return None

    def _end_on_stop(self) -> None:
        """The daemon's stop ends the watch running now (`_set_up_scope` covers a later one)."""
        self.stop.wait()
        with self._lock:
            self._watch_stop.set()

    def _apply(self, kind: str, key: str, revision: int) -> None:
        ip = self.keys.parse_ip(key)
        if ip is not None:
            self.on_event("ip")
            self.allocator.observe(kind, ip, revision)
            return
        self.on_event("other")
        conflict = self.keys.parse_conflict(key)
        if conflict is not None:
            self.allocator.observe_conflict(kind, conflict, revision)
