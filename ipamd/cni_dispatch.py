"""The work side of the CNI endpoint: a bounded queue, a fixed pool of workers and a watchdog.

The reader (ipamd/cni_server.py) hands over whole requests as `Pending`. Each gets exactly one
reply, from whichever of these comes first:
  - `submit` refuses it when the queue is full: the reader answers 11 at once;
  - a worker finds its deadline passed while it was queued: 11, and the work is not done;
  - a worker runs the handler and sends its reply;
  - the watchdog answers 11 when no reply has gone out by the deadline plus WATCHDOG_MARGIN, so a
    handler stuck in the kernel or the store cannot hold the runtime past it.
A reply that loses the race is dropped and logged. The margin lets the handler's own checks
(cni_plugin.deadline, the store's capped waits) win in the normal case, so its reply says what
actually happened (an ADD that overran has rolled back before it answers).

The pool is fixed, not a thread per request, so per-thread netlink sockets are reused, not leaked.

Shared state and who guards it:
  - `Pending.answered` is set once, under `_claim_lock`; whoever sets it sends the reply and
    closes the connection, nobody else touches the socket after that.
  - `Pending.fds` (the netns fd) belongs to the reader until `submit` succeeds, then to the worker
    that takes the request off the queue (which closes them after the handler, even if the
    watchdog answered meanwhile), or to `stop`.
  - the queue is a `queue.Queue` (its own lock), bounded by `queue_limit`.
  - `_timers`, the watchdog's heap of (expiry, seq, Pending), is guarded by `_cond`.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cni_plugin.errors import DECODING_FAILURE, INTERNAL, TRY_AGAIN_LATER, CNIError
from cni_plugin.netconf import SUPPORTED_VERSIONS
from cni_plugin.skel import Reply
from cni_plugin.wire import WireError, WireRequest, decode_request, encode_reply

log = logging.getLogger(__name__)

Handler = Callable[[WireRequest, int | None, float], Reply]
WATCHDOG_MARGIN = 0.5  # seconds after the deadline before the watchdog answers for the handler
SEND_TIMEOUT = 1.0  # a worker's reply is a few KiB into an empty socket buffer: never near this
QUEUE_PER_WORKER = 8  # requests waiting per worker: ~8 x 5 ms of work each, far inside a deadline
_VERSION_RE = re.compile(rb'"cniVersion"\s*:\s*"([0-9.]{1,16})"')
_claim_lock = threading.Lock()


def config_version(stdin: bytes) -> str:
    """The request's cniVersion for an error the handler did not write; cheap (no JSON parse)."""
    match = _VERSION_RE.search(stdin)
    version = match.group(1).decode() if match else ""
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def error_reply(code: int, msg: str, version: str = SUPPORTED_VERSIONS[-1]) -> Reply:
    body = json.dumps(CNIError(code, msg).to_dict(version), indent=4) + "\n"
    return Reply(1, body.encode())


def send_reply(sock: socket.socket, reply: Reply, timeout: float) -> None:
    """Send one reply and close the connection; the caller owns the socket. Timeout 0 sends
    without blocking (from the reader's thread: a short reply always fits an unused buffer)."""
    try:
        sock.settimeout(timeout)
        sock.sendall(encode_reply(reply.code, reply.stdout, reply.stderr))
    except OSError as exc:
        log.debug("CNI reply not delivered: %s", exc)
    finally:
        sock.close()


