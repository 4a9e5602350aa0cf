"""The fixed-IP binding records: reading them, and building the pieces every transaction of
`bindings.py` needs (a consistent read of the keys a decision depends on, with the compares that
pin it; the operations that end a binding or start a cooldown). No decision is taken here.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ipamd.errors import IpamError
from ipamd.fixed.model import FixedBinding, Identity
from ipamd.model import Allocation, IPAddress, IPNetwork
from ipamd.records import ip_records, records
from ipamd.store.base import Compare, Delete, KeyValue, Put, Store
from ipamd.store.keys import Keys

log = logging.getLogger(__name__)
TXN_RETRIES = 16


class FixedIPUnavailable(IpamError):
    """The fixed IP is bound to another identity, held outside moor's fixed bindings, cooling
    down, or not in a fixed range; or the identity is bound to another fixed IP."""


class BindingRecords:
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
        binding = self.get(ip_of(kv.value))
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
        return self._bindings(lambda value: True)

    def held_on(self, node: str) -> list[FixedBinding]:
        """The held bindings that name `node`, as `all` reads them. Only those are read in full:
        a daemon starts in a cluster of thousands of fixed IPs, nearly all of them elsewhere (a
        plain JSON read costs a quarter of a full one)."""

        def maybe_here(value: bytes) -> bool:
            try:
                d = json.loads(value)
            except ValueError:
                return True  # the full read tells why
            return not isinstance(d, dict) or (d.get("node") == node and bool(d.get("generation")))

        return self._bindings(maybe_here)

    def _bindings(self, wanted: Callable[[bytes], bool]) -> list[FixedBinding]:
        """Every binding whose raw value `wanted` keeps, by IP. A malformed one is skipped with a
        warning: one hand-edited record must not blind the listing and the retention sweep."""
        items, _ = self.store.list_prefix(self.keys.fixed_prefix())
        out = []
        for kv in items:
            ip = self.keys.parse_fixed(kv.key)
            if ip is None or not wanted(kv.value):
                continue
            try:
                out.append(FixedBinding.from_json(ip, kv.value))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                log.warning("fixed binding %s is malformed, skipped: %s", kv.key, exc)
        return sorted(out, key=lambda b: int(b.ip))

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
        if identity.named and (index := kvs[keys[3]]) is not None and ip_of(index.value) != ip:
            other = self.get(ip_of(index.value))
            if other is not None and other.identity == identity:
                raise FixedIPUnavailable(
                    f"{identity.text} is bound to {other.ip} already ({other.source}, "
                    f"{other.state}): one fixed IP per pod"
                )
        if handle is not None and (hkv := kvs[keys[-1]]) is not None and ip_of(hkv.value) != ip:
            raise FixedIPUnavailable(f"attachment {'/'.join(handle)} holds {ip_of(hkv.value)}")
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


def ip_of(value: bytes) -> IPAddress:
    return ipaddress.ip_address(value.decode())


def host_net(ip: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
