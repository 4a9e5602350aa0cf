"""Test-only fault injection (`--enable-fault-injection`), like the reference bridge's
debugPostIPAMError: a container ID names the point where the request fails or waits, so tests
can reach the rollback and deadline paths of a real daemon. Never enabled in production."""

from __future__ import annotations

import logging
import time

from cni_plugin.errors import CNIError
from cni_plugin.skel import Request

log = logging.getLogger(__name__)


def fault_hook(point: str, req: Request) -> None:
    """Test-only (`--enable-fault-injection`): a request whose container ID is `fault-<point>-...`
    fails with 999 at that point; `delay-<point>-<millis>-...` sleeps there (see `delay_hook`).
    The plugin's points are `after-ipam`, `after-veth` and `before-result` (ADD), `before-release`
    (DEL) and `reap` (DEL's background deletion of the host veth)."""
    if req.container_id.startswith(f"fault-{point}-"):
        raise CNIError(999, f"injected fault at {point}")
    delay_hook(point, req.container_id)


def delay_hook(point: str, container_id: str) -> None:
    """Test-only: sleep `<millis>` ms at `point` for a container ID `delay-<point>-<millis>-...`,
    to make a handler outlast its deadline or keep workers busy while the queue fills. Besides
    the plugin's points there is `handle`: in the daemon, before any work, for every verb."""
    prefix = f"delay-{point}-"
    if container_id.startswith(prefix):
        millis = container_id[len(prefix) :].partition("-")[0]
        if millis.isdigit():
            log.debug("test delay: %s sleeps %s ms at %s", container_id, millis, point)
            time.sleep(int(millis) / 1000)
