"""Replay of the DELs the shim spooled while the daemon was down.

The daemon replays them before it serves anything, so no ADD can race a stale DEL. A DEL that
still fails (say, its config is invalid) moves to `failed/` so it cannot block the daemon forever,
and is logged for an operator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cni_plugin.skel import Reply
from cni_plugin.wire import WireError, WireRequest, decode_request

log = logging.getLogger(__name__)


def replay_spool(spool_dir: str, run: Callable[[WireRequest], Reply]) -> tuple[int, int]:
    """Run every spooled DEL in order; returns (replayed, failed)."""
    try:
        names = sorted(n for n in os.listdir(spool_dir) if not n.startswith("."))
    except FileNotFoundError:
        return 0, 0
    done = failed = 0
    for name in names:
        path = os.path.join(spool_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            request = decode_request(data)
            reply = (
                run(request) if request.env.get("CNI_COMMAND") == "DEL" else Reply(1, b"not a DEL")
            )
        except WireError as exc:
            reply = Reply(1, str(exc).encode())
        if reply.code == 0:
            os.unlink(path)
            done += 1
            continue
        failed += 1
        os.makedirs(os.path.join(spool_dir, "failed"), mode=0o700, exist_ok=True)
        os.replace(path, os.path.join(spool_dir, "failed", name))
        log.error(
            "spooled DEL %s failed and was moved to failed/: %s",
            name,
            reply.stdout.decode(errors="replace"),
        )
    if names:
        log.info("replayed %d spooled DEL(s), %d failed", done, failed)
    return done, failed
