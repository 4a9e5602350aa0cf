"""The shim's half of the wire (cni_plugin/wire.py has the daemon's), for tests that talk to the
CNI endpoint as a raw client: what bin/moor sends, and how to read what the daemon answers."""

from __future__ import annotations

from cni_plugin.wire import MAGIC


def encode_request(env: dict[str, str], stdin: bytes) -> bytes:
    """What the shim sends (without the netns fd)."""
    fields = [MAGIC] + [f"{k}={v}".encode() for k, v in env.items()]
    return b"\0".join(fields) + b"\0\0" + stdin


def decode_reply(data: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = data.partition(b"\n")
    code, length = (int(x) for x in head.split(b" "))
    return code, body[:length], body[length:]
