"""The daemon's CNI endpoint: a root-only unix socket where bin/moor forwards each CNI call.

Each connection carries one request (env + stdin, the pod netns fd by SCM_RIGHTS) and gets one
reply. Requests run on a fixed pool of worker threads, so per-thread netlink sockets are reused
rather than leaked. A peer that is not uid 0 is refused, whatever the file mode says.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cni_plugin.errors import INVALID_ENVIRONMENT, CNIError
from cni_plugin.skel import Reply
from cni_plugin.wire import WireError, WireRequest, decode_request, encode_reply

log = logging.getLogger(__name__)
Handler = Callable[[WireRequest, int | None], Reply]
MAX_REQUEST = 4 << 20


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class CniEndpoint:
    def __init__(self, path: str, handler: Handler, workers: int = 16) -> None:
        self.path = path
        self.handler = handler
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cni")
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(512)
        self.sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="cni-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                continue
            self.pool.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(30)
            if _peer_uid(conn) != 0:
                err = CNIError(INVALID_ENVIRONMENT, "only root may use the moor CNI endpoint")
                conn.sendall(encode_reply(1, (json.dumps(err.to_dict("1.1.0")) + "\n").encode()))
                return
            data, fds = self._receive(conn)
            try:
                request = decode_request(data)
            except WireError as exc:
                log.warning("malformed request on the CNI endpoint: %s", exc)
                return
            reply = self.handler(request, fds[0] if fds else None)
            conn.sendall(encode_reply(reply.code, reply.stdout, reply.stderr))
        except Exception:
            log.exception("CNI request failed")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    @staticmethod
    def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        chunks: list[bytes] = []
        size = 0
        first = True
        while True:
            if first:
                msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                        fds.extend(arr)
                first = False
            else:
                msg = conn.recv(65536)
            if not msg:
                break
            chunks.append(msg)
            size += len(msg)
            if size > MAX_REQUEST:
                raise WireError("request too large")
        for extra in fds[1:]:
            os.close(extra)
        return b"".join(chunks), fds[:1]

    def stop(self) -> None:
        self._stopping.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.pool.shutdown(wait=True)
