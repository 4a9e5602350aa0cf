"""The cluster bench's instruments: threads that live in a netns, a netlink watch of moor's routes,
a plain-HTTP etcd client, and a metrics scrape.

A socket belongs to the netns of the thread that creates it, so each instrument runs on a thread
of its own that entered its netns with setns(CLONE_NEWNET) first; the bench process itself never
leaves the host's. The etcd client is etcd's v3 JSON gateway over `http.client` (no grpc: its own
threads would open their sockets in whatever netns they happen to be in), so a write's timestamp
is the moment this thread's request returned.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import http.client
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cni_plugin.datapath import rtnl_codec as codec
from cni_plugin.datapath.routes import MOOR_RTPROTO

CLONE_NEWNET = 0x40000000
RTMGRP_IPV4_ROUTE = 0x40
SO_RCVBUFFORCE = 33
RCVBUF = 64 << 20  # a 5000-route reconcile's notifications, with room to spare
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into /run/netns/<name> (for good: use a thread of its own)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def netns_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread inside netns `name`: everything submitted runs there, in order."""
    return ThreadPoolExecutor(1, thread_name_prefix=f"in-{name}", initializer=enter_netns,
                              initargs=(name,))  # fmt: skip


class RouteWatch:
    """RTM_NEWROUTE/RTM_DELROUTE of protocol-109 routes in the main table of some netns, each
    timestamped (time.perf_counter) when the watching thread received it.

    `added[ns][prefix]` / `removed[ns][prefix]`: the first such event since the last `arm()`.
    Locks: `_cond` guards both maps and `overflow`; the reader threads write them under it.
    """

    def __init__(self, namespaces: list[str]) -> None:
        self.namespaces = namespaces
        self.added: dict[str, dict[str, float]] = {ns: {} for ns in namespaces}
        self.removed: dict[str, dict[str, float]] = {ns: {} for ns in namespaces}
        self.overflow: list[str] = []  # netns whose socket lost notifications (ENOBUFS)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(len(namespaces) + 1)

    def start(self) -> None:
        for ns in self.namespaces:
            t = threading.Thread(target=self._read, args=(ns,), name=f"watch-{ns}", daemon=True)
            t.start()
            self._threads.append(t)
        self._ready.wait(10)  # every socket is bound: nothing after this is missed

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def arm(self) -> None:
        """Forget what was seen: the next events count from now."""
        with self._cond:
            for ns in self.namespaces:
                self.added[ns].clear()
                self.removed[ns].clear()

    def everywhere(self, prefix: str, removed: bool = False) -> bool:
        """Has every netns seen `prefix` added (or removed) since `arm()`? Call under the lock
        (as `wait`'s predicate)."""
        seen = self.removed if removed else self.added
        return all(prefix in seen[ns] for ns in self.namespaces)

    def seen(self, ns: str) -> tuple[dict[str, float], dict[str, float]]:
        """Copies of (added, removed) of `ns` since `arm()`."""
        with self._cond:
            return dict(self.added[ns]), dict(self.removed[ns])

    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Until `ready()` (called under the lock) holds, or `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(ready, timeout)

    def _read(self, ns: str) -> None:
        sock = None
        try:
            enter_netns(ns)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            sock.bind((0, RTMGRP_IPV4_ROUTE))
        except BaseException:
            self._ready.abort()
            if sock is not None:
                sock.close()
            raise
        with sock:
            self._ready.wait(10)
            while not self._stop.is_set():
                if not select.select([sock], [], [], 0.2)[0]:
                    continue
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    with self._cond:
                        self.overflow.append(ns)
                    continue
                self._note(ns, data, time.perf_counter())

    def _note(self, ns: str, data: bytes, when: float) -> None:
        with self._cond:
            for message in codec.split_messages(data):
                kind = codec.message_type(message)
                if kind not in (codec.RTM_NEWROUTE, codec.RTM_DELROUTE):
                    continue
                route = codec.parse_route(message)
                if route is None or route.proto != MOOR_RTPROTO:
                    continue
                if route.table != codec.RT_TABLE_MAIN:
                    continue
                seen = self.added[ns] if kind == codec.RTM_NEWROUTE else self.removed[ns]
                seen.setdefault(route.prefix, when)
            self._cond.notify_all()


class EtcdGateway:
    """etcd's v3 JSON gateway over one keep-alive HTTP connection; call from one thread only
    (the one inside the netns that reaches etcd). Each call returns when etcd answered."""

    def __init__(self, host: str, port: int = 2379) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)

    def _post(self, path: str, body: dict[str, str]) -> dict:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {response.status} {data[:200]!r}")
        return json.loads(data)

    def put(self, key: str, value: bytes) -> tuple[float, float]:
        """Write; (sent, answered): time.perf_counter() before the request and once etcd's
        answer was read."""
        sent = time.perf_counter()
        self._post("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(value)})
        return sent, time.perf_counter()

    def delete(self, key: str) -> tuple[float, float]:
        sent = time.perf_counter()
        self._post("/v3/kv/deleterange", {"key": _b64(key.encode())})
        return sent, time.perf_counter()

    def get(self, key: str) -> bytes | None:
        kvs = self._post("/v3/kv/range", {"key": _b64(key.encode())}).get("kvs") or []
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def close(self) -> None:
        self.conn.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scrape(port: int) -> dict[str, float]:
    """The daemon's metrics at 127.0.0.1:`port` (call on a thread in its netns): sample -> value,
    labels included in the name as Prometheus prints them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with contextlib.closing(conn):
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def reconcile_runs(metrics: dict[str, float]) -> tuple[int, float]:
    """(runs, total seconds) of the daemon's route reconcile, from its histogram."""
    return (
        int(metrics.get("moor_route_reconcile_seconds_count", 0)),
        metrics.get("moor_route_reconcile_seconds_sum", 0.0),
    )
