"""A scripted stand-in for moor-ipamd's CNI socket: pure wire logic, to compare the two shims.

It serves one connection per `serve()` call on a thread (`join()` once the shim has exited:
a shim that never connected is not waited for): reads the request to EOF with recvmsg,
keeping any fd that came with it (SCM_RIGHTS), then answers with the scripted bytes, or closes
without a word, or holds the connection until released (with a late reply) or stopped. What it received comes back as a
`Received`, so a test can check that both shims sent the same bytes and the same netns.
Real-daemon behaviour is tested with tests/helpers/moor.py's Daemon; this fake only scripts
replies no daemon would send (torn, malformed, never).
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

HOLD = None  # reply script: keep the connection open, answer nothing, until release() or stop()


@dataclass
class Received:
    data: bytes = b""
    fd_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the fd that came along
    fds: int = 0
    connected: bool = False


class FakeDaemon:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.abandon = threading.Event()  # the shim exited: stop waiting for its connection
        self.released = threading.Event()
        self.late_reply = b""
        self.request_read = threading.Event()  # set once a request was read to its EOF
        self._thread: threading.Thread | None = None
        self.received = Received()

    def serve(self, reply: bytes | None, *, before_reading: bool = False) -> None:
        """Answer the next connection on a thread; `join()` returns what it received."""
        self.received = Received()
        self.request_read.clear()
        self.abandon.clear()
        self._thread = threading.Thread(target=self._one, args=(reply, before_reading))
        self._thread.start()

    def join(self) -> Received:
        """What the last `serve()` received; call it once the shim has exited."""
        assert self._thread is not None
        self.abandon.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the fake daemon never finished"
        return self.received

    def release(self, reply: bytes) -> None:
        """A HOLD connection answers `reply` now."""
        self.late_reply = reply
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.abandon.set()
        if self._thread is not None:
            self._thread.join(60)
        self.listener.close()

    def _one(self, reply: bytes | None, before_reading: bool) -> None:
        while not select.select([self.listener], [], [], 0.02)[0]:
            if self.abandon.is_set():
                return
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(15)
            self.received.connected = True
            if before_reading and reply is not None:  # a refusal, sent before the request is in
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_RDWR)
                return
            self._read(conn)
            self.request_read.set()
            if reply is HOLD:
                self.released.wait(60)
                reply = self.late_reply
            if reply:
                try:
                    conn.sendall(reply)
                except OSError:  # a shim that gave up (interrupted, timed out) is gone
                    pass

    def _read(self, conn: socket.socket) -> None:
        chunks = []
        while True:
            data, ancdata, _flags, _addr = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        st = os.fstat(fd)
                        self.received.fd_identity = (st.st_dev, st.st_ino)
                        self.received.fds += 1
                        os.close(fd)
            if not data:
                break
            chunks.append(data)
        self.received.data = b"".join(chunks)
