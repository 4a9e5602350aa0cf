"""Putting back what a store lost: the network config, and the allocations of live pods.

The store guard (`guard.py`) decides that the store lost data; this module does the putting back,
each record create-if-absent and never over a record that names someone else (a conflict, which
is reported and left alone). Live pods come from two places: the allocator's memory (a pod is
kept while its netns or host veth exists, else forgotten) and, for a daemon that restarted after
the loss and remembers nothing, the host veths' own records (`cni_plugin/kernel_record.py`).
Every allocation is put back under its attachment's lock, re-read there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cni_plugin.attachments import WAIT, AttachmentBusy, AttachmentLocks
from cni_plugin.kernel_record import AttachmentRecord
from ipamd.allocator import NodeAllocator
from ipamd.fixed.allocation import FixedAllocator
from ipamd.leases import SubnetLeaseManager
from ipamd.liveness import IncompleteView, attachment_gone
from ipamd.model import Allocation
from ipamd.network_config import NetworkConfig
from ipamd.release import TXN_RETRIES
from ipamd.store.base import Compare, Put, Store, StoreError
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)


class Reasserter:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        leases: SubnetLeaseManager,
        allocator: NodeAllocator,
        *,
        locks: AttachmentLocks,
        host_links: Callable[[], set[str]],
        kernel_records: Callable[[], dict[str, AttachmentRecord]],
        conflict: Callable[[str, str], None],
        fixed: FixedAllocator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.leases = leases
        self.allocator = allocator
        self.locks = locks
        self.host_links = host_links
        self.kernel_records = kernel_records  # host veth -> what its alias says (ADD wrote it)
        self.conflict = conflict
        self.fixed = fixed  # the node's fixed IPs: put back with their bindings
        self.clock = clock
        self._reported: set[str] = set()

    @property
    def node(self) -> str:
        return self.leases.node

    def config(self) -> None:
        """Put back the network config with its cluster ID; adopt a new ID for the same network;
        another network is a conflict (StoreError until an operator resolves it)."""
        ours = self.leases.config
        key = self.keys.config()
        if self.store.create(key, ours.to_json()):
            log.warning("put back the network config (cluster %s)", ours.cluster_id)
            return
        kv = self.store.get(key)
        if kv is None:
            raise StoreError("the network config vanished while being put back; retrying")
        stored = NetworkConfig.from_json(kv.value)
        if stored.cluster_id == ours.cluster_id:
            return
        if stored == ours:  # the same network, initialised again: it is ours under a new ID
            log.warning("the network was initialised again as cluster %s; adopting it",
                        stored.cluster_id)  # fmt: skip
            self.leases.adopt_cluster_id(stored.cluster_id)
            return
        sentence = (
            f"the store holds another network config ({stored.network} /{stored.subnet_len}, "
            f"cluster {stored.cluster_id}) than node {self.node}'s ({ours.network} "
            f"/{ours.subnet_len}, cluster {ours.cluster_id}): an operator must resolve it"
        )
        if sentence not in self._reported:  # once, however often it is retried
            self._reported.add(sentence)
            self.conflict("config", sentence)
        raise StoreError(sentence)

    def allocations(self) -> int:
        """Put back every live allocation; forget dead ones. Returns how many must be retried."""
        links = self.host_links()
        removed = self.store.get(self.keys.removal(self.node)) is not None
        held = self.leases.subnets
        from_kernel = self._kernel_allocations()
        retry = 0
        for alloc in self._known() + from_kernel:
            if removed and alloc.subnet not in held and not _fixed(alloc):
                continue  # an admin removed that subnet with its records: not ours to put back
            try:
                with self.locks.hold(alloc.owner.attachment, WAIT):
                    if alloc in from_kernel:
                        self._put_back(alloc)  # its host veth is there: alive by definition
                    elif self._lookup(alloc) == alloc:
                        self._reassert(alloc, links)
            except (AttachmentBusy, StoreError) as exc:
                log.warning("re-asserting %s: %s", alloc.ip, exc)
                retry += 1
        return retry

    def _reassert(self, alloc: Allocation, links: set[str]) -> None:
        try:
            gone = attachment_gone(alloc, links)
        except IncompleteView:
            gone = False  # cannot tell: keep it (the leak GC looks again later)
        handle = "/".join(alloc.owner.handle)
        if gone:
            forget = self.fixed.forget if self.fixed and _fixed(alloc) else self.allocator.forget
            if forget(alloc):
                log.info("%s of %s: pod gone and record lost; forgotten", alloc.ip, handle)
            return
        self._put_back(alloc)

    def _known(self) -> list[Allocation]:
        fixed = self.fixed.allocations() if self.fixed is not None else []
        return self.allocator.allocations() + fixed

    def _lookup(self, alloc: Allocation) -> Allocation | None:
        if self.fixed is not None and _fixed(alloc):
            return self.fixed.get(alloc.owner.handle)
        return self.allocator.get(*alloc.owner.handle)

    def _put_back_fixed(self, alloc: Allocation) -> None:
        assert self.fixed is not None
        problem = self.fixed.put_back(alloc)
        if problem:
            self.conflict("ip", f"fixed IP {alloc.ip} of pod {alloc.owner.pod or '-'} "
                                f"({'/'.join(alloc.owner.handle)}) on node {self.node}: {problem}")  # fmt: skip
        else:
            log.warning("put back fixed IP %s of pod %s", alloc.ip, alloc.owner.pod or "-")

    def _put_back(self, alloc: Allocation) -> None:
        """Create-if-absent the IP record and handle of a live allocation; a record that names
        another owner is a conflict, never overwritten. A fixed IP goes with its binding."""
        if self.fixed is not None and _fixed(alloc):
            self._put_back_fixed(alloc)
            return
        handle = "/".join(alloc.owner.handle)
        if not any(alloc.ip in subnet for subnet in self.leases.subnets):
            sentence = (
                f"{alloc.ip} of pod {alloc.owner.pod or '-'} ({handle}) on node {self.node} is "
                "outside the subnets it holds now; its record is put back to protect it"
            )
            if sentence not in self._reported:  # once per pod, however often it is retried
                self._reported.add(sentence)
                self.conflict("subnet", sentence)
        ip_key, handle_key = self.keys.ip(alloc.ip), self.keys.handle(*alloc.owner.handle)
        ip_text = str(alloc.ip).encode()
        for _ in range(TXN_RETRIES):
            kv = self.store.get(ip_key)
            if kv is not None:
                holder = Allocation.from_json(alloc.ip, kv.value)
                if holder.owner.handle != alloc.owner.handle:
                    self.conflict(
                        "ip",
                        f"{alloc.ip} is held by pod {alloc.owner.pod or '-'} ({handle}) on node "
                        f"{self.node}, but the store gives it to {holder.owner.pod or '-'} "
                        f"({'/'.join(holder.owner.handle)}) on node {holder.node}",
                    )
                    return
                hkv = self.store.get(handle_key)
                if hkv is not None and hkv.value == ip_text:
                    return  # both records there: nothing was lost of this one
                ops = [Put(handle_key, ip_text)]
                compares = [Compare(ip_key, kv.mod_revision)]
            else:
                hkv = self.store.get(handle_key)  # a handle left by a rolled-back past goes
                ops = [Put(ip_key, alloc.to_json()), Put(handle_key, ip_text)]
                compares = [Compare(ip_key, 0)]
            compares.append(Compare(handle_key, hkv.mod_revision if hkv is not None else 0))
            if self.store.txn(compares, ops).succeeded:
                log.warning("put back %s of %s (pod %s)", alloc.ip, handle, alloc.owner.pod or "-")
                return
        raise StoreError(f"the records of {alloc.ip} kept changing while being put back")

    def from_kernel(self) -> int:
        """Put back every allocation the host's veths record and memory lacks (the store lost
        them while the daemon was down). Returns how many; StoreError if some must be retried."""
        missing = self._kernel_allocations()
        if not missing:
            return 0
        log.error(
            "STORE LOSS on node %s: %d running pod(s) hold IPs the store does not record; "
            "putting them back from the host veths before serving",
            self.node,
            len(missing),
        )
        retry = 0
        for alloc in missing:
            try:
                with self.locks.hold(alloc.owner.attachment, WAIT):
                    self._put_back(alloc)
            except (AttachmentBusy, StoreError) as exc:
                log.warning("putting back %s: %s", alloc.ip, exc)
                retry += 1
        if retry:
            raise StoreError(f"{retry} allocation(s) from the host veths not put back yet")
        return len(missing)

    def _kernel_allocations(self) -> list[Allocation]:
        """What the host veths record (kernel_record.py) and memory lacks. A fixed pod whose IP a
        newer generation of it took over is left over (its DEL has not come yet), not something
        the store lost: it is not put back, and no conflict is reported for it."""
        known = {a.owner.handle for a in self._known()}
        out = []
        for host_veth, rec in sorted(self.kernel_records().items()):
            if rec.owner.handle in known:
                continue
            alloc = Allocation(
                rec.interface.ip,
                rec.interface.network,
                rec.owner,
                self.node,
                self.clock(),
                host_veth=host_veth,
            )
            if self.fixed is not None and _fixed(alloc) and self.fixed.superseded(alloc):
                log.info("%s of %s on %s: a newer pod holds it now; left for its DEL",
                         alloc.ip, alloc.owner.pod or "-", host_veth)  # fmt: skip
                continue
            out.append(alloc)
        return out


def _fixed(alloc: Allocation) -> bool:
    """A fixed IP's allocation: a /32 of its own, in no node subnet."""
    return alloc.subnet.num_addresses == 1
