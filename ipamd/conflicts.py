"""Address conflict records: IPs another host answered for when an ADD probed them (`arpProbe`).

`<prefix>/conflicts/<ip>` = `{"mac", "node", "at", "network"}`: the answering host's MAC, the node
whose ADD found it, when (unix seconds), and that ADD's CNI network. Only an operator removes one
(`moorctl conflicts clear IP`); until then the node owning the IP's subnet never hands it out
(`NodeAllocator` keeps it blocked in memory, loaded with the subnet and followed by the store
follower). The record is about the IP on the wire, not about a node: `moorctl node remove` keeps
it, and a node that leases the subnet later loads it.

One job: the record and its store operations, shared by the node (write, on a failed probe) and
the Admin API (list, clear).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ipamd.errors import Conflict, NotFound
from ipamd.model import IPAddress
from ipamd.store.base import Compare, Delete, KeyValue, Store
from ipamd.store.keys import Keys


@dataclass(frozen=True)
class AddressConflict:
    ip: IPAddress
    mac: str
    node: str
    at: float
    network: str = ""

    def to_json(self) -> bytes:
        return json.dumps(
            {"mac": self.mac, "node": self.node, "at": self.at, "network": self.network},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, ip: IPAddress, value: bytes) -> AddressConflict:
        """Never raises: a record someone else wrote badly still blocks its IP and is listed."""
        try:
            data = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            data = {}
        if not isinstance(data, dict):
            data = {}

        def text(key: str) -> str:
            value = data.get(key, "")
            return value if isinstance(value, str) else ""

        at = data.get("at", 0)
        at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0
        return cls(ip, text("mac"), text("node"), at, text("network"))


def record(store: Store, keys: Keys, conflict: AddressConflict) -> int:
    """Write (or refresh: the latest detection wins) the record; the store revision of the put."""
    return store.put(keys.conflict(conflict.ip), conflict.to_json())


def listing(store: Store, keys: Keys) -> list[AddressConflict]:
    """Every conflict record of the cluster, in address order."""
    out = []
    for kv in store.list_prefix(keys.conflicts_prefix())[0]:
        ip = keys.parse_conflict(kv.key)
        if ip is not None:
            out.append(AddressConflict.from_json(ip, kv.value))
    return sorted(out, key=lambda c: (c.ip.version, int(c.ip)))


def clear(store: Store, keys: Keys, ip: IPAddress) -> tuple[AddressConflict, int]:
    """Delete the record of `ip` as it was read (compare on its mod revision): what was cleared,
    and the revision of the delete. NotFound without a record; Conflict if it changed meanwhile
    (a new detection): the operator looks again."""
    kv: KeyValue | None = store.get(keys.conflict(ip))
    if kv is None:
        raise NotFound(f"no address conflict recorded for {ip}")
    result = store.txn([Compare(kv.key, kv.mod_revision)], [Delete(kv.key)])
    if not result.succeeded:
        raise Conflict(f"the conflict record of {ip} changed while being cleared; look again")
    return AddressConflict.from_json(ip, kv.value), result.revision
