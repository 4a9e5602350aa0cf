"""NodeIpam: the node's IPAM as one object, for the in-process CNI handlers and the gRPC service.

It composes the store, the subnet leases and the allocator, and answers the one question STATUS
asks: can this node serve ADD right now?
"""

from __future__ import annotations

from ipamd.allocator import NodeAllocator, PoolStatus
from ipamd.leases import SubnetLeaseManager
from ipamd.model import Allocation, IPAddress, IPNetwork, Owner
from ipamd.store.base import Store, StoreError


class NodeIpam:
    def __init__(
        self, store: Store, node: str, leases: SubnetLeaseManager, allocator: NodeAllocator
    ) -> None:
        self.store = store
        self.node = node
        self.leases = leases
        self.allocator = allocator

    @property
    def network(self) -> IPNetwork:
        return self.leases.config.network

    def allocate(
        self,
        owner: Owner,
        *,
        netns: str = "",
        netns_inode: int = 0,
        host_veth: str = "",
        requested: IPAddress | None = None,
    ) -> tuple[Allocation, bool]:
        return self.allocator.allocate(
            owner, netns=netns, netns_inode=netns_inode, host_veth=host_veth, requested=requested
        )

    def release(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        return self.allocator.release(network, container_id, ifname)

    def release_if_unchanged(self, alloc: Allocation) -> bool:
        """Release `alloc` only if the store still holds exactly it (GC re-validation)."""
        if self.allocator.stored(alloc) is None:
            return False
        return self.allocator.release(*alloc.owner.handle) is not None

    def lookup(self, network: str, container_id: str, ifname: str) -> Allocation | None:
        return self.allocator.get(network, container_id, ifname)

    def allocations(self, network: str | None = None) -> list[Allocation]:
        return self.allocator.allocations(network)

    def pools(self) -> list[PoolStatus]:
        return self.allocator.status()

    def not_ready_reason(self) -> str | None:
        """Why ADD cannot be served at all, or None. A full subnet is NOT a reason (see SPEC-NOTES)."""
        try:
            self.store.ping()
        except StoreError as exc:
            return f"IPAM store is unreachable: {exc}"
        if not self.leases.has_lease():
            return f"node {self.node} holds no subnet lease"
        return None
