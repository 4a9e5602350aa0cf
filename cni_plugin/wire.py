"""The daemon side of the shim's wire format (bin/moor writes it; see its docstring).

  request  = b"MOOR1\\0" + b"KEY=VALUE\\0"... + b"\\0" + stdin      (+ the netns fd by SCM_RIGHTS)
  response = b"<exit code> <stdout length>\\n" + stdout + stderr

The same request bytes, without the fd, are what the shim spools for a DEL the daemon missed.

MAX_REQUEST bounds the whole request (header and stdin): the daemon answers code 7 past it, and the
shim, which cannot import this module (it imports interpreter built-ins only), keeps its own copy
of the number and refuses such a config before connecting; tests/test_shim.py checks the two are
equal. 4 MiB is far above any real network config (a few KiB, a big prevResult tens of KiB).
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"MOOR1"
MAX_REQUEST = 4 << 20  # bytes; bin/moor's MAX_REQUEST must be the same number
NETNS_ERRNO_KEY = "MOOR_NETNS_ERRNO"


class WireError(ValueError):
    """A request that is not in the shim's format."""


@dataclass
class WireRequest:
    env: dict[str, str]
    stdin: bytes
    netns_errno: int = 0


def decode_request(data: bytes) -> WireRequest:
    head, sep, stdin = data.partition(b"\0\0")
    if not sep:
        raise WireError("request has no end-of-environment marker")
    fields = head.split(b"\0")
    if fields[0] != MAGIC:
        raise WireError("request does not start with the moor wire magic")
    env: dict[str, str] = {}
    netns_errno = 0
    for item in fields[1:]:
        key, eq, value = item.decode("utf-8", "surrogateescape").partition("=")
        if not eq:
            raise WireError(f"malformed environment entry {item!r}")
        if key == NETNS_ERRNO_KEY:
            # ASCII digits only ("²".isdigit() is true, int() refuses it), and at most 4 of
            # them: an errno is below 4096, and os.strerror() overflows on a huge number.
            netns_errno = (
                int(value) if value.isascii() and value.isdigit() and len(value) <= 4 else 0
            )
        elif key.startswith("CNI_"):
            env[key] = value
    return WireRequest(env, stdin, netns_errno)


def encode_reply(code: int, stdout: bytes, stderr: bytes = b"") -> bytes:
    return b"%d %d\n" % (code, len(stdout)) + stdout + stderr
