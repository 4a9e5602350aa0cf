"""The CNI layer's IPAM port (`cni_plugin.ipam.IpamPort`), implemented over the node's IPAM.

One job: translate. Requests and results between the port's dataclasses and the daemon's model,
and the daemon's errors (store unreachable, no lease, network exhausted, requested IP taken) into
the port's, so the CNI verbs see one vocabulary whatever the store behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from cni_plugin.ipam import (
    FIXED_GATEWAY,
    AddressesExhausted,
    AddressRequest,
    AssignedAddress,
    FixedAddressUnavailable,
    IpamUnavailable,
    RequestedAddressUnavailable,
    StalePodGeneration,
)
from ipamd.errors import NetworkExhausted, NoLease, RequestedIPUnavailable
from ipamd.fixed.allocation import FixedRangesExhausted
from ipamd.fixed.bindings import FixedIPUnavailable, StaleGeneration
from ipamd.model import Allocation, IPAddress, IPNetwork
from ipamd.store.base import StoreUnavailable

if TYPE_CHECKING:
    from ipamd.node import NodeIpam


@contextmanager
def port_errors() -> Iterator[None]:
    try:
        yield
    except NetworkExhausted as exc:
        raise AddressesExhausted(f"no IP addresses available: {exc}") from exc
    except FixedRangesExhausted as exc:
        raise AddressesExhausted(str(exc)) from exc
    except FixedIPUnavailable as exc:
        raise FixedAddressUnavailable(f"fixed IP unavailable: {exc}") from exc
    except StaleGeneration as exc:
        raise StalePodGeneration(str(exc)) from exc
    except RequestedIPUnavailable as exc:
        raise RequestedAddressUnavailable(f"failed to allocate all requested IPs: {exc}") from exc
    except NoLease as exc:
        raise IpamUnavailable(str(exc)) from exc
    except StoreUnavailable as exc:
        raise IpamUnavailable(f"IPAM store is unreachable: {exc}") from exc


def assigned(alloc: Allocation, existed: bool = False) -> AssignedAddress:
    if alloc.subnet.num_addresses == 1:  # a fixed IP: a /32 of its own
        return AssignedAddress(alloc.interface, FIXED_GATEWAY, existed, fixed=True)
    return AssignedAddress(alloc.interface, alloc.gateway, existed)


class NodeIpamPort:
    """What MoorPlugin holds. `ipam` may be swapped (the daemon adopts its network config late)."""

    def __init__(self, ipam: NodeIpam, pod_mtu: Callable[[], int] = lambda: 0) -> None:
        self.ipam = ipam
        self._pod_mtu = pod_mtu  # the routing backend's, once the node routes

    @property
    def network(self) -> IPNetwork:
        return self.ipam.network

    @property
    def pod_mtu(self) -> int:
        return self._pod_mtu()

    def allocate(self, request: AddressRequest) -> AssignedAddress:
        with port_errors():
            alloc, existed = self.ipam.allocate(
                request.owner,
                netns=request.netns,
                netns_inode=request.netns_inode,
                host_veth=request.host_veth,
                requested=request.requested,
            )
        return assigned(alloc, existed)

    def release(self, network: str, container_id: str, ifname: str) -> None:
        with port_errors():
            self.ipam.release(network, container_id, ifname)

    def lookup(self, network: str, container_id: str, ifname: str) -> AssignedAddress | None:
        alloc = self.ipam.lookup(network, container_id, ifname)
        return assigned(alloc, True) if alloc is not None else None

    def not_ready_reason(self) -> str | None:
        return self.ipam.not_ready_reason()

    def collect_garbage(
        self,
        network: str,
        keep: frozenset[tuple[str, str]],
        before_release: Callable[[str], object],
    ) -> list[str]:
        with port_errors():
            return self.ipam.collect_garbage(network, keep, before_release).failures

    def mark_conflict(self, ip: IPAddress, mac: str, network: str) -> None:
        with port_errors():
            self.ipam.mark_conflict(ip, mac, network)
