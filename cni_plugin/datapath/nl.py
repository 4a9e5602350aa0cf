"""The only module that imports pyroute2: socket lifecycle, dump retries and errno translation.

Socket policy (measured, see the datapath notes):
  * host netns: one IPRoute per *thread*. A shared IPRoute lazily opens one socket and one asyncio
    loop per calling thread and only frees them on close(), so short-lived threads would leak fds;
    the daemon uses a fixed worker pool, so a thread-local instance is both safe and warm.
  * pod netns: a short-lived IPRoute over a socket created by the netns helper thread
    (netns.open_netlink_socket), closed when the `with` block ends. pyroute2 never forks for it.
  * no NLM_F_ECHO (nlm_echo): pyroute2 0.9.7 stops reading at the echoed RTM_NEWLINK and never
    sees the error ACK that follows it, e.g. a veth create whose IFLA_MASTER is bad is echoed, then
    rolled back by the kernel, and pyroute2 reports success.
  * the hot path of ADD and DEL uses `Rtnl`: pyroute2's message codec, but the request and its ack
    go straight over the socket. IPRoute runs every request through an asyncio event loop, which
    costs ~0.75 ms of Python per request (measured: pod configuration 1.98 ms CPU with IPRoute,
    0.32 ms with Rtnl). Dumps and CHECK's inspection stay on IPRoute.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .errors import DatapathError, LinkExists, LinkNotFound, NetnsError, NotPermitted
from .netns import open_netlink_socket

__all__ = [
    "IFF_PROMISC",
    "IFF_UP",
    "IPRoute",
    "NLM_F_ACK",
    "NLM_F_CREATE",
    "NLM_F_DUMP",
    "NLM_F_REPLACE",
    "LinkInfo",
    "RTM_DELLINK",
    "RTM_GETADDR",
    "RTM_GETROUTE",
    "RTM_GETLINK",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWROUTE",
    "Rtnl",
    "host_rtnl",
    "ifaddrmsg",
    "ifinfmsg",
    "pod_rtnl",
    "rtmsg",
    "NetlinkError",
    "close_host_ipr",
    "dump_retry",
    "host_ipr",
    "link_info",
    "link_kind",
    "pod_ipr",
    "translate_errors",
]

T = TypeVar("T")

IFF_UP = 0x1
IFF_PROMISC = 0x100
NLM_F_DUMP_INTR = 0x10
DUMP_ATTEMPTS = 5
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NETLINK_ROUTE = 0
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id


@dataclass(frozen=True)
class LinkInfo:
    """Identity of a link as the CNI result needs it."""

    index: int
    name: str
    mac: str


_local = threading.local()


def host_ipr() -> IPRoute:
    """The calling thread's IPRoute in the daemon's own netns (created on first use)."""
    ipr = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = IPRoute()
        _local.ipr = ipr
    return ipr


def close_host_ipr() -> None:
    """Close the calling thread's host IPRoute (worker shutdown, or after a broken socket)."""
    ipr = getattr(_local, "ipr", None)
    if ipr is not None:
        _local.ipr = None
        try:
            ipr.close()
        except Exception:  # closing a broken socket must not mask the original error
            pass


@contextmanager
def pod_ipr(netns_fd: int) -> Iterator[IPRoute]:
    """A short-lived IPRoute inside the netns behind `netns_fd`, closed on exit.

    The caller's thread does all requests; only socket creation hops to the netns helper thread.
    """
    sock = open_netlink_socket(netns_fd)
    try:
        # use_socket= rather than fileno=: pyroute2 then works on our socket object, so a failure
        # at any point can be cleaned up with sock.close(), which is idempotent. (With fileno=
        # pyroute2 adopts the bare fd part-way through its constructor, and closing it ourselves
        # after a failure could close an fd number another thread has since reused.)
        ipr = IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield ipr
    finally:
        try:
            ipr.close()
        finally:
            sock.close()


