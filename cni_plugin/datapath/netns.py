"""Entering pod network namespaces without forking: the only module that calls setns().

Why a dedicated helper thread:
  * pyroute2's own netns support forks a child to open the socket; inside the gRPC-hosting daemon
    that child crashes intermittently, so the daemon never forks for netns work.
  * setns(CLONE_NEWNET) switches only the calling thread. Doing it on a worker thread would risk a
    worker (or anything it spawns) silently running in a pod's netns. One helper thread, which does
    nothing else, contains that risk and serialises the (microsecond-cheap) switches.

A socket keeps the netns it was created in for its whole life (netlink, packet, inet alike), so the
helper only has to create the socket inside the pod's netns; all later requests run on the caller's
thread.

If the helper cannot switch back to the daemon's own netns, the process aborts: continuing would
make every later "host" operation of that thread hit a pod's netns.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .errors import NetnsError

__all__ = ["NetnsError", "netns_inode", "open_netlink_socket", "open_socket", "run_in_netns"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# ioctl(ns_fd, NS_GET_NSTYPE) == _IO(0xb7, 0x3): returns the CLONE_NEW* type of a namespace fd.
NS_GET_NSTYPE = 0xB703
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int


def netns_inode(fd: int) -> int:
    """Inode of the network namespace behind `fd`: its identity, comparable across fds and paths.

    Raises NetnsError when fd is closed or is not a network-namespace fd.
    """
    try:
        st = os.fstat(fd)
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        raise NetnsError(f"fd {fd} is not a network namespace: {e.strerror}", e.errno) from e
    if nstype != CLONE_NEWNET:
        raise NetnsError(f"fd {fd} is a namespace of type {nstype:#x}, not a network namespace")
    return st.st_ino


def _thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _die(message: str) -> None:
    """Abort the whole process: a thread stuck in a foreign netns must not keep serving."""
    text = f"moor datapath: FATAL: {message}; aborting\n"
    try:
        os.write(2, text.encode())
        log.critical("%s", text.strip())
    finally:
        os.abort()


class _Helper:
    """The one thread that ever changes network namespace."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._ready: Future[None] = Future()
        self._home_fd = -1
        self._home_ino = -1
        self.thread = threading.Thread(target=self._main, name="moor-netns", daemon=True)
        self.thread.start()
        self._ready.result()  # re-raises if the helper could not open its home netns

    def submit(self, netns_fd: int, fn: Callable[[], T]) -> T:
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError("netns helper re-entered from its own thread (would deadlock)")
        fut: Future[T] = Future()
        self._queue.put((netns_fd, fn, fut))
        return fut.result()

    def _main(self) -> None:
        try:
            # The daemon's own netns as seen by this thread before it ever switches.
            self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self._home_ino = os.fstat(self._home_fd).st_ino
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        while True:
            netns_fd, fn, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                self._enter(netns_fd)
            except BaseException as e:
                fut.set_exception(e)
                continue
            try:
                result = fn()
            except BaseException as e:
                self._go_home()
                fut.set_exception(e)
            else:
                self._go_home()
                fut.set_result(result)

    def _enter(self, netns_fd: int) -> None:
        if _setns(netns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns(fd={netns_fd}, CLONE_NEWNET): {os.strerror(err)}", err)

    def _go_home(self) -> None:
        if _setns(self._home_fd, CLONE_NEWNET) != 0:
            _die(f"setns back to the daemon netns failed: {os.strerror(ctypes.get_errno())}")
        try:
            ino = _thread_netns_inode()
        except OSError as e:
            _die(f"cannot verify the netns after switching back: {e}")
        else:
            if ino != self._home_ino:
                _die(f"netns helper is in netns inode {ino}, expected {self._home_ino}")


_helper: _Helper | None = None
_helper_lock = threading.Lock()


def _get_helper() -> _Helper:
    global _helper
    h = _helper
    if h is None:
        with _helper_lock:
            if _helper is None:
                _helper = _Helper()
            h = _helper
    return h


def _reset_after_fork() -> None:
    # A forked child has no helper thread; let it start its own if it ever needs one.
    global _helper, _helper_lock
    _helper = None
    _helper_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def run_in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """Run `fn()` on the helper thread while it is switched into `netns_fd`; return its result.

    For the few things that must be *done from inside* a netns (e.g. /proc/sys/net writes, which
    resolve against the opening thread's netns). `fn` must be short and must not block on other
    datapath calls, start threads or call setns itself: all netns work is serialised on this thread.
    The helper always switches back (aborting the process if it cannot); fn's exception propagates.
    NetnsError when netns_fd is not a usable network-namespace fd.
    """
    if sys.platform != "linux":  # pragma: no cover - the datapath is Linux-only
        raise NetnsError("network namespaces need Linux")
    return _get_helper().submit(netns_fd, fn)


def _new_netlink_socket() -> socket.socket:
    # SOCK_DGRAM: pyroute2 builds an asyncio datagram endpoint on it.
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def open_netlink_socket(netns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the netns behind `netns_fd` (the caller owns and closes it).

    Costs one round trip to the helper thread (two setns calls and a socket()); no fork.
    """
    return run_in_netns(netns_fd, _new_netlink_socket)


def open_socket(netns_fd: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """Any socket created inside the netns behind `netns_fd` (the caller owns and closes it), e.g.
    an AF_PACKET socket for the ARP probe (arp_probe.py). Its ioctls and interface names then
    resolve in that netns, from whichever thread uses it. One round trip to the helper; no fork."""
    return run_in_netns(netns_fd, lambda: socket.socket(family, kind | socket.SOCK_CLOEXEC, proto))
