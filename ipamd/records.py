"""Reading IP and cooldown records by key range: the whole cluster's, or just some subnets'.

A /24's records share the key text `<prefix>/ips/10.244.3.`, so the records of a few subnets are
a few range reads, filtered by membership, never a scan of the whole store: what keeps `moorctl
ips --node` and node removal fast on a store of 200k records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ipamd.model import IPAddress, IPNetwork
from ipamd.store.base import KeyValue, Store
from ipamd.store.keys import Keys, covering_prefixes


class SubnetIndex:
    """Which of a set of subnets holds an address, in O(distinct prefix lengths)."""

    def __init__(self, subnets: Iterable[IPNetwork]) -> None:
        self.by_start = {(s.prefixlen, int(s.network_address)): s for s in subnets}
        self.lengths = sorted({plen for plen, _ in self.by_start})

    def find(self, ip: IPAddress) -> IPNetwork | None:
        value, bits = int(ip), ip.max_prefixlen
        for plen in self.lengths:
            subnet = self.by_start.get((plen, value >> (bits - plen) << (bits - plen)))
            if subnet is not None and subnet.version == ip.version:
                return subnet
        return None


def records(
    store: Store, keys: Keys, kind: str, subnets: list[IPNetwork] | None
) -> Iterator[KeyValue]:
    """IP (`kind` "ips") or cooldown ("released") records: all, or those in the key ranges of
    `subnets` (which may cover a little more: callers filter by membership)."""
    if kind == "ips":
        root, prefix_for = keys.ips_prefix(), keys.ips_prefix_for
    else:
        root, prefix_for = keys.released_prefix(), keys.released_prefix_for
    if subnets is None:
        yield from store.list_prefix(root)[0]
        return
    for prefix in covering_prefixes(prefix_for(s) for s in subnets):
        yield from store.list_prefix(prefix)[0]


def ip_records(
    store: Store, keys: Keys, subnets: list[IPNetwork] | None
) -> Iterator[tuple[IPAddress, KeyValue]]:
    """Every IP record, or those inside `subnets` only."""
    index = SubnetIndex(subnets or [])
    for kv in records(store, keys, "ips", subnets):
        ip = keys.parse_ip(kv.key)
        if ip is not None and (subnets is None or index.find(ip) is not None):
            yield ip, kv
