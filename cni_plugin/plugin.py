"""The CNI verbs for moor's bridge datapath and for moor as an IPAM plugin, run warm in moor-ipamd.

ADD reads like the reference bridge's cmdAdd: allocate, register the release on an undo stack,
ensure the bridge, create the veth with its peer already in the pod netns, configure it, and pop
the undo stack only on success. So a failed ADD leaves no veth, no route and no IP behind.
DEL never needs the netns: the host veth name is derived from (container ID, ifname), and deleting
it removes the pod end too. DEL answers once the IP's release is durable; the host veth goes in
the background (`reaper.py`), and the attachment stays locked until it is gone.

ADD, DEL and CHECK of one attachment are serialised by its lock (`attachments.py`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack

from cni_plugin import deadline, kernel_record
from cni_plugin.attachments import AttachmentLocks, Key
from cni_plugin.datapath import bridge as br
from cni_plugin.datapath import inventory, veth
from cni_plugin.datapath.errors import LinkExists, LinkNotFound, NetnsError, PodInterfaceExists
from cni_plugin.datapath.masq import MasqueradeRules
from cni_plugin.datapath.netns import netns_inode
from cni_plugin.errors import (
    CHECK_FAILED,
    DUPLICATE_ATTACHMENT,
    INTERFACE_EXISTS,
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    PLUGIN_NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CNIError,
)
from cni_plugin.ipam import AddressRequest, AssignedAddress, AttachmentOwner, IpamPort
from cni_plugin.kernel_record import AttachmentRecord
from cni_plugin.netconf import NetConf, ci_get
from cni_plugin.reaper import HostVethReaper
from cni_plugin.result import Interface, IPConfig, Result, Route
from cni_plugin.skel import Request

log = logging.getLogger(__name__)
DEFAULT_V4 = ipaddress.ip_network("0.0.0.0/0")
# At most this long, and never past the request's deadline, a verb waits for its attachment.
LOCK_WAIT = 5.0
# Test-only fault injection (the reference bridge has debugPostIPAMError for the same reason).
FaultHook = Callable[[str, Request], None]


def attachment(req: Request) -> Key:
    return (req.container_id, req.ifname)


class MoorPlugin:
    def __init__(
        self,
        ipam: IpamPort,
        masq: MasqueradeRules,
        *,
        own_netns_inode: int,
        node: str = "",
        locks: AttachmentLocks | None = None,
        reaper: HostVethReaper | None = None,
        lock_wait: Callable[[], float] = lambda: min(LOCK_WAIT, deadline.remaining()),
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.ipam = ipam
        self.masq = masq
        self.own_netns_inode = own_netns_inode
        self.node_tag = kernel_record.node_tag(node)  # in the host veth's alias: whose pod
        self.locks = locks or AttachmentLocks()
        self.reaper = reaper or HostVethReaper()
        self.lock_wait = lock_wait
        self.fault_hook = fault_hook
        self._bridges: dict[tuple[str, int, bool], br.LinkInfo] = {}
        self._gateways_done: set[tuple[str, int, str]] = set()
        self._masq_ok = False
        self._lock = threading.Lock()

    # ---- helpers ---------------------------------------------------------------------------
    def _fault(self, point: str, req: Request) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point, req)

    def _require_netns(self, req: Request) -> int:
        if req.netns_fd is None:
            if req.netns_errno == errno.ENOENT:
                raise CNIError(UNKNOWN_CONTAINER, f"network namespace {req.netns!r} does not exist")
            reason = os.strerror(req.netns_errno) if req.netns_errno else "not passed"
            raise CNIError(
                INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} cannot be opened: {reason}"
            )
        try:
            inode = netns_inode(req.netns_fd)
        except NetnsError as exc:  # e.g. the empty mount-point file of an unmounted netns
            raise CNIError(
                INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} is not a network namespace ({exc})"
            ) from exc
        if inode == self.own_netns_inode:
            raise CNIError(
                INVALID_ENVIRONMENT, f"CNI_NETNS {req.netns!r} is the host's own network namespace"
            )
        return req.netns_fd

    @staticmethod
    def _owner(req: Request) -> AttachmentOwner:
        a = req.args
        return AttachmentOwner(
            req.conf.name, req.container_id, req.ifname, a.pod_namespace, a.pod_name, a.pod_uid
        )

    def _allocate(self, req: Request, netns_inode: int, host_veth: str = "") -> AssignedAddress:
        """The attachment's address; a second ADD of the same attachment is code 101."""
        assigned = self.ipam.allocate(
            AddressRequest(
                self._owner(req),
                netns=req.netns,
                netns_inode=netns_inode,
                host_veth=host_veth,
                requested=self._requested_ip(req),
            )
        )
        if assigned.existed:
            raise CNIError(
                DUPLICATE_ATTACHMENT,
                f"{req.container_id}/{req.ifname} already holds {assigned.interface.ip} on "
                f"network {req.conf.name}; duplicate ADD is not allowed",
            )
        return assigned

    def _requested_ip(self, req: Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
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
            raise CNIError(
                INVALID_NETWORK_CONFIG, f"invalid requested IP {candidates[0]!r}"
            ) from exc

    def _routes(self, conf: NetConf, alloc: AssignedAddress) -> list[Route]:
        routes = list(conf.ipam.routes) if conf.ipam else []
        if (
            conf.mode == "main"
            and conf.is_default_gateway
            and not any(r.dst == DEFAULT_V4 and r.gw for r in routes)
        ):
            routes = [r for r in routes if r.dst != DEFAULT_V4] + [Route(DEFAULT_V4, alloc.gateway)]
        if conf.mode == "ipam" and not routes:
            routes = [Route(DEFAULT_V4, alloc.gateway)]
        return routes

    def _ensure_bridge(
        self, conf: NetConf, alloc: AssignedAddress | None, *, fresh: bool = False
    ) -> br.LinkInfo:
        """The bridge (and the allocation's gateway on it), from cache on the hot path.

        The cache saves a netlink request per ADD; `maintain()` re-verifies it every few seconds,
        and an ADD that finds the cached bridge gone re-ensures it (`fresh`).
        """
        key = (conf.bridge, conf.mtu, conf.promisc_mode)
        bridge = None if fresh else self._bridges.get(key)
        if bridge is None:
            bridge = br.ensure_bridge(conf.bridge, mtu=conf.mtu, promisc=conf.promisc_mode)
            with self._lock:
                self._bridges[key] = bridge
        if alloc is not None and conf.is_gateway:
            gw = ipaddress.ip_interface(f"{alloc.gateway}/{alloc.interface.network.prefixlen}")
            done = (conf.bridge, bridge.index, str(gw))
            if fresh or done not in self._gateways_done:
                br.ensure_bridge_address(conf.bridge, gw)
                br.enable_ip_forward()
                with self._lock:
                    self._gateways_done.add(done)
        return bridge

    def maintain(self) -> None:
        """Re-verify what the hot path caches: bridges, their gateways, the masquerade rules.

        A timer calls this, so someone deleting the bridge, its address or flushing nat is
        repaired within seconds, not at the next daemon restart.
        """
        with self._lock:
            bridges = dict(self._bridges)
            gateways = set(self._gateways_done)
        for (name, mtu, promisc), cached in bridges.items():
            info = br.ensure_bridge(name, mtu=mtu, promisc=promisc)
            if info != cached:
                log.warning(
                    "bridge %s was recreated outside moor (ifindex %d -> %d)",
                    name,
                    cached.index,
                    info.index,
                )
                with self._lock:
                    self._bridges[(name, mtu, promisc)] = info
            for bridge_name, index, gw in gateways:
                if bridge_name == name:
                    br.ensure_bridge_address(name, ipaddress.ip_interface(gw))
                    if index != info.index:
                        with self._lock:
                            self._gateways_done.discard((bridge_name, index, gw))
                            self._gateways_done.add((bridge_name, info.index, gw))
        if self._masq_ok and not self.masq.is_installed([self.ipam.network]):
            log.warning("masquerade rules were changed outside moor; restoring them")
            self.masq.ensure([self.ipam.network])

    # ---- ADD -------------------------------------------------------------------------------
    def add(self, req: Request) -> Result:
        with self.locks.hold(attachment(req), self.lock_wait()):
            if req.conf.mode == "ipam":
                return self._ipam_add(req)
            return self._main_add(req)

    def _main_add(self, req: Request) -> Result:
        conf = req.conf
        fd = self._require_netns(req)
        host_name = veth.host_veth_name(req.container_id, req.ifname)
        alloc: AssignedAddress | None = None
        with ExitStack() as undo:
            if conf.ipam is not None:
                alloc = self._allocate(req, netns_inode(fd), host_name)
                undo.callback(self._release_quietly, conf.name, req.container_id, req.ifname)
            bridge = self._ensure_bridge(conf, alloc)
            self._fault("after-ipam", req)
            try:
                try:
                    pair = self._create_veth(req, host_name, bridge, alloc)
                except LinkNotFound:  # the cached bridge was deleted under us: re-ensure it once
                    bridge = self._ensure_bridge(conf, alloc, fresh=True)
                    pair = self._create_veth(req, host_name, bridge, alloc)
            except PodInterfaceExists as exc:
                raise CNIError(
                    INTERFACE_EXISTS, f"interface {req.ifname!r} already exists in {req.netns}"
                ) from exc
            except LinkExists as exc:
                raise CNIError(
                    DUPLICATE_ATTACHMENT,
                    f"host veth {host_name} for {req.container_id}/{req.ifname} already exists",
                ) from exc
            undo.callback(veth.delete_host_veth_if_exists, host_name)
            self._fault("after-veth", req)
            routes = self._routes(conf, alloc) if alloc else []
            if alloc is not None:
                veth.configure_pod_interface(
                    fd,
                    req.ifname,
                    [alloc.interface],
                    [veth.Route(r.dst, r.gw or alloc.gateway) for r in routes],
                )
            else:
                veth.configure_pod_interface(fd, req.ifname, [], [])
            if conf.ip_masq and alloc is not None:
                self._ensure_masquerade()
            self._fault("before-result", req)
            deadline.check("ADD")  # an ADD that overran rolls back rather than commit
            undo.pop_all()
        return Result(
            interfaces=[
                Interface(conf.bridge, bridge.mac),
                Interface(host_name, pair.host.mac),
                Interface(req.ifname, pair.pod.mac, sandbox=req.netns),
            ],
            ips=[IPConfig(alloc.interface, alloc.gateway, interface=2)] if alloc else [],
            routes=routes,
            dns=conf.dns,
        )

    def _create_veth(
        self, req: Request, host_name: str, bridge: br.LinkInfo, alloc: AssignedAddress | None
    ) -> veth.VethPair:
        return veth.create_veth(
            host_name,
            req.ifname,
            req.netns_fd,  # type: ignore[arg-type]  # checked by _require_netns
            bridge.index,
            mtu=req.conf.mtu,
            mac=req.conf.mac or req.args.mac or None,
            hairpin=req.conf.hairpin_mode,
            alias=self._kernel_record(req, alloc),
        )

    def _kernel_record(self, req: Request, alloc: AssignedAddress | None) -> str:
        """What the host veth tells a daemon whose store lost this allocation."""
        if alloc is None:
            return ""
        record = AttachmentRecord(self.node_tag, alloc.interface, self._owner(req))
        return kernel_record.encode(record) or ""

    def _ipam_add(self, req: Request) -> Result:
        alloc = self._allocate(req, netns_inode(req.netns_fd) if req.netns_fd is not None else 0)
        return Result(
            ips=[IPConfig(alloc.interface, alloc.gateway)], routes=self._routes(req.conf, alloc)
        )

    def _ensure_masquerade(self) -> None:
        if self._masq_ok:
            return
        with self._lock:
            self.masq.ensure([self.ipam.network])
            self._masq_ok = True

    def _release_quietly(self, network: str, container_id: str, ifname: str) -> None:
        try:
            self.ipam.release(network, container_id, ifname)
        except Exception:
            log.exception("rollback: releasing %s/%s/%s failed", network, container_id, ifname)

    # ---- DEL -------------------------------------------------------------------------------
    def delete(self, req: Request) -> None:
        """Release the IP (durable when this returns), then delete the host veth in the
        background; the attachment's lock goes with it and is released when it is gone."""
        key = attachment(req)
        self.locks.acquire(key, self.lock_wait())
        host_veth = None
        try:
            if req.conf.mode == "main":
                name = veth.host_veth_name(req.container_id, req.ifname)
                host_veth = name if veth.host_veth_index(name) is not None else None
            self._fault("before-release", req)
            if req.conf.ipam is not None:
                self.ipam.release(req.conf.name, req.container_id, req.ifname)
        except BaseException:
            self.locks.release(key)
            raise
        if host_veth is None:
            self.locks.release(key)
        else:
            self.reaper.submit(
                host_veth, lambda: self.locks.release(key), lambda: self._fault("reap", req)
            )

    # ---- CHECK -----------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        with self.locks.hold(attachment(req), self.lock_wait()):
            self._check(req)

    def _check(self, req: Request) -> None:
        conf = req.conf
        prev = conf.prev_result
        if prev is None:
            raise CNIError(INVALID_NETWORK_CONFIG, "Required prevResult missing")
        alloc = None
        if conf.ipam is not None:
            alloc = self.ipam.lookup(conf.name, req.container_id, req.ifname)
            if alloc is None:
                raise CNIError(
                    CHECK_FAILED, f"no IPAM reservation for {req.container_id}/{req.ifname}"
                )
            if not any(ip.address == alloc.interface for ip in prev.ips):
                raise CNIError(CHECK_FAILED, f"reserved {alloc.interface} is not in prevResult")
        if conf.mode == "ipam":
            return
        fd = self._require_netns(req)
        pod = inventory.inspect_pod_interface(fd, req.ifname)
        if pod is None:
            raise CNIError(CHECK_FAILED, f"interface {req.ifname} is missing in {req.netns}")
        want = next((i for i in prev.interfaces if i.name == req.ifname and i.sandbox), None)
        if want is None:
            raise CNIError(CHECK_FAILED, f"prevResult has no interface {req.ifname} in a sandbox")
        if pod.kind != "veth":
            raise CNIError(CHECK_FAILED, f"{req.ifname} is a {pod.kind}, not a veth")
        if want.mac and pod.mac.lower() != want.mac.lower():
            raise CNIError(
                CHECK_FAILED, f"{req.ifname} has MAC {pod.mac}, prevResult says {want.mac}"
            )
        index = prev.interfaces.index(want)
        for ip in prev.ips:
            if ip.interface == index and ip.address not in pod.addresses:
                raise CNIError(CHECK_FAILED, f"{req.ifname} lacks address {ip.address}")
        for route in prev.routes:
            gw = route.gw or (alloc.gateway if alloc else None)
            if not any(r.dst == route.dst and (gw is None or r.gw == gw) for r in pod.routes):
                raise CNIError(
                    CHECK_FAILED, f"route to {route.dst} via {gw} is missing in {req.netns}"
                )
        host_name = veth.host_veth_name(req.container_id, req.ifname)
        host = inventory.inspect_host_veth(host_name)
        if host is None:
            raise CNIError(CHECK_FAILED, f"host veth {host_name} is missing")
        bridge = inventory.lookup_bridge(conf.bridge)
        if bridge is None:
            raise CNIError(CHECK_FAILED, f"bridge {conf.bridge} is missing")
        if host.master_index != bridge.index:
            raise CNIError(CHECK_FAILED, f"host veth {host_name} is not attached to {conf.bridge}")
        if host.peer_index != pod.index or pod.peer_index != host.index:
            raise CNIError(CHECK_FAILED, f"host veth {host_name} is not the peer of {req.ifname}")

    # ---- STATUS and GC ---------------------------------------------------------------------
    def status(self, req: Request) -> None:
        if req.conf.ipam is None:
            return
        reason = self.ipam.not_ready_reason()
        if reason is not None:
            raise CNIError(PLUGIN_NOT_AVAILABLE, reason)

    def gc(self, req: Request) -> None:
        """Release every allocation of this network not in the valid attachments (deleting its
        host veth first). No attachments key at all means the runtime told us nothing: release
        nothing (see SPEC-NOTES)."""
        if req.valid_attachments is None:
            log.warning(
                "GC for %s without cni.dev/valid-attachments: nothing released", req.conf.name
            )
            return
        if req.conf.ipam is None:
            return
        keep = frozenset((a.container_id, a.ifname) for a in req.valid_attachments)
        # A host veth is recorded only by moor's own datapath (main mode), so it is ours to
        # delete whatever mode this GC's config is in; IPAM-mode allocations have none.
        failures = self.ipam.collect_garbage(req.conf.name, keep, veth.delete_host_veth_if_exists)
        if failures:
            raise CNIError(TRY_AGAIN_LATER, "GC could not release: " + "; ".join(failures))
