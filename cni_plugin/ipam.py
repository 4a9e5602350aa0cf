"""Maps IPAM failures onto CNI error codes, in one place.

The CNI handlers call the node's IPAM in-process (they run inside moor-ipamd); whatever it raises
crosses this boundary as a CNIError with the code documented in SPEC-NOTES.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cni_plugin.errors import (
    INVALID_NETWORK_CONFIG,
    POOL_EXHAUSTED,
    TRY_AGAIN_LATER,
    CNIError,
)
from ipamd.errors import NetworkExhausted, NoLease, RequestedIPUnavailable
from ipamd.store.base import StoreUnavailable


@contextmanager
def ipam_errors() -> Iterator[None]:
    try:
        yield
    except NetworkExhausted as exc:
        raise CNIError(POOL_EXHAUSTED, f"no IP addresses available: {exc}") from exc
    except RequestedIPUnavailable as exc:
        raise CNIError(
            INVALID_NETWORK_CONFIG, f"failed to allocate all requested IPs: {exc}"
        ) from exc
    except NoLease as exc:
        raise CNIError(TRY_AGAIN_LATER, str(exc)) from exc
    except StoreUnavailable as exc:
        raise CNIError(TRY_AGAIN_LATER, f"IPAM store is unreachable: {exc}") from exc
