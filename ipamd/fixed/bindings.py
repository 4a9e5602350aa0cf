"""Fixed-IP bindings in the store: reserve, claim (with the generation guard), release, expire.

Every change is one transaction that compares the revision of each key it read, so two nodes, a
late DEL and an operator can race freely: one wins, the others see the new state and decide again
(or fail clearly). What one transaction changes together:
  * claim: the binding (holder generation, handle, node), the identity index, the IP record and
    the holder's handle key (the same `ips/` and `handles/` records as any allocation, so release,
    GC and `moorctl ips` see fixed IPs like the rest) and, on a takeover, the old holder's handle;
  * release: the IP record and the handle go; the binding is kept (reservation, sticky retention)
    or goes with its index (per-request IP);
  * expire: a sticky binding past its retention goes, and the IP starts its cooldown.

A takeover deletes the old generation's handle in the same transaction, so the old node's DEL, how
late it comes, finds no handle and frees nothing (`release` is a no-op for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ipamd.errors import Conflict, IpamError, NotFound
from ipamd.fixed.binding_records import (
    TXN_RETRIES,
    BindingRecords,
    FixedIPUnavailable,
    host_net,
    ip_of,
)
from ipamd.fixed.model import (
    REQUEST,
    RESERVATION,
    STICKY,
    FixedBinding,
    Generation,
    Identity,
)
from ipamd.model import Allocation, IPAddress, Owner
from ipamd.store.base import Compare, Delete, Put

log = logging.getLogger(__name__)
__all__ = ["Claimed", "FixedBindings", "FixedIPUnavailable", "StaleGeneration"]


class StaleGeneration(IpamError):
    """A generation the binding already replaced asked for the IP: a newer one holds it."""


@dataclass(frozen=True)
class Claimed:
    binding: FixedBinding
    allocation: Allocation
    existed: bool  # the same attachment held it already (a repeated ADD)
    replaced: Generation | None  # the generation it was taken from (a move or a restart)
    previous_node: str = ""  # where that generation was
    revision: int = 0  # the store revision of the claim


class FixedBindings(BindingRecords):
    """The decisions: reserve, claim, release, put back, expire (see the module docstring)."""

    # ---- reservations -----------------------------------------------------------------------
    def reserve(self, identity: Identity, ip: IPAddress, actor: str) -> FixedBinding:
        """Pin `ip` to `identity` until `unreserve`: the IP must be in a fixed range and free, or
        bound to that identity already (then the binding becomes a reservation)."""
        if not identity.named:
            raise FixedIPUnavailable("a reservation needs a pod identity, NAMESPACE/POD or POD")
        self._require_fixed(ip)
        for _ in range(TXN_RETRIES):
            state = self._read(ip, identity)
            current = state.binding
            if current is not None and current.identity != identity:
                raise FixedIPUnavailable(
                    f"{ip} is {current.state} by {current.identity.text} ({current.source})"
                )
            if current is None:
                self._require_free(state)
                current = FixedBinding(ip, identity, RESERVATION)
            binding = replace(current, source=RESERVATION, reserved_by=actor,
                              reserved_at=self.clock())  # fmt: skip
            ops = [Put(self.keys.fixed(ip), binding.to_json()), self._index_put(identity, ip)]
            if self.store.txn(state.compares, ops).succeeded:
                return binding
        raise Conflict(f"reserving {ip} kept conflicting with other changes; retry")

    def unreserve(self, ip: IPAddress, expect: Identity | None = None) -> FixedBinding:
        """End a reservation (of `expect` only, when given). A pod holding the IP keeps it until
        its DEL (the binding becomes a per-request one); otherwise the binding goes and the IP
        cools down."""
        for _ in range(TXN_RETRIES):
            kv = self.store.get(self.keys.fixed(ip))
            if kv is None:
                raise NotFound(f"{ip} is not reserved")
            binding = FixedBinding.from_json(ip, kv.value)
            if expect is not None and binding.identity != expect:
                raise NotFound(f"{ip} is not reserved for {expect.text}")
            if binding.source != RESERVATION:
                raise NotFound(f"{ip} is not reserved (it is {binding.source}, {binding.state})")
            compares = [Compare(kv.key, kv.mod_revision)]
            if binding.held:
                ops: list[Put | Delete] = [Put(kv.key, replace(binding, source=REQUEST).to_json())]
            else:
                ops = self._end_ops(binding)
            if self.store.txn(compares, ops).succeeded:
                return binding
        raise Conflict(f"unreserving {ip} kept conflicting with other changes; retry")

    # ---- the attachment's side ----------------------------------------------------------------
    def claim(
        self,
        ip: IPAddress,
        owner: Owner,
        node: str,
        *,
        source: str,
        retain: float = 0.0,
        host_veth: str = "",
        netns: str = "",
        netns_inode: int = 0,
    ) -> Claimed:
        """Bind `ip` to the owner's identity and make its generation the holder, in one txn.

        The newest generation wins: a different generation of the same identity takes the IP
        over (the old handle goes in the same txn); one the binding already retired is refused
        (StaleGeneration). Another identity's IP, or one held outside the fixed bindings, is
        FixedIPUnavailable."""
        self._require_fixed(ip)
        identity, generation = Identity.of(owner), Generation.of(owner)
        for _ in range(TXN_RETRIES):
            state = self._read(ip, identity, owner.handle)
            current = state.binding
            if current is None:
                self._require_free(state)
                current = FixedBinding(ip, identity, source, retain=retain)
            elif current.identity != identity:
                raise FixedIPUnavailable(
                    f"{ip} is {current.state} by {current.identity.text} ({current.source})"
                )
            elif generation in current.retired:
                raise StaleGeneration(
                    f"{ip} of {identity.text} has moved on to a newer pod "
                    f"({current.generation.text if current.generation else 'released since'}); "
                    f"{generation.text} may not take it back"
                )
            if current.source == STICKY and source == STICKY:
                current = replace(current, retain=retain)
            now = self.clock()
            binding = current.held_by(generation, owner.handle, node, host_veth, now)
            existed = current.handle == owner.handle and current.generation == generation
            alloc = Allocation(ip, host_net(ip), owner, node, binding.since if existed else now,
                               netns, netns_inode, host_veth)  # fmt: skip
            ops: list[Put | Delete] = [
                Put(self.keys.fixed(ip), binding.to_json()),
                Put(self.keys.ip(ip), alloc.to_json()),
                Put(self.keys.handle(*owner.handle), str(ip).encode()),
                Delete(self.keys.released(ip)),
            ]
            if identity.named:
                ops.append(self._index_put(identity, ip))
            if current.handle is not None and current.handle != owner.handle:
                ops.append(Delete(self.keys.handle(*current.handle)))
            result = self.store.txn(state.compares, ops)
            if result.succeeded:
                replaced = current.generation if current.generation != generation else None
                previous = current.node if replaced else ""
                return Claimed(binding, alloc, existed, replaced, previous, result.revision)
        raise Conflict(f"claiming {ip} kept conflicting with other changes; retry")

    def release(self, handle: tuple[str, str, str], node: str) -> FixedBinding | None:
        """DEL of the attachment `handle`: free the fixed IP it holds, owner-checked. None when it
        holds none (a late DEL after a takeover: its handle went with it; or an IP that is not a
        fixed one, which is the node allocator's to release)."""
        handle_key = self.keys.handle(*handle)
        for _ in range(TXN_RETRIES):
            hkv = self.store.get(handle_key)
            if hkv is None or not self.is_fixed(ip := ip_of(hkv.value)):
                return None
            bkv = self.store.get(self.keys.fixed(ip))
            ikv = self.store.get(self.keys.ip(ip))
            binding = FixedBinding.from_json(ip, bkv.value) if bkv is not None else None
            compares = [Compare(handle_key, hkv.mod_revision),
                        Compare(self.keys.fixed(ip), bkv.mod_revision if bkv else 0)]  # fmt: skip
            ops: list[Put | Delete] = [Delete(handle_key)]
            let_go = None
            if ikv is not None and Allocation.from_json(ip, ikv.value).owner.handle == handle:
                compares.append(Compare(ikv.key, ikv.mod_revision))
                ops.append(Delete(ikv.key))
                if binding is None or binding.handle != handle:  # its binding is gone: an orphan
                    ops += self._cooldown_ops(ip, node)
                else:
                    let_go = binding.let_go(self.clock())
                    if binding.source == REQUEST:
                        ops += self._end_ops(let_go, node=node)
                    else:
                        ops.append(Put(self.keys.fixed(ip), let_go.to_json()))
            if self.store.txn(compares, ops).succeeded:
                return let_go
        raise Conflict(f"releasing {handle} kept conflicting with other changes; retry")

    def put_back(self, alloc: Allocation, binding: FixedBinding | None) -> str:
        """After a store loss: make the store hold a live pod's fixed IP again, each record
        create-if-absent (`binding` as remembered, or a per-request one for the pod's generation
        when nothing is remembered). "" when done or nothing was missing; otherwise why not: the
        store gives the IP or the identity to someone else (a conflict, never overwritten)."""
        ip, owner = alloc.ip, alloc.owner
        identity, generation = Identity.of(owner), Generation.of(owner)
        mine = (binding or FixedBinding(ip, identity, REQUEST)).held_by(
            generation, owner.handle, alloc.node, alloc.host_veth, alloc.since
        )
        for _ in range(TXN_RETRIES):
            try:
                state = self._read(ip, identity, owner.handle)
            except FixedIPUnavailable as exc:  # the identity or the handle is elsewhere now
                return str(exc)
            current = state.binding
            if current is not None and (current.identity, current.handle) != (
                identity,
                owner.handle,
            ):
                return f"{ip} is bound to {current.identity.text} ({current.state}) in the store"
            if state.ip_record is not None:
                holder = Allocation.from_json(ip, state.ip_record.value)
                if holder.owner.handle != owner.handle:
                    return f"{ip} is allocated to {'/'.join(holder.owner.handle)} in the store"
            ops: list[Put | Delete] = []
            if current is None:
                ops.append(Put(self.keys.fixed(ip), mine.to_json()))
            if state.ip_record is None:
                ops.append(Put(self.keys.ip(ip), alloc.to_json()))
            ops.append(Put(self.keys.handle(*owner.handle), str(ip).encode()))
            if identity.named:
                ops.append(self._index_put(identity, ip))
            if self.store.txn(state.compares, ops).succeeded:
                return ""
        raise Conflict(f"the records of {ip} kept changing while being put back; retry")

    def expire(self, node: str) -> list[FixedBinding]:
        """End every sticky binding nobody holds whose retention is over; the IPs cool down."""
        ended = []
        now = self.clock()
        for binding in self.all():
            until = binding.retained_until()
            if not until or until > now:
                continue
            kv = self.store.get(self.keys.fixed(binding.ip))
            if kv is None or FixedBinding.from_json(binding.ip, kv.value) != binding:
                continue  # changed meanwhile: the next sweep looks again
            if self.store.txn([Compare(kv.key, kv.mod_revision)],
                              self._end_ops(binding, node=node)).succeeded:  # fmt: skip
                ended.append(binding)
        return ended
