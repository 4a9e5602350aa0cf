"""The deadline of the CNI request being served, so work deep inside a handler can honour it.

moor-ipamd answers every CNI request within `--request-deadline` of accepting its connection. The
endpoint's watchdog guarantees the answer; this module lets the work itself stop in time, so that
what the runtime is told matches what happened: ADD checks right before it commits, so an ADD
that overran rolls back instead of leaving a pod the runtime was told had failed (the watchdog may
already have answered 11).

A contextvar, because a worker thread serves one request at a time and each thread has its own
context: the daemon sets it around the handler (`until`), and code outside a request (timers, the
journal replay) sees no deadline at all. Expiries are `time.monotonic()` values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from cni_plugin.errors import TRY_AGAIN_LATER, CNIError

_expiry: ContextVar[float | None] = ContextVar("moor_cni_request_deadline", default=None)


class DeadlineExceeded(CNIError):
    """The request ran out of time: code 11, the runtime retries it later."""

    def __init__(self, what: str) -> None:
        super().__init__(
            TRY_AGAIN_LATER, f"{what}: the request deadline passed; nothing was kept, try again"
        )


@contextmanager
def until(expiry: float | None) -> Iterator[None]:
    """Run the body with `expiry` (a time.monotonic() value, or None for none) as its deadline."""
    token = _expiry.set(expiry)
    try:
        yield
    finally:
        _expiry.reset(token)


def remaining() -> float:
    """Seconds left for the current request (may be negative); infinity outside a request."""
    expiry = _expiry.get()
    return math.inf if expiry is None else expiry - time.monotonic()


def check(what: str) -> None:
    """Raise DeadlineExceeded if the current request's deadline has passed."""
    if remaining() <= 0:
        raise DeadlineExceeded(what)
