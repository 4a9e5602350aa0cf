"""Kernel notifications that one of the route reconcile's objects was deleted.

An administrator's `ip route flush`, a network manager that removes foreign routes
(systemd-networkd's ManageForeignRoutes), an interface that went down and took its routes: each
shows up here as RTM_DELROUTE / RTM_DELNEIGH / RTM_DELLINK, and the reconcile runs at once instead
of at the next periodic resync. A notification says only that something changed; the reconcile
reads the kernel again and decides, so a missed or overflowed notification (ENOBUFS) costs
nothing but latency: it is reported as a deletion too.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cni_plugin.datapath import rtnl_codec as codec

log = logging.getLogger(__name__)

RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE = 0x1, 0x4, 0x40
_IFINDEX = struct.Struct("=i")
_NLMSG_LEN = 16
POLL = 0.5  # seconds between looks at the stop flag


@dataclass(frozen=True)
class Deleted:
    """What the kernel deleted: "route" (with its protocol and output link), "neigh" (a neighbour
    or FDB entry, with its link) or "link"; or "overflow" when notifications were lost."""

    kind: str
    ifindex: int = 0
    proto: int = 0


def parse(message: bytes) -> Deleted | None:
    kind = codec.message_type(message)
    if kind == codec.RTM_DELROUTE:
        route = codec.parse_route(message)
        return None if route is None else Deleted("route", route.oif, route.proto)
    if kind == codec.RTM_DELNEIGH:
        return Deleted("neigh", codec.parse_neigh(message).ifindex)
    if kind == codec.RTM_DELLINK:
        return Deleted("link", _IFINDEX.unpack_from(message, _NLMSG_LEN + 4)[0])
    return None


class DeletionMonitor:
    """A thread reading rtnetlink multicast in the daemon's netns; calls `on_delete` for every
    deletion `wanted` says is of interest. The callback must be quick (it sets a flag)."""

    def __init__(self, wanted: Callable[[Deleted], bool], on_delete: Callable[[], None]) -> None:
        self.wanted = wanted
        self.on_delete = on_delete
        self._stop = threading.Event()
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE))
        self._thread = threading.Thread(target=self._run, name="netlink-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * POLL)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], POLL)
            if not ready:
                continue
            try:
                data = self._sock.recv(1 << 16)
            except OSError as exc:  # ENOBUFS: the kernel dropped notifications we never saw
                log.debug("netlink monitor: %s; treating it as a deletion", exc)
                self.on_delete()
                continue
            if any(
                event is not None and self.wanted(event)
                for event in map(parse, codec.split_messages(data))
            ):
                self.on_delete()
