"""The gRPC API's public socket: the caller's uid is checked, then its bytes are relayed.

grpc-python cannot tell who is calling on a unix socket (no SO_PEERCRED: grpc/grpc#15511,
#28755). So the daemon owns the public socket (`--grpc-socket`, 0600 in a 0700 directory), checks
SO_PEERCRED on accept (defence in depth, should someone loosen the file modes) and relays:
  - root's connections to the real gRPC server, bound in a private 0700 directory beside it;
  - anyone else's to a tiny gRPC server whose every call fails with PERMISSION_DENIED, so the
    client sees a clear gRPC status, not a hang or a reset.

The relay is one selector thread moving bytes with recv_into/send through one reusable buffer.
os.splice was considered: it saves the copy, but gRPC messages here are small (a few hundred
bytes), so the cost is the per-event Python work, which splice does not reduce, and it needs a pipe
(two more fds) per direction. A direction whose receiver is slow keeps the unsent rest and stops
reading its sender until it is flushed, so memory per connection stays bounded.

Shared state: the selector and every `_End` are owned by the relay thread; `start`/`stop` touch
them only before it starts and after it has ended.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import socket
import tempfile
import threading
from collections import OrderedDict
from concurrent import futures
from typing import Any, NoReturn

import grpc

from ipamd.local_socket import listen_root_only, peer_uid

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 256  # relayed pairs; past it the oldest non-root one goes, else the new one
BUFFER = 256 * 1024
DENIED = "only root may use the moor-ipamd API"
_LISTENER, _WAKE = object(), object()


class _DenyAll(grpc.GenericRpcHandler):
    """Every method of every service: PERMISSION_DENIED, without reading the request."""

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(self._deny)

    @staticmethod
    def _deny(_requests: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)


class _End:
    """One socket of a relayed pair. `pending` is what still has to be written to it."""

    __slots__ = ("sock", "other", "pending", "eof", "events", "root")

    def __init__(self, sock: socket.socket, root: bool) -> None:
        self.sock = sock
        self.other: _End = self
        self.pending = b""
        self.eof = False  # its peer half-closed: nothing more to read from it
        self.events = 0
        self.root = root


class GrpcGate:
    def __init__(self, public_path: str) -> None:
        self.public_path = public_path
        self.private_dir = self._private_dir(public_path)
        self.private_path = os.path.join(self.private_dir, "api.sock")
        self.deny_path = os.path.join(self.private_dir, "deny.sock")
        self._sel = selectors.DefaultSelector()
        self._clients: OrderedDict[_End, None] = OrderedDict()  # accept order
        self._buffer = bytearray(BUFFER)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self.sock: socket.socket | None = None
        self._deny: grpc.Server | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _private_dir(public_path: str) -> str:
        """`.<name>.d` beside the public socket (one per daemon, reused across restarts), or a
        fresh temp dir when that path would be too long for a unix socket (108 bytes)."""
        parent, name = os.path.split(public_path)
        path = os.path.join(parent, f".{name}.d")
        if len(os.path.join(path, "deny.sock").encode()) >= 100:
            return tempfile.mkdtemp(prefix="moor-grpc-")  # 0700
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            shutil.rmtree(path)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
        return path

    def start(self) -> None:
        """Bind the public socket; the real server must already listen on `private_path`."""
        self._deny = grpc.server(
            futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpc-deny")
        )
        self._deny.add_generic_rpc_handlers((_DenyAll(),))
        self._deny.add_insecure_port(f"unix:{self.deny_path}")
        self._deny.start()
        sock = listen_root_only(self.public_path, 128)
        self.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._loop, name="grpc-gate", daemon=True)
        self._thread.start()

    # ---- the relay thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select():
                if key.data is _LISTENER:
                    self._accept()
                elif key.data is not _WAKE:
                    end: _End = key.data
                    if end.sock.fileno() < 0:
                        continue  # closed earlier in this round
                    if mask & selectors.EVENT_WRITE:
                        self._flush(end)
                    if mask & selectors.EVENT_READ and end.sock.fileno() >= 0:
                        self._pump(end)
        for client in list(self._clients):
            self._close(client)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                client, _ = self.sock.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("gRPC socket: accept failed: %s", exc)
                return
            try:
                root = peer_uid(client) == 0
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.settimeout(1.0)
                server.connect(self.private_path if root else self.deny_path)
            except OSError as exc:
                log.warning("gRPC socket: cannot relay a connection: %s", exc)
                client.close()
                continue
            if not root:
                log.warning("gRPC socket: a non-root peer gets PERMISSION_DENIED")
            if len(self._clients) >= MAX_CONNECTIONS and not self._shed(root):
                client.close()
                server.close()
                continue
            a, b = _End(client, root), _End(server, root)
            a.other, b.other = b, a
            for end in (a, b):
                end.sock.setblocking(False)
                self._interest(end)
            self._clients[a] = None

    def _shed(self, root: bool) -> bool:
        """Make room: the oldest non-root pair goes; a root newcomer may displace the oldest."""
        victim = next((c for c in self._clients if not c.root), None)
        if victim is None and root:
            victim = next(iter(self._clients))
        if victim is None:
            return False
        self._close(victim)
        return True

    def _pump(self, src: _End) -> None:
        """Read from `src` and write to its other end; keep what does not fit."""
        dst = src.other
        try:
            n = src.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(src)
            return
        if n == 0:
            src.eof = True
            if not dst.pending:
                self._half_close(dst)
            self._interest(src)
            return
        view = memoryview(self._buffer)[:n]
        try:
            sent = dst.sock.send(view)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(src)
            return
        if sent < n:
            dst.pending = bytes(view[sent:])
            self._interest(src)
            self._interest(dst)

    def _flush(self, dst: _End) -> None:
        try:
            sent = dst.sock.send(dst.pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(dst)
            return
        dst.pending = dst.pending[sent:]
        if not dst.pending:
            if dst.other.eof:
                self._half_close(dst)
            self._interest(dst)
            self._interest(dst.other)

    def _half_close(self, dst: _End) -> None:
        """Its peer's direction has ended and all of it is written: pass the EOF on."""
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._interest(dst)

    def _interest(self, end: _End) -> None:
        """Read while the other end has nothing pending; write while this end has. A pair with
        both directions finished is closed."""
        if end.sock.fileno() < 0:
            return
        if end.eof and end.other.eof and not end.pending and not end.other.pending:
            self._close(end)
            return
        want = (0 if end.eof or end.other.pending else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if end.pending else 0
        )
        if want == end.events:
            return
        if not want:
            self._sel.unregister(end.sock)
        elif not end.events:
            self._sel.register(end.sock, want, end)
        else:
            self._sel.modify(end.sock, want, end)
        end.events = want

    def _close(self, end: _End) -> None:
        for e in (end, end.other):
            if e.events:
                self._sel.unregister(e.sock)
                e.events = 0
            e.sock.close()
            self._clients.pop(e, None)

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        if self.sock is not None:
            self.sock.close()
        if self._deny is not None:
            self._deny.stop(0).wait()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if os.path.lexists(self.public_path):
            os.unlink(self.public_path)
        shutil.rmtree(self.private_dir, ignore_errors=True)
