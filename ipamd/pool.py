"""One leased subnet's free set, in memory: the data structure under the allocator's policy.

Not thread-safe on its own: `NodeAllocator` guards every pool with its lock. Addresses are in one
of four places: `used` (held, as the store says), `pending` (a transaction about them is in
flight, so nobody else picks them), the `released` FIFO (freed, waiting out the cooldown, also
indexed in `released_ips`), or never used yet (ahead of `cursor`). Apart from those, `blocked`
holds the addresses with a conflict record (another host answered the ARP probe for them): none
is ever picked, wherever it is; unblocked, one behind the cursor goes back to the FIFO.
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
    blocked: set[IPAddress] = field(default_factory=set)  # conflict records (ipamd/conflicts.py)
    conflicts_listed_at: int = 0  # store revision of the listing its conflict records came from
    conflict_seen: dict[IPAddress, int] = field(default_factory=dict)  # last record change applied

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
            if (
                ip not in self.used
                and ip not in self.pending
                and ip not in self.released_ips
                and ip not in self.blocked
            ):
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
            if ip in self.used or ip in self.pending or ip in self.blocked:
                self.released.popleft()  # a blocked one comes back when it is unblocked
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

    def block(self, ip: IPAddress) -> None:
        self.blocked.add(ip)

    def unblock(self, ip: IPAddress) -> None:
        """Allocatable again: one the cursor passed goes to the front of the FIFO, cooled off
        (it was held by nobody all the while it was blocked)."""
        if ip not in self.blocked:
            return
        self.blocked.discard(ip)
        if (
            self.usable(ip)
            and int(ip) < self.cursor
            and ip not in self.used
            and ip not in self.pending
            and ip not in self.released_ips
        ):
            self.push_released(ip, 0.0, front=True)

    def conflicts(self) -> int:
        """Addresses held by no pod and blocked by a conflict record."""
        return len(self.blocked - self.used)

    def cooling(self, now: float, cooldown: float) -> int:
        return sum(
            1
            for ip, at in self.released
            if now - at < cooldown and ip not in self.used and ip not in self.blocked
        )


@dataclass(frozen=True)
class PoolStatus:
    subnet: IPNetwork
    gateway: IPAddress
    total: int
    used: int
    cooling: int
    conflicts: int = 0  # blocked by a conflict record (and held by no pod)

    @property
    def free(self) -> int:
        return self.total - self.used - self.cooling - self.conflicts


def pool_for(ip: IPAddress, pools: dict[IPNetwork, SubnetPool]) -> SubnetPool | None:
    """The pool whose subnet holds `ip`, if any."""
    for subnet, pool in pools.items():
        if ip in subnet:
            return pool
    return None
