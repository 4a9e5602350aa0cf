"""moor-ipamd composed: the store, the node's IPAM (`assembly.py`), the CNI endpoint, the gRPC API
and the timers.

Start order matters: the store and the node's IPAM come first (its lease, its allocations, those
the store lost put back); then the CNI socket listens (callers connect and wait from then on, so
none spools a DEL any more), the spooled DELs are replayed, and only then is anything served, so
no ADD can race a DEL the daemon missed while it was down, and no DEL spooled during the start is
left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from cni_plugin import deadline, skel
from cni_plugin.attachments import AttachmentLocks
from cni_plugin.datapath import routes
from cni_plugin.datapath.inventory import host_link_names
from cni_plugin.datapath.masq import MasqueradeRules
from cni_plugin.plugin import MoorPlugin
from cni_plugin.reaper import HostVethReaper
from cni_plugin.skel import Reply
from cni_plugin.wire import WireRequest
from ipamd.admin import AdminServicer
from ipamd.assembly import AwaitingNetwork, IpamSwitch, assemble_node, remembered_network
from ipamd.cni_port import NodeIpamPort
from ipamd.cni_server import CniEndpoint
from ipamd.config import DaemonConfig
from ipamd.conflist import ConflistInstaller
from ipamd.faults import delay_hook, fault_hook
from ipamd.fixed_ops import FixedOps
from ipamd.grpc_gate import GrpcGate
from ipamd.leakgc import LeakCollector
from ipamd.metrics import Metrics
from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.ops import NO_NETWORK, ClusterOps
from ipamd.routing.node_routing import NodeRouting
from ipamd.routing.peers import RouteState
from ipamd.server import GrpcServer
from ipamd.service import IpamServicer
from ipamd.spool import replay_spool
from ipamd.store.base import request_deadline
from ipamd.store.keys import Keys
from ipamd.store.open import open_store

log = logging.getLogger(__name__)
TIMER_TICK = 5.0
AWAIT_TICK = 1.0  # how often a daemon without a network config looks for one
JOURNAL_RETRY = 1.0


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        cfg = self.cfg
        self.conflist = (
            ConflistInstaller(cfg.cni_conflist, cfg.cni_conflist_source)
            if cfg.cni_conflist
            else None
        )
        self.metrics = Metrics()
        self.metrics.track_spool(cfg.spool_dir)
        if cfg.metrics_addr:
            self.metrics.serve(cfg.metrics_addr)  # first: a taken port fails before any lease
        self.store = self.metrics.count_store_errors(open_store(cfg.store, **cfg.store_options()))
        self.keys = Keys(cfg.key_prefix)
        self.public_ip = cfg.public_ip or (routes.interface_ipv4(cfg.iface) if cfg.iface else "")
        self.ops = ClusterOps(
            self.store,
            self.keys,
            node=cfg.node_name,
            cooldown=cfg.cooldown,
            local=lambda: getattr(self, "allocator", None),
            route_states=self._route_states,
        )
        self.fixed = FixedOps(self.store, self.keys, network=self.ops.network,
                              node=cfg.node_name, cooldown=cfg.cooldown)  # fmt: skip
        self.metrics.track_fixed(self.fixed.bindings.all)
        self.locks = AttachmentLocks()  # one per daemon: CNI verbs, gRPC, replays, GC
        self.ipam = self._initial_ipam()
        self.reaper = HostVethReaper()
        self.plugin = MoorPlugin(
            NodeIpamPort(self.ipam, self._pod_mtu),  # type: ignore[arg-type]  # IpamSwitch stands in
            MasqueradeRules(cfg.masq_chain),
            own_netns_inode=os.stat("/proc/self/ns/net").st_ino,
            node=cfg.node_name,
            locks=self.locks,
            reaper=self.reaper,
            fault_hook=fault_hook if cfg.enable_fault_injection else None,
        )
        self.leak_gc = LeakCollector(
            self.ipam,
            host_link_names,
            grace=cfg.leak_gc_grace,
        )
        self.endpoint = CniEndpoint(
            cfg.cni_socket, self.handle, workers=cfg.workers, deadline=cfg.request_deadline
        )
        self.endpoint.listen()  # callers wait from here: nothing is spooled after the listing
        replay_spool(cfg.spool_dir, lambda req: self.handle(req, None))
        self.endpoint.start()
        self.gate = GrpcGate(cfg.grpc_socket)  # the public socket, uid-checked, relayed
        self.grpc = GrpcServer(
            self.gate.private_path,
            IpamServicer(self.ipam, cfg.cooldown, self.locks),  # type: ignore[arg-type]
            AdminServicer(self.ops, self.fixed),
        )
        self.grpc.start()
        self.gate.start()
        self._update_health()
        self._spawn("timers", self._timers)
        self._spawn("release-journal", self._replay_journal)
        log.info("moor-ipamd ready: CNI on %s, gRPC on %s", cfg.cni_socket, cfg.grpc_socket)

    def _initial_ipam(self) -> NodeIpam | IpamSwitch:
        """The node's IPAM; or, with `--network ""` and no config in the store yet, a stand-in
        answering "not ready" until `moorctl network init` writes one (the timers adopt it)."""
        netcfg = (
            self.cfg.network_config()
            or self.ops.network()
            or remembered_network(self.cfg.state_dir, self.cfg.node_name)
        )
        if netcfg is not None:
            return self._node_ipam(netcfg)
        log.warning("%s; waiting for it", NO_NETWORK)
        return IpamSwitch(AwaitingNetwork(self.cfg.node_name))

    def _node_ipam(self, netcfg: NetworkConfig) -> NodeIpam:
        """The node's IPAM, assembled; only then the lease renewal and the store follower start,
        so a failed start (retried while awaiting the network) leaves no thread behind."""
        node = assemble_node(
            self.cfg,
            self.store,
            self.keys,
            netcfg,
            metrics=self.metrics,
            locks=self.locks,
            public_ip=self.public_ip,
            stop=self._stop,
        )
        self.leases, self.allocator, self.guard = node.leases, node.allocator, node.guard
        node.leases.start_renewal()
        self._spawn("store-follower", lambda: node.follower.run(node.revision + 1))
        self.routing = NodeRouting.build(
            node.leases,
            self.public_ip,
            interval=self.cfg.reconcile_interval,
            metrics=self.metrics,
            local_fixed=lambda: {a.ip: a.host_veth for a in node.fixed.allocations()},
        )
        if self.routing is not None:  # routes to the other nodes are in place before ready
            self.routing.start(node.lease_watcher, node.fixed_watcher, self._stop, self._spawn)
        for name, watcher in (
            ("lease-watch", node.lease_watcher),
            ("fixed-watch", node.fixed_watcher),
        ):
            self._spawn(name, lambda w=watcher: w.run(w.revision, self._stop))
        self.metrics.track(node.ipam)
        return node.ipam

    def _route_states(self) -> dict[IPNetwork, RouteState]:
        routing = getattr(self, "routing", None)
        return routing.states() if routing is not None else {}

    def _pod_mtu(self) -> int:
        routing = getattr(self, "routing", None)
        return routing.pod_mtu if routing is not None else 0

    @property
    def awaiting_network(self) -> bool:
        return isinstance(self.ipam, IpamSwitch) and isinstance(self.ipam.target, AwaitingNetwork)

    def _adopt_network(self) -> None:
        """While awaiting: once the store holds a network config, lease a subnet and serve."""
        netcfg = self.ops.network()
        if netcfg is not None:
            assert isinstance(self.ipam, IpamSwitch)
            self.ipam.target = self._node_ipam(netcfg)
            log.info("network config found: node %s is ready", self.cfg.node_name)

    def handle(
        self, request: WireRequest, netns_fd: int | None, expiry: float | None = None
    ) -> Reply:
        """Serve one CNI request by `expiry` (time.monotonic(); default: the deadline from now).

        The deadline is set for the plugin (cni_plugin.deadline) and for the store calls it makes
        (ipamd.store.base.request_deadline), so the work itself stops in time.
        """
        started = time.perf_counter()
        if expiry is None:
            expiry = time.monotonic() + self.cfg.request_deadline
        if self.cfg.enable_fault_injection:
            delay_hook("handle", request.env.get("CNI_CONTAINERID", ""))
        with deadline.until(expiry), request_deadline(expiry):
            reply = skel.run(request.env, request.stdin, self.plugin, netns_fd, request.netns_errno)
        log.debug(
            "%s %s/%s -> %d in %.1f ms",
            request.env.get("CNI_COMMAND"),
            request.env.get("CNI_CONTAINERID", ""),
            request.env.get("CNI_IFNAME", ""),
            reply.code,
            (time.perf_counter() - started) * 1000,
        )
        self.metrics.observe_cni(
            request.env.get("CNI_COMMAND", ""), reply, time.perf_counter() - started
        )
        if reply.code != 0:
            log.info(
                "%s failed: %s",
                request.env.get("CNI_COMMAND"),
                reply.stdout.decode(errors="replace").strip(),
            )
        if reply.stderr:
            log.error("%s", reply.stderr.decode(errors="replace"))
        return reply

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _timers(self) -> None:
        """Every tick, each task on its own: one that fails (a datapath repair, say) is logged
        and never keeps the others (the leak GC) from running."""
        next_gc = time.monotonic() + self.cfg.leak_gc_interval
        while not self._stop.wait(
            AWAIT_TICK if self.awaiting_network else min(TIMER_TICK, self.cfg.leak_gc_interval)
        ):
            if self.awaiting_network:
                self._task("adopting the network config", self._adopt_network)
            self._task("updating health", self._update_health)
            if getattr(self, "guard", None) is not None:
                self._task("checking the store", self.guard.check)
            self._task("repairing the datapath", self.plugin.maintain)
            if time.monotonic() >= next_gc:
                next_gc = time.monotonic() + self.cfg.leak_gc_interval
                self._task("leak GC", self.leak_gc.sweep)
                if (fixed := getattr(self, "fixed", None)) is not None:
                    self._task("ending fixed-IP retentions", fixed.expire_retained)

    def _update_health(self) -> None:
        """Health follows readiness; the first time the node is ready (and whenever the file
        went missing since) the CNI conflist is installed (`conflist.py`)."""
        ready = self.ipam.not_ready_reason() is None
        self.grpc.set_serving(ready)
        if ready and self.conflist is not None:
            self.conflist.ensure()

    @staticmethod
    def _task(what: str, task: Callable[[], object]) -> None:
        try:
            task()
        except Exception:
            log.exception("%s failed; trying again at the next tick", what)

    def _replay_journal(self) -> None:
        """Apply DELs journaled while the store was away, soon after it returns."""
        while not self._stop.wait(JOURNAL_RETRY):
            try:
                self.ipam.replay_journal()  # nothing pending: nothing to do
            except Exception:
                log.exception("replaying the release journal failed")

    def stop(self) -> None:
        """SIGTERM: no new CNI request; those already read finish (each within its deadline);
        releases journaled while the store was away are applied if it answers now; the node's
        routes, veths and rules stay for the next daemon."""
        self._stop.set()
        for part in ("endpoint", "gate", "grpc", "reaper", "metrics"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        if getattr(self, "ipam", None) is not None:
            self._task("applying the release journal", self.ipam.replay_journal)
        conflist = getattr(self, "conflist", None)
        if conflist is not None and self.cfg.remove_conflist_on_exit:
            conflist.remove()
        if getattr(self, "leases", None) is not None:
            self.leases.stop()
        if getattr(self, "routing", None) is not None:
            self.routing.stop()
        if getattr(self, "store", None) is not None:
            self.store.close()

    def run_forever(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: shutting down", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._stop.wait()
        self.stop()
