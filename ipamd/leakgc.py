"""The daemon's own leak GC, because runtimes barely call CNI GC (containerd never, CRI-O at start).

An allocation is a leak candidate when its netns no longer exists (path gone, or now a different
namespace) and its host veth is gone. A candidate is released only after it has stayed a candidate
for the whole grace period and a final re-check of the store record and the kernel agrees. A round
whose view is incomplete (the link listing failed, a netns could not be stat'ed) releases nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ipamd.liveness import attachment_gone
from ipamd.model import Allocation
from ipamd.node import NodeIpam

log = logging.getLogger(__name__)


class LeakCollector:
    def __init__(
        self,
        ipam: NodeIpam,
        host_link_names: Callable[[], set[str]],
        *,
        grace: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ipam = ipam
        self.host_link_names = host_link_names
        self.grace = grace
        self.clock = clock
        self._since: dict[tuple[str, str, str], float] = {}

    def _is_candidate(self, alloc: Allocation, links: set[str]) -> bool:
        return attachment_gone(alloc, links)

    def sweep(self) -> list[Allocation]:
        """One round; returns what it released."""
        try:
            links = self.host_link_names()
            allocations = self.ipam.allocations()
            candidates = [a for a in allocations if self._is_candidate(a, links)]
        except Exception as exc:  # noqa: BLE001 - an incomplete view releases nothing
            log.warning("leak GC round skipped, incomplete view: %s", exc)
            return []
        now = self.clock()
        keep = {a.owner.handle for a in candidates}
        self._since = {h: t for h, t in self._since.items() if h in keep}
        released = []
        for alloc in candidates:
            first = self._since.setdefault(alloc.owner.handle, now)
            if now - first < self.grace:
                continue
            try:
                if not self._is_candidate(alloc, self.host_link_names()):
                    continue
                if self.ipam.release_if_unchanged(alloc):
                    released.append(alloc)
                    log.warning(
                        "leak GC released %s of %s/%s (pod %s): netns and host veth gone for %.0fs",
                        alloc.ip,
                        alloc.owner.container_id,
                        alloc.owner.ifname,
                        alloc.owner.pod or "-",
                        now - first,
                    )
            except Exception as exc:  # noqa: BLE001 - retried next round, its grace already served
                log.warning("leak GC could not release %s, retrying next round: %s", alloc.ip, exc)
                continue
            self._since.pop(alloc.owner.handle, None)  # released, or changed hands: done with it
        return released
