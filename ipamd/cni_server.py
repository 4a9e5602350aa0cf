"""The daemon's CNI endpoint: a root-only unix socket where bin/moor forwards each CNI call.

Each connection carries one request (env + stdin, the pod netns fd by SCM_RIGHTS) and gets one
reply, within `--request-deadline` of being accepted. This module reads requests; the workers and
the watchdog are in ipamd/cni_dispatch.py.

Reading happens on one selector thread, never on a worker: a client that sends nothing, or trickles
a byte at a time, costs a file descriptor, not a worker. The thread accepts, checks the peer's uid
(SO_PEERCRED), reads without blocking, takes the netns fd, and hands complete requests (the client
half-closed) to the dispatcher. Limits, all answered rather than reset:
  - READ_LIMIT: a client has min(2 s, deadline) from accept to send its whole request, else it is
    cut off (11). The shim sends everything at once and half-closes, so it needs microseconds; 2 s
    tolerates a loaded node and still leaves most of the deadline for the work.
  - READING_LIMIT: at most 128 connections may be still sending. A new one past that evicts the
    oldest (11): well-behaved callers finish in microseconds, so the oldest unfinished one is slow.
    Complete requests are bounded by the dispatcher's queue (8 per worker) plus the workers.
  - MAX_REQUEST (cni_plugin.wire, 4 MiB): a bigger request gets code 7, stating its size, once the
    client has finished sending (drained and discarded, at most DRAIN_LIMIT more bytes), so the
    client reads the reply instead of a reset. A non-root peer is drained the same way and gets 11.

Shared state: everything here (`_conns`, each `_Conn`, the selector) is owned by the selector
thread; `start` and `stop` only touch it before the thread starts and after it has ended.
"""

from __future__ import annotations

import array
import logging
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict

from cni_plugin.errors import INVALID_NETWORK_CONFIG, TRY_AGAIN_LATER
from cni_plugin.wire import MAX_REQUEST
from ipamd.cni_dispatch import Dispatcher, Handler, Pending, config_version
from ipamd.local_socket import listen_root_only, peer_uid

log = logging.getLogger(__name__)
READ_LIMIT = 2.0  # seconds, capped by the request deadline
READING_LIMIT = 128  # connections still sending
DRAIN_LIMIT = MAX_REQUEST  # bytes read and discarded past MAX_REQUEST before hanging up
CHUNK = 65536
READS_PER_EVENT = 16  # then let other connections have a turn
ANCILLARY = socket.CMSG_SPACE(4 * struct.calcsize("i"))
_LISTENER, _WAKE = object(), object()


class _Conn:
    """A connection still sending. `refusal` set: drain it, then answer that (11)."""

    __slots__ = ("sock", "accepted", "cutoff", "chunks", "size", "fds", "refusal")

    def __init__(self, sock: socket.socket, now: float, read_limit: float) -> None:
        self.sock = sock
        self.accepted = now
        self.cutoff = now + read_limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.fds: list[int] = []
        self.refusal: str | None = None

    @property
    def draining(self) -> bool:
        return self.refusal is not None or self.size > MAX_REQUEST


