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

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from ipamd.errors import Conflict, IpamError, NotFound
from ipamd.fixed.model import (
    REQUEST,
    RESERVATION,
    STICKY,
    FixedBinding,
    Generation,
    Identity,
)
from ipamd.model import Allocation, IPAddress, IPNetwork, Owner
from ipamd.records import ip_records, records
from ipamd.store.base import Compare, Delete, KeyValue, Put, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
TXN_RETRIES = 16


class FixedIPUnavailable(IpamError):
    """The fixed IP is bound to another identity, held outside moor's fixed bindings, cooling
    down, or not in a fixed range; or the identity is bound to another fixed IP."""


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


class FixedBindings:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        fixed_ranges: Callable[[], Iterable[IPNetwork]],
        *,
        cooldown: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = keys
        self.fixed_ranges = fixed_ranges
        self.cooldown = cooldown
        self.clock = clock

    # ---- reading ------------------------------------------------------------------------------
    def get(self, ip: IPAddress) -> FixedBinding | None:
        kv = self.store.get(self.keys.fixed(ip))
        return FixedBinding.from_json(ip, kv.value) if kv is not None else None

    def of_identity(self, identity: Identity) -> FixedBinding | None:
        """The binding of a named identity, through the index (None for unnamed identities)."""
        if not identity.named:
            return None
        kv = self.store.get(self.keys.fixed_identity(identity.namespace, identity.name))
        if kv is None:
            return None
        binding = self.get(_ip(kv.value))
        return binding if binding is not None and binding.identity == identity else None

    def allocation(self, binding: FixedBinding) -> Allocation | None:
        """The IP record of a held binding, if it is the holder's."""
        kv = self.store.get(self.keys.ip(binding.ip))
        if kv is None:
            return None
        alloc = Allocation.from_json(binding.ip, kv.value)
        return alloc if alloc.owner.handle == binding.handle else None

    def unavailable(self) -> set[IPAddress]:
        """Fixed-range IPs that have an IP record or are cooling down (a binding aside); only
        the key ranges of the fixed ranges are listed, never the whole cluster's records."""
        ranges = list(self.fixed_ranges())
        out = {ip for ip, _ in ip_records(self.store, self.keys, ranges)}
        now = self.clock()
        for kv in records(self.store, self.keys, "released", ranges):
            ip = self.keys.parse_released(kv.key)
            at = float(json.loads(kv.value).get("releasedAt", 0))
            if ip is not None and self.is_fixed(ip) and now - at < self.cooldown:
                out.add(ip)
        return out

    def all(self) -> list[FixedBinding]:
        items, _ = self.store.list_prefix(self.keys.fixed_prefix())
        out = []
        for kv in items:
            ip = self.keys.parse_fixed(kv.key)
            if ip is None:
                continue
            try:
                out.append(FixedBinding.from_json(ip, kv.value))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                # one hand-edited record must not blind the listing and the retention sweep
                log.warning("fixed binding %s is malformed, skipped: %s", kv.key, exc)
        return sorted(out, key=lambda b: int(b.ip))

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
            alloc = Allocation(ip, _host_net(ip), owner, node, binding.since if existed else now,
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
            if hkv is None or not self.is_fixed(ip := _ip(hkv.value)):
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

    # ---- helpers ------------------------------------------------------------------------------
    def is_fixed(self, ip: IPAddress) -> bool:
        return any(ip in r for r in self.fixed_ranges())

    def _read(
        self, ip: IPAddress, identity: Identity, handle: tuple[str, str, str] | None = None
    ) -> _State:
        """Everything a decision about `ip` depends on, with the compares that pin it. Every
        change of a fixed IP writes its binding, so a binding read the same before and after the
        other keys means they were read between two such changes (the txn's compares catch any
        later one)."""
        keys = [self.keys.fixed(ip), self.keys.ip(ip), self.keys.released(ip)]
        if identity.named:
            keys.append(self.keys.fixed_identity(identity.namespace, identity.name))
        if handle is not None:
            keys.append(self.keys.handle(*handle))
        for _ in range(TXN_RETRIES):  # one key at a time: re-read until no claim came between
            kvs = {k: self.store.get(k) for k in keys}
            again = self.store.get(keys[0])
            if _revision(again) == _revision(kvs[keys[0]]):
                break
        bkv = kvs[keys[0]]
        binding = FixedBinding.from_json(ip, bkv.value) if bkv is not None else None
        if identity.named and (index := kvs[keys[3]]) is not None and _ip(index.value) != ip:
            other = self.get(_ip(index.value))
            if other is not None and other.identity == identity:
                raise FixedIPUnavailable(
                    f"{identity.text} is bound to {other.ip} already ({other.source}, "
                    f"{other.state}): one fixed IP per pod"
                )
        if handle is not None and (hkv := kvs[keys[-1]]) is not None and _ip(hkv.value) != ip:
            raise FixedIPUnavailable(f"attachment {'/'.join(handle)} holds {_ip(hkv.value)}")
        compares = [Compare(k, kv.mod_revision if kv else 0) for k, kv in kvs.items()]
        return _State(ip, binding, kvs[keys[1]], kvs[keys[2]], compares)

    def _require_fixed(self, ip: IPAddress) -> None:
        if not self.is_fixed(ip):
            raise FixedIPUnavailable(f"{ip} is not in a fixed range of the network")

    def _require_free(self, state: _State) -> None:
        if state.ip_record is not None:
            holder = Allocation.from_json(state.ip, state.ip_record.value)
            raise FixedIPUnavailable(f"{state.ip} is allocated to {'/'.join(holder.owner.handle)}")
        if state.released is not None:
            at = float(json.loads(state.released.value).get("releasedAt", 0))
            if self.clock() - at < self.cooldown:
                raise FixedIPUnavailable(f"{state.ip} was released recently and cools down")

    def _index_put(self, identity: Identity, ip: IPAddress) -> Put:
        return Put(self.keys.fixed_identity(identity.namespace, identity.name), str(ip).encode())

    def _cooldown_ops(self, ip: IPAddress, node: str) -> list[Put | Delete]:
        record = {"releasedAt": self.clock(), "node": node}
        return [Put(self.keys.released(ip), json.dumps(record).encode())]

    def _end_ops(self, binding: FixedBinding, node: str = "") -> list[Put | Delete]:
        """The binding (and its index) go; the IP cools down like any released one."""
        ops: list[Put | Delete] = [Delete(self.keys.fixed(binding.ip))]
        ops += self._cooldown_ops(binding.ip, node)
        if binding.identity.named:
            index = self.keys.fixed_identity(binding.identity.namespace, binding.identity.name)
            ops.append(Delete(index))
        return ops


@dataclass(frozen=True)
class _State:
    ip: IPAddress
    binding: FixedBinding | None
    ip_record: KeyValue | None
    released: KeyValue | None
    compares: list[Compare]


def _revision(kv: KeyValue | None) -> int:
    return kv.mod_revision if kv is not None else 0


def _ip(value: bytes) -> IPAddress:
    return ipaddress.ip_address(value.decode())


def _host_net(ip: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