class Rtnl:
    """Synchronous rtnetlink request/ack on one socket, messages encoded by pyroute2.

    Not thread-safe: one per thread (host) or per pod operation. Errors raise pyroute2's
    NetlinkError, so `translate_errors` maps them exactly as for IPRoute.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._seq = 0

    def request(self, msg: nlmsg, msg_type: int, flags: int = 0) -> list[bytes]:
        """Send `msg` as `msg_type` with NLM_F_ACK; return the raw replies that precede the ack."""
        return self._exchange(msg, msg_type, NLM_F_ACK | flags)

    def dump(self, msg: nlmsg, msg_type: int) -> list[bytes]:
        """A dump request; the raw replies up to NLMSG_DONE. NetlinkDumpInterrupted when the kernel
        flags the dump inconsistent, so `dump_retry` can run it again."""
        return self._exchange(msg, msg_type, NLM_F_DUMP)

    def raw(self, msg_type: int, payload: bytes, flags: int = NLM_F_ACK) -> list[bytes]:
        """Send a message whose body the caller packed (rtnl_codec.py); the raw replies. For the
        per-peer writes of the route reconcile, where pyroute2's codec would cost more than the
        kernel's work."""
        self._seq += 1
        seq = self._seq
        header = _HEADER.pack(_HEADER.size + len(payload), msg_type, NLM_F_REQUEST | flags, seq, 0)
        self.sock.send(header + payload)
        return self._replies(seq)

    def _exchange(self, msg: nlmsg, msg_type: int, flags: int) -> list[bytes]:
        self._seq += 1
        seq = self._seq
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self.sock.send(msg.data)
        return self._replies(seq)

    def _replies(self, seq: int) -> list[bytes]:
        replies: list[bytes] = []
        interrupted = False
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, rflags, rseq, _port = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise DatapathError(f"malformed netlink reply (length {length})")
                if rseq == seq:  # anything else is a stale reply to an abandoned request
                    interrupted |= bool(rflags & NLM_F_DUMP_INTR)
                    if mtype == NLMSG_ERROR:
                        code = -int.from_bytes(
                            data[offset + 16 : offset + 20], sys.byteorder, signed=True
                        )
                        if code:
                            raise NetlinkError(code, os.strerror(code))
                        return replies
                    if mtype == NLMSG_DONE:
                        if interrupted:
                            raise NetlinkDumpInterrupted()
                        return replies
                    replies.append(data[offset : offset + length])
                offset += (length + 3) & ~3

    def get_link(self, ifname: str) -> ifinfmsg:
        """RTM_GETLINK by name, decoded; LinkNotFound through translate_errors when absent."""
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_IFNAME", ifname)]
        (reply,) = self.request(msg, RTM_GETLINK)
        link = ifinfmsg(reply)
        link.decode()
        return link

    def close(self) -> None:
        self.sock.close()


def _new_host_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def host_rtnl() -> Rtnl:
    """The calling thread's Rtnl in the daemon's own netns (created on first use)."""
    rtnl = getattr(_local, "rtnl", None)
    if rtnl is None:
        rtnl = Rtnl(_new_host_socket())
        _local.rtnl = rtnl
    return rtnl


def drop_host_rtnl() -> None:
    """Forget the calling thread's Rtnl after a non-netlink failure (its stream may be out of step)."""
    rtnl = getattr(_local, "rtnl", None)
    if rtnl is not None:
        _local.rtnl = None
        rtnl.close()


@contextmanager
def pod_rtnl(netns_fd: int) -> Iterator[Rtnl]:
    """An Rtnl inside the netns behind `netns_fd` (socket made by the netns helper), closed on exit."""
    rtnl = Rtnl(open_netlink_socket(netns_fd))
    try:
        yield rtnl
    finally:
        rtnl.close()


def dump_retry(fn: Callable[[], Iterable[T]], attempts: int = DUMP_ATTEMPTS) -> list[T]:
    """Run a dump to completion, retrying when the kernel flags it inconsistent.

    pyroute2 0.9.7 defines NetlinkDumpInterrupted but never raises it, so the NLM_F_DUMP_INTR header
    flag is checked here as well.
    """
    for attempt in range(attempts):
        try:
            msgs = list(fn())
        except NetlinkDumpInterrupted:
            if attempt == attempts - 1:
                raise DatapathError("netlink dump interrupted repeatedly") from None
            continue
        if any(_header_flags(m) & NLM_F_DUMP_INTR for m in msgs):
            if attempt == attempts - 1:
                raise DatapathError("netlink dump interrupted repeatedly")
            continue
        return msgs
    raise AssertionError("unreachable")


def _header_flags(msg: Any) -> int:
    try:
        return int(msg["header"]["flags"])
    except (KeyError, TypeError):
        return 0


@contextmanager
def translate_errors(
    subject: str,
    *,
    exists: type[DatapathError] = LinkExists,
    missing: type[DatapathError] = LinkNotFound,
    host: bool = True,
) -> Iterator[None]:
    """Turn NetlinkError raised in the block into a DatapathError subclass.

    EEXIST means different things per request (link, address, route), so the caller names the class.
    With `host`, any other failure (a broken socket, a confused asyncio loop) also drops the
    thread's host IPRoute so that the next call starts from a fresh socket instead of a poisoned one.
    """
    try:
        yield
    except DatapathError:
        raise
    except NetlinkError as e:
        code = e.code
        text = f"{subject}: {e.args[1] if len(e.args) > 1 else e}"
        if code == errno_mod.EEXIST:
            raise exists(text, code) from e
        if code in (errno_mod.ENODEV, errno_mod.ENOENT):
            raise missing(text, code) from e
        if code in (errno_mod.EPERM, errno_mod.EACCES):
            raise NotPermitted(text, code) from e
        if code == errno_mod.EBADF:
            raise NetnsError(text, code) from e
        raise DatapathError(text, code) from e
    except Exception:
        if host:
            close_host_ipr()
            drop_host_rtnl()
        raise


def link_kind(msg: Any) -> str | None:
    """IFLA_INFO_KIND of a link message ("bridge", "veth", ...), None for kind-less links."""
    info = msg.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def link_info(msg: Any) -> LinkInfo:
    """LinkInfo from an RTM_NEWLINK message."""
    return LinkInfo(
        index=int(msg["index"]), name=msg.get("IFLA_IFNAME"), mac=msg.get("IFLA_ADDRESS")
    )
