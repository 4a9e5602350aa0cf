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

import ipaddress
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from cni_plugin import deadline, fixed_pod, kernel_record, request_parts
from cni_plugin.attachments import WAIT, AttachmentLocks, Key
from cni_plugin.check import check_datapath
from cni_plugin.datapath import bridge as br
from cni_plugin.datapath import veth
from cni_plugin.datapath.errors import LinkExists, LinkNotFound, PodInterfaceExists
from cni_plugin.datapath.masq import MasqueradeRules
from cni_plugin.datapath.netns import netns_inode
from cni_plugin.errors import (
    CHECK_FAILED,
    DUPLICATE_ATTACHMENT,
    INTERFACE_EXISTS,
    INVALID_NETWORK_CONFIG,
    PLUGIN_NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    CNIError,
)
from cni_plugin.ipam import AddressRequest, AssignedAddress, IpamPort
from cni_plugin.kernel_record import AttachmentRecord
from cni_plugin.node_datapath import NodeDatapath
from cni_plugin.reaper import HostVethReaper
from cni_plugin.result import Interface, IPConfig, Result, Route
from cni_plugin.skel import Request

log = logging.getLogger(__name__)
DEFAULT_V4 = ipaddress.ip_network("0.0.0.0/0")
REAP_WAIT = 1.0  # an ADD that meets a pod interface waits this long for DELs still deleting
# Test-only fault injection (the reference bridge has debugPostIPAMError for the same reason).
FaultHook = Callable[[str, Request], None]


