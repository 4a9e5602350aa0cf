"""What a CNI request asks for, read once: its netns (checked), the owner it allocates for, the
one IP it may request, and the pod routes its config implies. Pure functions of the request, so
the verbs in plugin.py read as the flow they are.
"""

from __future__ import annotations

import errno
import ipaddress
import os

from cni_plugin.datapath.errors import NetnsError
from cni_plugin.datapath.netns import netns_inode
from cni_plugin.errors import (
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    UNKNOWN_CONTAINER,
    CNIError,
)
from cni_plugin.ipam import AssignedAddress, AttachmentOwner
from cni_plugin.iptypes import IPAddress
from cni_plugin.netconf import NetConf, ci_get
from cni_plugin.result import Route
from cni_plugin.skel import Request

DEFAULT_V4 = ipaddress.ip_network("0.0.0.0/0")


def require_netns(req: Request, own_netns_inode: int) -> int:
    """The pod netns fd: 3 when it does not exist, 4 when it is unusable or the host's own."""
    if req.netns_fd is None:
        if req.netns_errno == errno.ENOENT:
            raise CNIError(UNKNOWN_CONTAINER, f"network namespace {req.netns!r} does not exist")
        reason = os.strerror(req.netns_errno) if req.netns_errno else "not passed"
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} cannot be opened: {reason}")
    try:
        inode = netns_inode(req.netns_fd)
    except NetnsError as exc:  # e.g. the empty mount-point file of an unmounted netns
        raise CNIError(
            INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} is not a network namespace ({exc})"
        ) from exc
    if inode == own_netns_inode:
        raise CNIError(
            INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} is the host's own network namespace"
        )
    return req.netns_fd


def owner(req: Request) -> AttachmentOwner:
    a = req.args
    return AttachmentOwner(
        req.conf.name, req.container_id, req.ifname, a.pod_namespace, a.pod_name, a.pod_uid
    )


def requested_ip(req: Request) -> IPAddress | None:
    """runtimeConfig.ips > args.cni.ips > CNI_ARGS IP= (the CONVENTIONS precedence); one IP."""
    raw = req.conf.raw
    candidates = ci_get(raw.get("runtimeConfig"), "ips") or ci_get(
        ci_get(raw.get("args"), "cni"), "ips"
    )
    if not candidates and req.args.ip:
        candidates = [req.args.ip]
    if not candidates:
        return None
    if not isinstance(candidates, list) or len(candidates) != 1:
        raise CNIError(
            INVALID_NETWORK_CONFIG, f"moor takes exactly one requested IP, got {candidates!r}"
        )
    try:
        return ipaddress.ip_interface(str(candidates[0])).ip
    except ValueError as exc:
        raise CNIError(INVALID_NETWORK_CONFIG, f"invalid requested IP {candidates[0]!r}") from exc


def routes(conf: NetConf, alloc: AssignedAddress) -> list[Route]:
    """The config's routes, plus the default route via the gateway where the config implies it."""
    out = list(conf.ipam.routes) if conf.ipam else []
    if (
        conf.mode == "main"
        and conf.is_default_gateway
        and not any(r.dst == DEFAULT_V4 and r.gw for r in out)
    ):
        out = [r for r in out if r.dst != DEFAULT_V4] + [Route(DEFAULT_V4, alloc.gateway)]
    if conf.mode == "ipam" and not out:
        out = [Route(DEFAULT_V4, alloc.gateway)]
    return out
