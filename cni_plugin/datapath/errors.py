"""Domain exceptions of the datapath.

Callers (the CNI ADD/DEL/CHECK handlers) must be able to react to "already exists" or "not found"
without knowing about netlink or errno, so every module here raises these instead of pyroute2's
NetlinkError or a bare OSError.
"""

from __future__ import annotations


class DatapathError(Exception):
    """Base class. `errno` is the kernel's error code when one caused it, else None."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NetnsError(DatapathError):
    """The fd is closed, not a namespace, or not a *network* namespace."""


class LinkExists(DatapathError):
    """A link with the requested name already exists (in the daemon's netns)."""


class PodInterfaceExists(DatapathError):
    """The requested interface name is already taken inside the pod's netns.

    Deliberately not a LinkExists subclass: a caller that handles a stale host veth of its own
    (LinkExists) must not mistake a clash inside the pod for it.
    """


class LinkNotFound(DatapathError):
    """The named/indexed link does not exist."""


class AddressExists(DatapathError):
    """The address (or one that conflicts with it) is already configured."""


class InvalidSetting(DatapathError):
    """The kernel refused a setting the request chose: the veth's MTU or MAC (from the config or
    CNI_ARGS, with the netns fd and the bridge ruled out as the cause) or a route of the config
    (e.g. via a gateway the pod cannot reach). The request was invalid, not the datapath."""


class NotPermitted(DatapathError):
    """EPERM/EACCES: the daemon lacks CAP_NET_ADMIN (or a LSM said no)."""


class IptablesError(DatapathError):
    """An iptables/ip6tables invocation failed for a reason other than "no such chain"."""

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{message}: exit {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr
