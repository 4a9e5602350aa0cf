"""The fixed-IP RPCs of the Admin service: proto <-> model, the actor, errors -> status.

Mixed into `AdminServicer` (ipamd/admin.py); the operations are `ipamd.fixed_ops.FixedOps`.

The actor is the `moor-actor` metadata moorctl sends (`user@host`) and the peer uid. grpc-python
cannot tell who is on the other end of a unix socket, but the gRPC gate (ipamd/grpc_gate.py)
relays only connections whose SO_PEERCRED uid is 0, and the servicers listen on a socket in a
root-only directory: every call that reaches this code is uid 0's, so that is what is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ipamd.api.v1 import ipam_pb2
from ipamd.fixed.model import FixedBinding
from ipamd.fixed.sticky import StickyRule
from ipamd.fixed_ops import Actor, FixedOps
from ipamd.grpc_status import abort

ACTOR_KEY = "moor-actor"
RELAYED_UID = 0  # the only peer uid grpc_gate relays to the servicers
PAGE = 1000  # bindings per ListFixed message


def actor_of(context: grpc.ServicerContext) -> Actor:
    sent = next((v for k, v in context.invocation_metadata() or () if k == ACTOR_KEY), "")
    return Actor.claimed(sent if isinstance(sent, str) else "", RELAYED_UID)


def binding_pb(b: FixedBinding) -> ipam_pb2.FixedBinding:
    gen = b.generation
    handle = (
        ipam_pb2.Handle(network=b.handle[0], container_id=b.handle[1], ifname=b.handle[2])
        if b.handle
        else None
    )
    return ipam_pb2.FixedBinding(
        ip=str(b.ip),
        pod=b.identity.text,
        pod_namespace=b.identity.namespace,
        pod_name=b.identity.name,
        state=b.state,
        source=b.source,
        node=b.node,
        pod_uid=gen.uid if gen else "",
        container_id=gen.container_id if gen else "",
        handle=handle,
        host_veth=b.host_veth,
        since=b.since if b.held else 0.0,
        released_at=b.released_at,
        retain_seconds=b.retain,
        retained_until=b.retained_until(),
        reserved_by=b.reserved_by,
        reserved_at=b.reserved_at,
    )


def rule_pb(r: StickyRule) -> ipam_pb2.StickyRule:
    return ipam_pb2.StickyRule(
        name=r.name,
        namespace=r.namespace,
        pod_regex=r.pod_regex,
        retain_seconds=r.retain,
        created_by=r.created_by,
        created_at=r.created_at,
    )


class FixedAdmin:
    """Reserve, Unreserve, ListFixed, StickyAdd, StickyList, StickyRemove."""

    fixed: FixedOps | None

    def _ops(self, context: grpc.ServicerContext) -> FixedOps:
        if self.fixed is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this daemon serves no fixed-IP calls")
        assert self.fixed is not None
        return self.fixed

    def Reserve(
        self, request: ipam_pb2.ReserveRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.ReserveResponse:
        ops = self._ops(context)
        try:
            binding = ops.reserve(request.pod, request.ip, actor_of(context))
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            abort(context, exc)
        return ipam_pb2.ReserveResponse(binding=binding_pb(binding))

    def Unreserve(
        self, request: ipam_pb2.UnreserveRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.UnreserveResponse:
        ops = self._ops(context)
        try:
            done = ops.unreserve(actor_of(context), ip=request.ip, pod=request.pod)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
        return ipam_pb2.UnreserveResponse(
            binding=binding_pb(done.binding), cooldown_seconds=done.cooldown
        )

    def ListFixed(
        self, request: ipam_pb2.ListFixedRequest, context: grpc.ServicerContext
    ) -> Iterator[ipam_pb2.ListFixedResponse]:
        ops = self._ops(context)
        try:
            found = ops.list(
                node=request.node,
                namespace=request.pod_namespace,
                pod=request.pod_name,
                source=request.source,
                state=request.state,
            )
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
        for start in range(0, len(found), PAGE):
            yield ipam_pb2.ListFixedResponse(
                bindings=[binding_pb(b) for b in found[start : start + PAGE]]
            )

    def StickyAdd(
        self, request: ipam_pb2.StickyAddRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.StickyAddResponse:
        ops = self._ops(context)
        try:
            added = ops.sticky_add(
                request.namespace, request.pod_regex, request.retain_seconds, actor_of(context)
            )
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
        return ipam_pb2.StickyAddResponse(rule=rule_pb(added.rule), created=added.created)

    def StickyList(
        self, request: ipam_pb2.StickyListRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.StickyListResponse:
        ops = self._ops(context)
        try:
            rules = ops.sticky_list()
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
        return ipam_pb2.StickyListResponse(rules=[rule_pb(r) for r in rules])

    def StickyRemove(
        self, request: ipam_pb2.StickyRemoveRequest, context: grpc.ServicerContext
    ) -> ipam_pb2.StickyRemoveResponse:
        ops = self._ops(context)
        try:
            rule = ops.sticky_remove(request.name, actor_of(context))
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)
        return ipam_pb2.StickyRemoveResponse(rule=rule_pb(rule) if rule else None)
