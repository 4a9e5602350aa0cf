"""Domain errors of the IPAM daemon. The CNI layer maps them to CNI codes, the gRPC layer to status codes."""

from __future__ import annotations


class IpamError(Exception):
    """Base of every IPAM failure a caller may handle."""


class NetworkExhausted(IpamError):
    """No free IP in the node's subnets and no free subnet left in the cluster network."""


class NoLease(IpamError):
    """The node holds no subnet lease, so it cannot serve ADD at all."""


class StoreRecovering(NoLease):
    """The store lost data this node knows to be live; ADD waits until it is put back."""


class RequestedIPUnavailable(IpamError):
    """A specific IP was asked for and cannot be given (taken, reserved, or not this node's)."""


class ConfigMismatch(IpamError):
    """The store's network config disagrees with this daemon's flags."""


class NotFound(IpamError):
    """No such IP, handle, node or network config."""


class Refused(IpamError):
    """The operation would break something (e.g. removing the node the daemon itself runs as)."""


class Conflict(IpamError):
    """The state changed under the operation; nothing was freed. Look again and retry."""
