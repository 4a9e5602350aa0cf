"""The daemon's own leak GC, because runtimes barely call CNI GC (containerd never, CRI-O at start).

An allocation is a leak candidate when its netns no longer exists (path gone, or now a different
namespace) and its host veth is gone. A candidate is released only after it has stayed a candidate
for the whole grace period and a final re-check of the store record and the kernel agrees. A round
whose view is incomplete (the link listing failed, a netns could not be stat'ed) releases nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from ipamd.model import Allocation
from ipamd.node import NodeIpam

log = logging.getLogger(__name__)


class IncompleteView(Exception):
    """Something could not be observed; this round must not release anything."""


def netns_alive(alloc: Allocation) -> bool:
    """True while the attachment's netns still exists (and is the same namespace)."""
    if not alloc.netns:
        return True  # nothing recorded: never call it a leak
    try:
        st = os.stat(alloc.netns)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise IncompleteView(f"cannot stat {alloc.netns}: {exc}") from exc
    return not alloc.netns_inode or st.st_ino == alloc.netns_inode


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
        return not netns_alive(alloc) and (not alloc.host_veth or alloc.host_veth not in links)

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
            except Exception as exc:  # noqa: BLE001
                log.warning("leak GC could not re-validate %s: %s", alloc.ip, exc)
            self._since.pop(alloc.owner.handle, None)
        return released
