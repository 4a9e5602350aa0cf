"""The gRPC Admin servicer: proto <-> model conversion and exception -> status mapping, nothing else.

The operations themselves are in `ipamd.ops` and, for fixed IPs, `ipamd.fixed_ops` (cluster-wide,
on the store), so they are tested without gRPC. Every error reaches moorctl as one sentence in the
status details.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import grpc

from ipamd.admin_fixed import FixedAdmin
from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from ipamd.conflicts import AddressConflict
from ipamd.fixed_ops import FixedOps
from ipamd.grpc_status import abort
from ipamd.network_config import SCHEMA_VERSION, NetworkConfig
from ipamd.ops import ClusterOps, SubnetUsage
from ipamd.service import allocation_pb
from ipamd.version import daemon_version

PAGE = 1000  # allocations per ListAllocations message: 200k records stream in bounded messages


def config_pb(c: NetworkConfig) -> ipam_pb2.NetworkConfig:
    return ipam_pb2.NetworkConfig(
        network=str(c.network),
        subnet_len=c.subnet_len,
        subnet_min=str(c.subnet_min) if c.subnet_min is not None else "",
        subnet_max=str(c.subnet_max) if c.subnet_max is not None else "",
        fixed_ranges=[str(r) for r in c.fixed_ranges],
        backend=c.backend,
        vni=c.vni,
        vxlan_port=c.vxlan_port,
        cluster_id=c.cluster_id,
    )


def config_from_pb(m: ipam_pb2.NetworkConfig) -> NetworkConfig:
    return NetworkConfig.parse(
        m.network,
        m.subnet_len,
        subnet_min=m.subnet_min,
        subnet_max=m.subnet_max,
        fixed_ranges=list(m.fixed_ranges),
        backend=m.backend,
        vni=m.vni,
        vxlan_port=m.vxlan_port,
    )


def conflict_pb(c: AddressConflict) -> ipam_pb2.AddressConflict:
    return ipam_pb2.AddressConflict(
        ip=str(c.ip), mac=c.mac, node=c.node, since=c.at, network=c.network
    )


def usage_pb(u: SubnetUsage) -> ipam_pb2.SubnetUsage:
    lease = u.lease
    return ipam_pb2.SubnetUsage(
        subnet=str(lease.subnet),
        node=lease.node,
        public_ip=lease.public_ip,
        since=lease.since,
        backend_json=json.dumps(lease.backend, separators=(",", ":")),
        route_state=u.route.state,
        route_reason=u.route.reason,
        total=u.total,
        reserved=u.reserved,
        allocated=u.allocated,
        cooling=u.cooling,
        free=u.free,
    )


class AdminServicer(FixedAdmin, ipam_pb2_grpc.AdminServicer):
    """The fixed-IP calls (Reserve, StickyAdd, ...) are FixedAdmin's (ipamd/admin_fixed.py)."""

    def __init__(self, ops: ClusterOps, fixed: FixedOps | None = None) -> None:
        self.ops = ops
        self.fixed = fixed

    def Version(
        self, request: ipam_pb2.VersionRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.VersionResponse:
        try:
            found = self.ops.schema_version()
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            abort(context, exc)
            raise
        return ipam_pb2.VersionResponse(
            daemon_version=daemon_version(),
            schema_version=found,
            schema_supported=SCHEMA_VERSION,
        )

    def NetworkShow(
        self, request: ipam_pb2.NetworkShowRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.NetworkShowResponse:
        try:
            config = self.ops.require_network()
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            abort(context, exc)
            raise
        return ipam_pb2.NetworkShowResponse(config=config_pb(config))

    def NetworkInit(
        self, request: ipam_pb2.NetworkInitRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.NetworkInitResponse:
        try:
            config = config_from_pb(request.config)
            created = self.ops.init_network(config)
            stored = self.ops.require_network()  # as written: with its cluster ID
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.NetworkInitResponse(config=config_pb(stored), created=created)

    def ListSubnets(
        self, request: ipam_pb2.ListSubnetsRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.ListSubnetsResponse:
        try:
            usage = self.ops.usage(request.node)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.ListSubnetsResponse(subnets=[usage_pb(u) for u in usage])

    def ListAllocations(
        self, request: ipam_pb2.ListAllocationsRequest, context: grpc.ServicerContext
    ) -> Iterator[ipam_pb2.ListAllocationsResponse]:
        try:
            allocs = self.ops.allocations(
                node=request.node, namespace=request.pod_namespace, pod=request.pod_name
            )
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        for start in range(0, len(allocs), PAGE):
            yield ipam_pb2.ListAllocationsResponse(
                allocations=[allocation_pb(a) for a in allocs[start : start + PAGE]]
            )

    def Release(
        self, request: ipam_pb2.AdminReleaseRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.AdminReleaseResponse:
        try:
            target = request.WhichOneof("target")
            if target == "ip":
                alloc = self.ops.release_ip(ipaddress.ip_address(request.ip))
            elif target == "handle":
                h = request.handle
                alloc = self.ops.release_handle((h.network, h.container_id, h.ifname))
            else:
                raise ValueError("give an IP or a handle to release")
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.AdminReleaseResponse(allocation=allocation_pb(alloc))

    def NodeRemove(
        self, request: ipam_pb2.NodeRemoveRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.NodeRemoveResponse:
        try:
            if not request.node:
                raise ValueError("give the name of the node to remove")
            removed = self.ops.remove_node(request.node)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.NodeRemoveResponse(
            subnets=[str(s) for s in removed.subnets],
            ips_freed=removed.ips_freed,
            released_cleared=removed.released_cleared,
        )

    def Utilization(
        self, request: ipam_pb2.UtilizationRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.UtilizationResponse:
        try:
            u = self.ops.utilization()
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.UtilizationResponse(
            config=config_pb(u.config),
            subnets=[usage_pb(s) for s in u.subnets],
            subnets_leased=u.subnets_leased,
            subnets_free=u.subnets_free,
            addresses_allocated=u.addresses_allocated,
            cooldown_seconds=self.ops.cooldown,
        )

    def ListConflicts(
        self, request: ipam_pb2.ListConflictsRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.ListConflictsResponse:
        try:
            found = self.ops.conflicts()
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.ListConflictsResponse(conflicts=[conflict_pb(c) for c in found])

    def ClearConflict(
        self, request: ipam_pb2.ClearConflictRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.ClearConflictResponse:
        try:
            cleared = self.ops.clear_conflict(ipaddress.ip_address(request.ip))
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.ClearConflictResponse(conflict=conflict_pb(cleared))