@dataclass(eq=False)
class Pending:
    """One complete request between the reader and its reply (see the module docstring)."""

    sock: socket.socket
    data: bytes
    fds: list[int]
    expiry: float
    version: str = SUPPORTED_VERSIONS[-1]
    answered: bool = field(default=False, init=False)

    def answer(self, reply: Reply, timeout: float = SEND_TIMEOUT) -> bool:
        """Send `reply` unless another reply went first; True if this one was sent."""
        with _claim_lock:
            if self.answered:
                return False
            self.answered = True
        send_reply(self.sock, reply, timeout)
        return True

    def fail(self, code: int, msg: str, timeout: float = SEND_TIMEOUT) -> bool:
        return self.answer(error_reply(code, msg, self.version), timeout)

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class Dispatcher:
    def __init__(self, handler: Handler, workers: int, deadline: float) -> None:
        self.handler = handler
        self.workers = workers
        self.deadline = deadline
        self.queue_limit = QUEUE_PER_WORKER * workers
        self._queue: queue.Queue[Pending | None] = queue.Queue(self.queue_limit)
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            self._spawn(f"cni-{i}", self._work)
        self._spawn("cni-watchdog", self._watchdog)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def submit(self, pending: Pending) -> bool:
        """Queue a request for a worker; False (and nothing kept) when the queue is full."""
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            return False
        with self._cond:
            heapq.heappush(self._timers, (pending.expiry, next(self._seq), pending))
            if self._timers[0][2] is pending:
                self._cond.notify()
        return True

    # ---- workers -------------------------------------------------------------------------
    def _work(self) -> None:
        while (pending := self._queue.get()) is not None:
            try:
                self._run(pending)
            except Exception:
                log.exception("CNI request failed in the endpoint")
                pending.fail(INTERNAL, "internal error in the moor CNI endpoint")
            finally:
                pending.close_fds()

    def _run(self, pending: Pending) -> None:
        if pending.answered:  # the watchdog answered while it waited
            return
        if time.monotonic() >= pending.expiry:
            log.warning("CNI request waited past its deadline in the queue: answered 11, not run")
            pending.fail(
                TRY_AGAIN_LATER,
                f"moor-ipamd is busy: the request waited past its {self.deadline:g} s deadline",
            )
            return
        data, pending.data = pending.data, b""  # the heap keeps `pending` until its expiry
        try:
            request = decode_request(data)
        except WireError as exc:
            log.warning("malformed request on the CNI endpoint: %s", exc)
            pending.fail(DECODING_FAILURE, f"failed to decode content: {exc}")
            return
        del data
        reply = self.handler(request, pending.fds[0] if pending.fds else None, pending.expiry)
        if not pending.answer(reply):
            env = request.env
            log.warning(
                "%s %s/%s finished after its deadline (code %d); the watchdog had answered 11",
                env.get("CNI_COMMAND"),
                env.get("CNI_CONTAINERID", ""),
                env.get("CNI_IFNAME", ""),
                reply.code,
            )

    # ---- watchdog ------------------------------------------------------------------------
    def _watchdog(self) -> None:
        while (late := self._next_late()) is not None:
            if late.fail(
                TRY_AGAIN_LATER,
                f"moor-ipamd did not finish the request within its {self.deadline:g} s deadline",
            ):
                log.warning("CNI request not done by its deadline: the watchdog answered 11")

    def _next_late(self) -> Pending | None:
        """Wait for the next request whose deadline + margin passes unanswered; None on stop."""
        with self._cond:
            while not self._stopping:
                if not self._timers:
                    self._cond.wait()
                    continue
                expiry, _, pending = self._timers[0]
                wait = expiry + WATCHDOG_MARGIN - time.monotonic()
                if pending.answered or wait <= 0:
                    heapq.heappop(self._timers)
                    if not pending.answered:
                        return pending
                    continue
                self._cond.wait(wait)
            return None

    def stop(self) -> None:
        """Finish what is queued (expired requests are answered without running), then end.

        Bounded: the workers get until the newest request's deadline (+ the watchdog's margin and
        a second) while the watchdog still answers any that overruns; a handler stuck past that
        is left behind (its thread is a daemon thread) rather than keeping the daemon alive."""
        for _ in range(self.workers):
            self._queue.put(None)
        until = time.monotonic() + self.deadline + WATCHDOG_MARGIN + 1.0
        for thread in self._threads:
            if thread.name != "cni-watchdog":
                thread.join(max(0.0, until - time.monotonic()))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.name == "cni-watchdog":
                thread.join(2.0)