class CniEndpoint:
    def __init__(self, path: str, handler: Handler, workers: int = 16, deadline: float = 5.0):
        self.path = path
        self.deadline = deadline
        self.read_limit = min(READ_LIMIT, deadline)
        self.dispatch = Dispatcher(handler, workers, deadline)
        self._conns: OrderedDict[_Conn, None] = OrderedDict()  # accept order = cutoff order
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def listen(self) -> None:
        """Bind and listen, serving nothing yet: from now on bin/moor connects and waits instead
        of spooling a DEL. The daemon replays the spool in between (`serve` after), so a DEL
        spooled during start-up is listed by that replay, not left for the next restart."""
        # Each connection may hold a socket and a netns fd; the gRPC relay and the rest get 4096.
        _ensure_fd_room(4096 + 2 * (READING_LIMIT + self.dispatch.queue_limit))
        self.sock = listen_root_only(self.path, 512)

    def start(self) -> None:
        """Listen (unless `listen` did already) and serve."""
        if self.sock is None:
            self.listen()
        sock = self.sock
        assert sock is not None
        self._sel.register(sock, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self.dispatch.start()
        self._thread = threading.Thread(target=self._loop, name="cni-reader", daemon=True)
        self._thread.start()

    # ---- the selector thread -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            timeout = None
            if self._conns:
                timeout = max(0.0, next(iter(self._conns)).cutoff - time.monotonic())
            for key, _ in self._sel.select(timeout):
                if key.data is _LISTENER:
                    self._accept()
                elif key.data is not _WAKE and key.data in self._conns:
                    self._read(key.data)
            now = time.monotonic()
            while self._conns and (oldest := next(iter(self._conns))).cutoff <= now:
                self._cut_off(
                    oldest, f"the client did not send its request within {self.read_limit:g} s"
                )
        for conn in list(self._conns):
            self._drop(conn)

    def _accept(self) -> None:
        for _ in range(64):  # a batch, then let reads have a turn
            try:
                sock, _ = self.sock.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE: shed the oldest slow client, or pause a little
                log.warning("CNI endpoint: accept failed: %s", exc)
                if self._conns:
                    self._cut_off(next(iter(self._conns)), "evicted: out of file descriptors")
                else:
                    time.sleep(0.05)
                return
            sock.setblocking(False)
            if len(self._conns) >= READING_LIMIT:
                self._cut_off(
                    next(iter(self._conns)), "evicted: too many connections still sending"
                )
            conn = _Conn(sock, time.monotonic(), self.read_limit)
            self._conns[conn] = None
            self._sel.register(sock, selectors.EVENT_READ, conn)
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if uid != 0:
                log.warning("CNI endpoint: refused a peer with uid %d", uid)
                conn.refusal = f"only root may use the moor CNI endpoint (peer uid {uid})"

    def _read(self, conn: _Conn) -> None:
        for _ in range(READS_PER_EVENT):
            try:
                data, ancdata, _flags, _addr = conn.sock.recvmsg(CHUNK, ANCILLARY)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("CNI endpoint: client went away: %s", exc)
                self._drop(conn)
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    conn.fds.extend(fds)
            if not data:
                self._complete(conn)
                return
            conn.size += len(data)
            if not conn.draining:
                conn.chunks.append(data)
            elif conn.chunks:
                conn.chunks.clear()  # just went over MAX_REQUEST: keep nothing
            if conn.size > MAX_REQUEST + DRAIN_LIMIT:
                self._reject(conn, complete=False)
                return

    def _complete(self, conn: _Conn) -> None:
        """The client half-closed: hand the request over, or answer a drained one."""
        if conn.draining:
            self._reject(conn, complete=True)
            return
        self._forget(conn)
        for extra in conn.fds[1:]:
            os.close(extra)
        data = conn.chunks[0] if len(conn.chunks) == 1 else b"".join(conn.chunks)
        expiry = conn.accepted + self.deadline
        pending = Pending(conn.sock, data, conn.fds[:1], expiry, config_version(data))
        if not self.dispatch.submit(pending):
            pending.close_fds()
            log.warning("CNI endpoint: work queue full, answered 11")
            pending.fail(TRY_AGAIN_LATER, "moor-ipamd is busy (its work queue is full)", 0)

    def _reject(self, conn: _Conn, *, complete: bool) -> None:
        """Answer a refused or oversized request after draining it, and hang up."""
        if conn.refusal is not None:
            self._answer(conn, TRY_AGAIN_LATER, conn.refusal)
            return
        size = f"{conn.size} bytes" if complete else f"more than {conn.size} bytes"
        log.warning("CNI endpoint: request of %s refused (limit %d)", size, MAX_REQUEST)
        self._answer(
            conn,
            INVALID_NETWORK_CONFIG,
            f"the request is {size}, over the moor CNI endpoint's limit of {MAX_REQUEST} bytes",
        )

    def _cut_off(self, conn: _Conn, why: str) -> None:
        if conn.draining:
            self._reject(conn, complete=False)
        else:
            log.warning("CNI endpoint: connection cut off: %s", why)
            self._answer(conn, TRY_AGAIN_LATER, f"moor-ipamd cut the connection off: {why}")

    def _answer(self, conn: _Conn, code: int, msg: str) -> None:
        """Best-effort reply from this thread (never blocks), then close."""
        self._forget(conn)
        pending = Pending(conn.sock, b"", conn.fds, conn.accepted + self.deadline)
        pending.close_fds()
        pending.fail(code, msg, 0)

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)
        self._sel.unregister(conn.sock)

    def _drop(self, conn: _Conn) -> None:
        self._forget(conn)
        for fd in conn.fds:
            os.close(fd)
        conn.sock.close()

    def stop(self) -> None:
        """Take no new request (the socket goes first, so bin/moor answers 11 to an ADD and
        spools a DEL at once instead of waiting), then finish every request already read:
        each is bounded by its deadline, and the watchdog answers one that overruns."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        if self.sock is not None:
            self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self._thread is not None:
            self.dispatch.stop()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _ensure_fd_room(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE (often 1024) toward the hard one, so the bounds above and
    the rest of the daemon (gRPC, etcd, netlink) always have descriptors to spare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
