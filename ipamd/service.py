"""The gRPC IPAM servicer: proto <-> model conversion and exception -> status mapping, nothing else.

The only module besides the moorctl client that touches generated `_pb2` code.
"""

from __future__ import annotations

import ipaddress

import grpc

from cni_plugin.attachments import WAIT, AttachmentLocks
from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from ipamd.grpc_status import abort
from ipamd.model import Allocation, Owner
from ipamd.node import NodeIpam


def allocation_pb(a: Allocation) -> ipam_pb2.Allocation:
    o = a.owner
    return ipam_pb2.Allocation(
        ip=str(a.interface),
        gateway=str(a.gateway),
        subnet=str(a.subnet),
        owner=ipam_pb2.Owner(
            network=o.network,
            container_id=o.container_id,
            ifname=o.ifname,
            pod_namespace=o.pod_namespace,
            pod_name=o.pod_name,
            pod_uid=o.pod_uid,
        ),
        node=a.node,
        since=a.since,
        netns=a.netns,
        host_veth=a.host_veth,
    )


class IpamServicer(ipam_pb2_grpc.IpamServicer):
    """Allocate and Release hold the attachment's lock, like the CNI verbs of the same node."""

    def __init__(
        self, ipam: NodeIpam, cooldown: float, locks: AttachmentLocks | None = None
    ) -> None:
        self.ipam = ipam
        self.cooldown = cooldown
        self.locks = locks or AttachmentLocks()

    def Allocate(
        self, request: ipam_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.AllocateResponse:
        o = request.owner
        try:
            if not (o.network and o.container_id and o.ifname):
                raise ValueError("owner.network, owner.container_id and owner.ifname are required")
            requested = (
                ipaddress.ip_interface(request.requested_ip).ip if request.requested_ip else None
            )
            with self.locks.hold((o.container_id, o.ifname), WAIT):
                alloc, existed = self.ipam.allocate(
                    Owner(
                        o.network, o.container_id, o.ifname, o.pod_namespace, o.pod_name, o.pod_uid
                    ),
                    netns=request.netns,
                    requested=requested,
                )
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            abort(context, exc)
            raise
        return ipam_pb2.AllocateResponse(allocation=allocation_pb(alloc), existed=existed)

    def Release(
        self, request: ipam_pb2.ReleaseRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.ReleaseResponse:
        h = request.handle
        try:
            with self.locks.hold((h.container_id, h.ifname), WAIT):
                alloc = self.ipam.release(h.network, h.container_id, h.ifname)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
            raise
        return ipam_pb2.ReleaseResponse(
            released=alloc is not None, ip=str(alloc.ip) if alloc else ""
        )

    def Check(
        self, request: ipam_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.CheckResponse:
        h = request.handle
        alloc = self.ipam.lookup(h.network, h.container_id, h.ifname)
        if alloc is None:
            return ipam_pb2.CheckResponse(found=False)
        return ipam_pb2.CheckResponse(found=True, allocation=allocation_pb(alloc))

    def GC(self, request: ipam_pb2.GCRequest, context: grpc.ServicerContext) -> ipam_pb2.GCResponse:
        keep = {(a.container_id, a.ifname) for a in request.valid_attachments}
        report = self.ipam.collect_garbage(request.network, keep)
        if report.failures:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"released {len(report.released)}, could not release: "
                + "; ".join(report.failures),
            )
        return ipam_pb2.GCResponse(released=[str(a.ip) for a in report.released])

    def Status(
        self, request: ipam_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.StatusResponse:
        reason = self.ipam.not_ready_reason()
        return ipam_pb2.StatusResponse(
            node=self.ipam.node,
            ready=reason is None,
            reason=reason or "",
            network=str(self.ipam.network),
            subnets=[
                ipam_pb2.SubnetStatus(
                    subnet=str(p.subnet),
                    gateway=str(p.gateway),
                    total=p.total,
                    used=p.used,
                    free=p.free,
                    cooling=p.cooling,
                )
                for p in self.ipam.pools()
            ],
            allocations=[allocation_pb(a) for a in self.ipam.allocations()],
            cooldown_seconds=self.cooldown,
            conflicts=list(guard.conflicts) if (guard := getattr(self.ipam, "guard", None)) else [],
        )
