"""The IPAM port: what the CNI verbs need from an IP address manager, in the CNI layer's own terms.

The verbs run warm inside moor-ipamd, whose node IPAM implements this port (`ipamd/cni_port.py`):
the CNI layer declares the calls and the errors, the daemon maps its store and lease errors onto
them. So `cni_plugin` never imports the daemon, and a test can drive the verbs over any IPAM.

Every error an implementation raises is an `IpamError` carrying the CNI code of SPEC-NOTES.md; the
protocol layer's one exception table (`cni_plugin.errors.to_cni_error`) passes it on as is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cni_plugin.errors import (
    FIXED_IP_UNAVAILABLE,
    INVALID_NETWORK_CONFIG,
    POOL_EXHAUSTED,
    STALE_GENERATION,
    TRY_AGAIN_LATER,
    CNIError,
)
from cni_plugin.iptypes import IPAddress, IPInterface, IPNetwork

# A fixed IP is in no node's subnet: its pod gets it as a /32 with this link-local gateway, which
# the host end of its veth stands for (SPEC-NOTES, fixed IPs).
FIXED_GATEWAY = ipaddress.ip_address("169.254.1.1")


class IpamError(CNIError):
    """Base of the port's errors: a CNIError, so its code reaches the runtime unchanged."""

    code_of_class = TRY_AGAIN_LATER

    def __init__(self, msg: str) -> None:
        super().__init__(self.code_of_class, msg)


class AddressesExhausted(IpamError):
    """No free address in the node's subnets and no free subnet left in the cluster network."""

    code_of_class = POOL_EXHAUSTED


class RequestedAddressUnavailable(IpamError):
    """The one address the request named cannot be given (taken, or not this node's)."""

    code_of_class = INVALID_NETWORK_CONFIG


class FixedAddressUnavailable(IpamError):
    """The fixed IP cannot be this pod's: bound to another identity, held outside moor's fixed
    bindings, cooling down, outside the fixed ranges; or the pod is bound to another fixed IP."""

    code_of_class = FIXED_IP_UNAVAILABLE


class StalePodGeneration(IpamError):
    """An older incarnation of the pod asked for its fixed IP after a newer one took it over."""

    code_of_class = STALE_GENERATION


class IpamUnavailable(IpamError):
    """Transient: the store is unreachable, the node holds no subnet, or it is re-asserting."""

    code_of_class = TRY_AGAIN_LATER


@dataclass(frozen=True)
class AttachmentOwner:
    """Who asks for (and holds) an address: the CNI attachment and, when the runtime said, its
    pod. The daemon's records use this very type (`ipamd.model.Owner`): one owner, both sides.
    The handle is (network, container ID, ifname), as host-local keys it."""

    network: str
    container_id: str
    ifname: str
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""

    @property
    def handle(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)

    @property
    def attachment(self) -> tuple[str, str]:
        """The key of its attachment's lock (`cni_plugin.attachments`)."""
        return (self.container_id, self.ifname)

    @property
    def pod(self) -> str:
        """`namespace/name`; a pod without a namespace (podman) is its name alone."""
        if not self.pod_name:
            return ""
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_namespace else self.pod_name


@dataclass(frozen=True)
class AddressRequest:
    owner: AttachmentOwner
    netns: str = ""
    netns_inode: int = 0
    host_veth: str = ""  # empty in IPAM-plugin mode: the delegating plugin owns the link
    requested: IPAddress | None = None


@dataclass(frozen=True)
class AssignedAddress:
    """An address held by an attachment; `existed` when the attachment held it before the call."""

    interface: IPInterface
    gateway: IPAddress
    existed: bool = False
    fixed: bool = False  # a fixed IP: a /32 behind FIXED_GATEWAY, not on the node's bridge


class IpamPort(Protocol):
    @property
    def network(self) -> IPNetwork:
        """The cluster pod network (what masquerade leaves alone)."""
        ...

    @property
    def pod_mtu(self) -> int:
        """The MTU a pod's interface gets when the netconf sets none: the node's network knows
        its encapsulation (vxlan: the underlay's minus 50). 0: the kernel's default."""
        ...

    def allocate(self, request: AddressRequest) -> AssignedAddress: ...

    def release(self, network: str, container_id: str, ifname: str) -> None:
        """Free what the attachment holds, owner-checked; nothing held is not an error."""
        ...

    def lookup(self, network: str, container_id: str, ifname: str) -> AssignedAddress | None: ...

    def not_ready_reason(self) -> str | None:
        """Why ADD cannot be served at all right now (STATUS answers 50), or None."""
        ...

    def collect_garbage(
        self,
        network: str,
        keep: frozenset[tuple[str, str]],
        before_release: Callable[[str], object],
    ) -> list[str]:
        """Release every attachment of `network` whose (container ID, ifname) is not in `keep`,
        calling `before_release(host_veth)` first for those that have one. Returns one line per
        failure; it goes on past failures."""
        ...

    def mark_conflict(self, ip: IPAddress, mac: str, network: str) -> None:
        """Record that another host (`mac`) answered for `ip` (the ARP probe of an ADD on
        `network`): the IP is not handed out again until an operator clears the record."""
        ...
