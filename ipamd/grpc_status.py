"""One mapping from the daemon's errors to gRPC status codes, for every servicer (Ipam, Admin).

A known error reaches the client (moorctl) as its status code and one sentence; anything else is a
bug in moor: logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from cni_plugin.attachments import AttachmentBusy
from ipamd.errors import (
    ConfigMismatch,
    Conflict,
    NetworkExhausted,
    NoLease,
    NotFound,
    Refused,
    RequestedIPUnavailable,
)
from ipamd.fixed.bindings import FixedIPUnavailable, StaleGeneration
from ipamd.store.base import StoreUnavailable

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestedIPUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (FixedIPUnavailable, grpc.StatusCode.FAILED_PRECONDITION),  # the IP is taken, not malformed
    (StaleGeneration, grpc.StatusCode.FAILED_PRECONDITION),
    (NetworkExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoLease, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (AttachmentBusy, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_of(exc: Exception) -> grpc.StatusCode | None:
    """The status a known error maps to; None for a bug."""
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


def abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """End the RPC with the status of `exc` (`context.abort` raises)."""
    code = status_of(exc)
    if code is None:
        log.error("RPC failed", exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    context.abort(code, str(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover - it always raises