@contextmanager
def veth_clashes(req: Request, host_name: str) -> Iterator[None]:
    """A veth whose pod end or host end is taken: 102 and 101, as the spec's tables say."""
    try:
        yield
    except PodInterfaceExists as exc:
        raise CNIError(
            INTERFACE_EXISTS, f"interface {req.ifname!r} already exists in {req.netns}"
        ) from exc
    except LinkExists as exc:
        raise CNIError(
            DUPLICATE_ATTACHMENT,
            f"host veth {host_name} for {req.container_id}/{req.ifname} already exists",
        ) from exc


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
        lock_wait: Callable[[], float] = lambda: min(WAIT, deadline.remaining()),
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.ipam = ipam
        self.host = NodeDatapath(masq)  # bridges, gateways and masquerade, cached
        self.own_netns_inode = own_netns_inode
        self.node_tag = kernel_record.node_tag(node)  # in the host veth's alias: whose pod
        self.locks = locks or AttachmentLocks()
        self.reaper = reaper or HostVethReaper()
        self.lock_wait = lock_wait
        self.fault_hook = fault_hook

    # ---- helpers ---------------------------------------------------------------------------
    def _fault(self, point: str, req: Request) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point, req)

    def _require_netns(self, req: Request) -> int:
        return request_parts.require_netns(req, self.own_netns_inode)

    def _allocate(self, req: Request, netns_inode: int, host_veth: str = "") -> AssignedAddress:
        """The attachment's address; a second ADD of the same attachment is code 101."""
        assigned = self.ipam.allocate(
            AddressRequest(
                request_parts.owner(req),
                netns=req.netns,
                netns_inode=netns_inode,
                host_veth=host_veth,
                requested=request_parts.requested_ip(req),
            )
        )
        if assigned.existed:
            raise CNIError(
                DUPLICATE_ATTACHMENT,
                f"{req.container_id}/{req.ifname} already holds {assigned.interface.ip} on "
                f"network {req.conf.name}; duplicate ADD is not allowed",
            )
        return assigned

    def maintain(self) -> None:
        """Re-verify what the hot path caches (bridges, gateways, masquerade); the timer's."""
        self.host.maintain()

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
            if alloc is not None and alloc.fixed:
                return self._fixed_add(req, fd, host_name, alloc, undo)
            gateway = (alloc.gateway, alloc.interface) if alloc is not None else None
            bridge = self.host.ensure_bridge(conf, gateway)
            self._fault("after-ipam", req)
            with veth_clashes(req, host_name):
                try:
                    pair = self._create_veth(req, host_name, bridge, alloc)
                except LinkNotFound:  # the cached bridge was deleted under us: re-ensure it once
                    bridge = self.host.ensure_bridge(conf, gateway, fresh=True)
                    pair = self._create_veth(req, host_name, bridge, alloc)
                except PodInterfaceExists:
                    # Maybe the pod end of a DEL still going in the background (the same netns
                    # reused for another container ID): wait for those deletions, then once more.
                    if not self.reaper.busy() or not self.reaper.drain(
                        min(REAP_WAIT, deadline.remaining())
                    ):
                        raise
                    pair = self._create_veth(req, host_name, bridge, alloc)
            undo.callback(veth.delete_host_veth_if_exists, host_name)
            self._fault("after-veth", req)
            routes = request_parts.routes(conf, alloc) if alloc else []
            if alloc is not None:
                veth.configure_pod_interface(
                    fd,
                    req.ifname,
                    [alloc.interface],
                    [veth.Route(r.dst, r.gw or alloc.gateway) for r in routes],
                )
            else:
                veth.configure_pod_interface(fd, req.ifname, [], [])
            if conf.arp_probe is not None and alloc is not None:
                self._probe(req, fd, alloc)  # a conflict raises 107; the undo stack rolls back
            if conf.ip_masq and alloc is not None:
                self.host.ensure_masquerade(self.ipam.network)
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

    def _fixed_add(
        self, req: Request, fd: int, host_name: str, alloc: AssignedAddress, undo: ExitStack
    ) -> Result:
        """A fixed IP: a point-to-point veth with a /32 (`fixed_pod.py`), no bridge."""
        with veth_clashes(req, host_name):
            pair = self._create_veth(req, host_name, None, alloc)
        undo.callback(veth.delete_host_veth_if_exists, host_name)
        self._fault("after-veth", req)
        fixed_pod.configure(fd, req.ifname, alloc, pair.host.mac)
        fixed_pod.attach_host(host_name, alloc.interface.ip, pair.pod.mac)
        if req.conf.ip_masq:
            self.host.ensure_masquerade(self.ipam.network)
        self._fault("before-result", req)
        deadline.check("ADD")
        undo.pop_all()
        return Result(
            interfaces=[
                Interface(host_name, pair.host.mac),
                Interface(req.ifname, pair.pod.mac, sandbox=req.netns),
            ],
            ips=[IPConfig(alloc.interface, alloc.gateway, interface=1)],
            routes=[Route(r.dst, r.gw) for r in fixed_pod.pod_routes()],
            dns=req.conf.dns,
        )

    def _create_veth(
        self,
        req: Request,
        host_name: str,
        bridge: br.LinkInfo | None,
        alloc: AssignedAddress | None,
    ) -> veth.VethPair:
        return veth.create_veth(
            host_name,
            req.ifname,
            req.netns_fd,  # type: ignore[arg-type]  # checked by _require_netns
            bridge.index if bridge is not None else None,
            mtu=req.conf.mtu or self.ipam.pod_mtu,
            mac=req.conf.mac or req.args.mac or None,
            hairpin=req.conf.hairpin_mode,
            alias=self._kernel_record(req, alloc),
        )

    def _kernel_record(self, req: Request, alloc: AssignedAddress | None) -> str:
        """What the host veth tells a daemon whose store lost this allocation."""
        if alloc is None:
            return ""
        record = AttachmentRecord(self.node_tag, alloc.interface, request_parts.owner(req))
        return kernel_record.encode(record) or ""

    def _ipam_add(self, req: Request) -> Result:
        if req.conf.arp_probe is not None:
            self._require_netns(req)  # the probe runs in it
        alloc = self._allocate(req, netns_inode(req.netns_fd) if req.netns_fd is not None else 0)
        if alloc.fixed:  # its /32 needs moor's own point-to-point datapath
            self._release_quietly(req.conf.name, req.container_id, req.ifname)
            raise CNIError(
                INVALID_NETWORK_CONFIG,
                f"{alloc.interface.ip} is a fixed IP: fixed IPs need moor as the main plugin, "
                "not as the IPAM of another plugin",
            )
        if req.conf.arp_probe is not None:
            with ExitStack() as undo:
                undo.callback(self._release_quietly, req.conf.name, req.container_id, req.ifname)
                self._probe(req, req.netns_fd, alloc)  # type: ignore[arg-type]  # checked above
                undo.pop_all()
        return Result(
            ips=[IPConfig(alloc.interface, alloc.gateway)],
            routes=request_parts.routes(req.conf, alloc),
        )

    def _probe(self, req: Request, netns_fd: int, alloc: AssignedAddress) -> None:
        """`arpProbe`: the address on the wire before ADD completes (SPEC-NOTES). Imported here,
        so a daemon whose netconfs never ask for it never loads it."""
        from cni_plugin.conflict_probe import probe_address

        assert req.conf.arp_probe is not None
        probe_address(self.ipam, req.conf.arp_probe, req.conf.name, netns_fd, req.ifname, alloc)

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
        if host_veth is not None and self.reaper.full():
            try:  # a burst of DELs: the background is behind, keep its backlog short
                self.reaper.delete_now(host_veth)
            finally:
                self.locks.release(key)
        elif host_veth is None:
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
        fixed = alloc is not None and alloc.fixed
        gateway = alloc.gateway if alloc is not None and not fixed else None  # fixed: explicit
        check_datapath(req, prev, self._require_netns(req), gateway, fixed=fixed)

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
