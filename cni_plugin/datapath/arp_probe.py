"""RFC 5227 address conflict probe, sent from a pod's interface inside its netns. Stdlib only.

Why here and like this:
  * the probe must leave through the pod's own interface, onto the pod's L2 (a bridge, a macvlan
    parent), so its AF_PACKET socket is created inside the pod netns by the netns helper thread
    (`netns.open_socket`); the daemon never forks. Everything after that (the ioctls, sending,
    waiting) runs on the caller's thread, so a probe never holds up the helper's other work;
  * an ARP probe is an ARP request with sender IP 0.0.0.0 and target IP the candidate, so no host
    learns a mapping from it; a host that holds the candidate answers (Linux does: it replies to
    a probe for one of its own addresses), and a host probing for the same address at the same
    time sends the same kind of probe. RFC 5227 2.1.1 treats both as a conflict, and so does this;
  * RFC 5227 spaces PROBE_NUM (3) probes 1-2 s apart and then waits 2 s; a CNI ADD cannot wait
    that long, so the probes are spaced randomly within a fixed budget (`count` x `interval`,
    about 100 ms by default) and the probe listens until the budget is spent. A conflict ends it
    at once. The budget (and a 5 ms settle before the first probe, `_await_running`) bounds what
    an ADD adds, whatever the timing of the probes.
  * SOCK_DGRAM: the kernel builds the Ethernet header, and each received frame comes with the
    link-layer source and whether it was our own outgoing copy.

This module is imported only when a netconf asks for `arpProbe`; nothing here runs otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import queue
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DatapathError, LinkNotFound
from .netns import open_socket

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
PACKET_OUTGOING = 4  # sll_pkttype of our own frames as the socket sees them leave
IFF_UP = 0x1
IFF_RUNNING = 0x40  # operstate up: the kernel's link watch has seen the carrier and armed TX
SETTLE = 0.005  # after the interface runs, for the kernel's link watch to arm its far end too
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFHWADDR = 0x8927
BROADCAST = b"\xff" * 6
# htype, ptype, hlen, plen, oper, sender MAC, sender IP, target MAC, target IP
ARP = struct.Struct("!HHBBH6s4s6s4s")
IFREQ_FLAGS = struct.Struct("16sH14x")
IFREQ_HWADDR = struct.Struct("16sH14s")
ZERO_IP = b"\0\0\0\0"


@dataclass(frozen=True)
class Conflict:
    """Another host claims the address: `mac` is its hardware address; `how` is what it sent
    ("reply" to our probe, "probe" for the same address, "announcement": any other ARP packet
    with the address as its sender)."""

    ip: ipaddress.IPv4Address
    mac: str
    how: str


class NotEthernet(DatapathError):
    """The interface has no Ethernet hardware address, so ARP does not apply to it."""


class NotRunning(DatapathError):
    """The interface did not come up (no carrier) in time: a probe would reach nobody."""


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def probe_packet(own_mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """An ARP probe for `ip` from `own_mac` (RFC 5227 2.1.1): sender IP all zeroes, target
    hardware address all zeroes."""
    return ARP.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, own_mac, ZERO_IP, b"\0" * 6, ip.packed
    )


def classify(payload: bytes, own_mac: bytes, ip: ipaddress.IPv4Address) -> Conflict | None:
    """The conflict an incoming ARP packet shows, if any (RFC 5227 2.1.1): any ARP packet whose
    sender IP is `ip`, or a probe for `ip` from another MAC. Our own frames never count."""
    if len(payload) < ARP.size:
        return None
    htype, ptype, hlen, plen, oper, sha, spa, _tha, tpa = ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4) or sha == own_mac:
        return None
    if spa == ip.packed:
        return Conflict(ip, mac_text(sha), "reply" if oper == ARPOP_REPLY else "announcement")
    if oper == ARPOP_REQUEST and spa == ZERO_IP and tpa == ip.packed:
        return Conflict(ip, mac_text(sha), "probe")
    return None


def schedule(count: int, interval: float, rng: random.Random) -> list[float]:
    """When to send each probe, in seconds from the start: the first at once, probe i about
    i x interval later, randomly moved by up to a third of the interval (RFC 5227 randomizes
    the spacing so that hosts probing together do not stay in step). The last probe is sent at
    least 2/3 of an interval before the budget (count x interval) ends."""
    return [0.0] + [(i + rng.uniform(-1 / 3, 1 / 3)) * interval for i in range(1, count)]


def probe(
    netns_fd: int,
    ifname: str,
    ip: ipaddress.IPv4Address,
    *,
    count: int = 3,
    interval: float = 0.033,
    carrier_wait: float = 1.0,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Conflict | None:
    """Probe `ip` from `ifname` in the netns behind `netns_fd`; the first conflict seen, or None
    once `count` x `interval` seconds have passed without one.

    An interface that is down (an IPAM plugin's caller may not have brought it up yet) is brought
    up for the probe and down again afterwards: the kernel sends nothing from a down interface.
    The first probe waits (up to `carrier_wait`) until the interface is running, and SETTLE
    more: a veth set up a moment ago (the reference bridge plugin calls IPAM right after; moor's
    own ADD configures its veth right before) gets its carrier, transmit queue and bridge port
    armed by the kernel's link watch a little later, and a frame sent before that is silently
    dropped (seen: the first of three probes lost in one ADD of ten under the reference bridge).
    LinkNotFound when there is no `ifname`; NotEthernet when it is not Ethernet; NotRunning when
    it does not come up in time; DatapathError for any other failure.
    """
    try:
        sock = open_socket(netns_fd, socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    except OSError as exc:
        raise DatapathError(f"ARP probe: cannot open a packet socket: {exc}", exc.errno) from exc
    try:
        own_mac = _hardware_address(sock, ifname)
        was_up = _set_up(sock, ifname, True)
        try:
            _await_running(sock, ifname, carrier_wait, clock)
            sock.bind((ifname, ETH_P_ARP))  # after up: binding to a down link reports ENETDOWN
            sock.setblocking(False)
            return _exchange(sock, ifname, own_mac, ip, count, interval, rng, clock)
        except OSError as exc:
            raise DatapathError(f"ARP probe on {ifname!r}: {exc}", exc.errno) from exc
        finally:
            if not was_up:
                _set_up(sock, ifname, False)
    finally:
        _close_later(sock)


def _exchange(
    sock: socket.socket,
    ifname: str,
    own_mac: bytes,
    ip: ipaddress.IPv4Address,
    count: int,
    interval: float,
    rng: random.Random | None,
    clock: Callable[[], float],
) -> Conflict | None:
    packet = probe_packet(own_mac, ip)
    to = (ifname, ETH_P_ARP, 0, ARPHRD_ETHER, BROADCAST)
    sends = schedule(count, interval, rng or random.Random())
    budget = count * interval
    start = clock()
    sent = 0
    while True:
        now = clock() - start
        while sent < len(sends) and sends[sent] <= now:
            sock.sendto(packet, to)
            sent += 1
        if sent == len(sends) and now >= budget:
            return None
        wake = sends[sent] if sent < len(sends) else budget
        readable, _, _ = select.select([sock], [], [], max(0.0, wake - now))
        if readable and (found := _drain(sock, own_mac, ip)) is not None:
            return found


def _drain(sock: socket.socket, own_mac: bytes, ip: ipaddress.IPv4Address) -> Conflict | None:
    """Read every frame waiting; the first conflict among them."""
    while True:
        try:
            payload, addr = sock.recvfrom(256)
        except BlockingIOError:
            return None
        if addr[2] == PACKET_OUTGOING:
            continue
        found = classify(payload, own_mac, ip)
        if found is not None:
            return found


_closing: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
_closer: threading.Thread | None = None
_closer_lock = threading.Lock()


def _close_later(sock: socket.socket) -> None:
    """Close `sock` on a background thread. The kernel waits an RCU grace period when a packet
    socket is released (synchronize_net: 7-12 ms measured), which the ADD need not wait for;
    until then the socket only queues a few more ARP frames nobody reads."""
    global _closer
    with _closer_lock:
        if _closer is None or not _closer.is_alive():
            _closer = threading.Thread(target=_close_forever, name="arp-probe-close", daemon=True)
            _closer.start()
    _closing.put(sock)


def _close_forever() -> None:
    while True:
        _closing.get().close()


def _ioctl(sock: socket.socket, ifname: str, request: int, arg: bytes) -> bytes:
    try:
        return fcntl.ioctl(sock.fileno(), request, arg)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise LinkNotFound(f"no interface {ifname!r} in the pod netns", exc.errno) from exc
        raise DatapathError(f"ARP probe: ioctl on {ifname!r}: {exc}", exc.errno) from exc


def _hardware_address(sock: socket.socket, ifname: str) -> bytes:
    name = ifname.encode()
    _, family, data = IFREQ_HWADDR.unpack(
        _ioctl(sock, ifname, SIOCGIFHWADDR, IFREQ_HWADDR.pack(name, 0, b""))
    )
    if family != ARPHRD_ETHER:
        raise NotEthernet(f"{ifname!r} is not an Ethernet interface (ARPHRD {family})")
    return data[:6]


def _flags(sock: socket.socket, ifname: str) -> int:
    packed = IFREQ_FLAGS.pack(ifname.encode(), 0)
    return IFREQ_FLAGS.unpack(_ioctl(sock, ifname, SIOCGIFFLAGS, packed))[1]


def _await_running(
    sock: socket.socket, ifname: str, wait: float, clock: Callable[[], float]
) -> None:
    """Until `ifname` is running, then SETTLE more: the link watch arms the far end after this
    one (a veth's host end, and the bridge port on it, which this netns cannot see). Measured
    under the reference bridge: the pod end ran a moment before the port forwarded, and a probe
    sent in between was lost; so was one sent right after the pod end was found running."""
    until = clock() + wait
    while not _flags(sock, ifname) & IFF_RUNNING:
        if clock() >= until:
            raise NotRunning(f"{ifname!r} has no carrier after {wait:.1f} s")
        time.sleep(0.002)
    time.sleep(SETTLE)


def _set_up(sock: socket.socket, ifname: str, up: bool) -> bool:
    """Set IFF_UP as asked; whether it was set before."""
    flags = _flags(sock, ifname)
    was_up = bool(flags & IFF_UP)
    if was_up != up:
        wanted = (flags | IFF_UP) if up else (flags & ~IFF_UP)
        _ioctl(sock, ifname, SIOCSIFFLAGS, IFREQ_FLAGS.pack(ifname.encode(), wanted & 0xFFFF))
    return was_up
