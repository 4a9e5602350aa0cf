"""The daemon's root-only unix sockets: one way to make them, one way to ask who is calling.

Both listening sockets (the CNI endpoint and the public gRPC socket) are created 0600 in a 0700
directory, replacing a stale file of a previous run, and non-blocking for a selector loop; both
check the peer's uid on accept (SO_PEERCRED), should someone loosen the file modes.
"""

from __future__ import annotations

import os
import socket
import struct


def listen_root_only(path: str, backlog: int) -> socket.socket:
    """A non-blocking listening unix socket at `path`, 0600 (the umask decides it at bind)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]
