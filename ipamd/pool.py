"""One leased subnet's free set, in memory: the data structure under the allocator's policy.

Not thread-safe on its own: `NodeAllocator` guards every pool with its lock. Addresses are in one
of four places: `used` (held, as the store says), `pending` (a transaction about them is in
flight, so nobody else picks them), the `released` FIFO (freed, waiting out the cooldown, also
indexed in `released_ips`), or never used yet (ahead of `cursor`).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

from ipamd.model import IPAddress, IPNetwork


@dataclass
class SubnetPool:
    """One leased subnet's free set. `cursor` walks never-used addresses; `released` is the FIFO."""

    subnet: IPNetwork
    used: set[IPAddress] = field(default_factory=set)
    pending: set[IPAddress] = field(default_factory=set)
    released: deque[tuple[IPAddress, float]] = field(default_factory=deque)
    released_ips: set[IPAddress] = field(default_factory=set)  # what `released` holds, to test fast
    cursor: int = 0
    listed_at: int = 0  # store revision of the listing its IP records were read from

    def __post_init__(self) -> None:
        self.cursor = self.first

    @property
    def gateway(self) -> IPAddress:
        return self.subnet.network_address + 1

    @property
    def first(self) -> int:
        return int(self.subnet.network_address) + 2

    @property
    def last(self) -> int:
        # IPv4 skips broadcast; IPv6 has none.
        return int(self.subnet.broadcast_address) - (1 if self.subnet.version == 4 else 0)

    @property
    def total(self) -> int:
        return max(0, self.last - self.first + 1)

    def usable(self, ip: IPAddress) -> bool:
        return ip in self.subnet and self.first <= int(ip) <= self.last

    def take_fresh(self) -> IPAddress | None:
        while self.cursor <= self.last:
            ip = ipaddress.ip_address(self.cursor)
            self.cursor += 1
            if ip not in self.used and ip not in self.pending and ip not in self.released_ips:
                return ip
        return None

    def push_released(self, ip: IPAddress, at: float, *, front: bool = False) -> None:
        if front:
            self.released.appendleft((ip, at))
        else:
            self.released.append((ip, at))
        self.released_ips.add(ip)

    def take_released(self, now: float, cooldown: float, force: bool = False) -> IPAddress | None:
        while self.released:
            ip, at = self.released[0]
            if ip in self.used or ip in self.pending:
                self.released.popleft()
                self.released_ips.discard(ip)
                continue
            if force or now - at >= cooldown:
                self.released.popleft()
                self.released_ips.discard(ip)
                return ip
            return None
        return None

    def take_specific(self, ip: IPAddress) -> None:
        """Mark `ip` pending, taking it out of the released FIFO (a request named it)."""
        if ip in self.released_ips:
            self.released = deque((r, at) for r, at in self.released if r != ip)
            self.released_ips.discard(ip)
        self.pending.add(ip)

    def cooling(self, now: float, cooldown: float) -> int:
        return sum(1 for ip, at in self.released if now - at < cooldown and ip not in self.used)


@dataclass(frozen=True)
class PoolStatus:
    subnet: IPNetwork
    gateway: IPAddress
    total: int
    used: int
    cooling: int

    @property
    def free(self) -> int:
        return self.total - self.used - self.cooling
