"""moor-ipamd composed: store, subnet leases, allocator, the CNI endpoint, the gRPC API and timers.

Start order matters: the store and the node's lease come first, then the spooled DELs are replayed,
and only then do the sockets open, so no ADD can race a DEL the daemon missed while it was down.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from types import FrameType

from cni_plugin import skel
from cni_plugin.datapath.inventory import host_link_names
from cni_plugin.datapath.masq import MasqueradeRules
from cni_plugin.errors import CNIError
from cni_plugin.plugin import MoorPlugin
from cni_plugin.skel import Reply, Request
from cni_plugin.wire import WireRequest
from ipamd.allocator import NodeAllocator
from ipamd.cni_server import CniEndpoint
from ipamd.config import DaemonConfig
from ipamd.leakgc import LeakCollector
from ipamd.leases import SubnetLeaseManager
from ipamd.model import NetworkConfig
from ipamd.node import NodeIpam
from ipamd.server import GrpcServer
from ipamd.service import IpamServicer
from ipamd.spool import replay_spool
from ipamd.store.keys import Keys
from ipamd.store.open import open_store

log = logging.getLogger(__name__)
TIMER_TICK = 5.0


def fault_hook(point: str, req: Request) -> None:
    """Test-only: fail a request whose container ID is `fault-<point>-...` at that point."""
    if req.container_id.startswith(f"fault-{point}-"):
        raise CNIError(999, f"injected fault at {point}")


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        cfg = self.cfg
        self.store = open_store(cfg.store)
        keys = Keys(cfg.key_prefix)
        netcfg = NetworkConfig(ipaddress.ip_network(cfg.network), cfg.subnet_len)
        self.leases = SubnetLeaseManager(
            self.store,
            keys,
            cfg.node_name,
            netcfg,
            ttl=cfg.lease_ttl,
            state_file=os.path.join(cfg.state_dir, f"lease-{cfg.node_name}.json"),
        )
        self.leases.ensure_network_config()
        subnets = self.leases.acquire()
        log.info("node %s serves pod IPs from %s", cfg.node_name, ", ".join(map(str, subnets)))
        self.leases.start_renewal()
        allocator = NodeAllocator(
            self.store, keys, cfg.node_name, self.leases, cooldown=cfg.cooldown
        )
        allocator.load()
        self.ipam = NodeIpam(self.store, cfg.node_name, self.leases, allocator)
        self.plugin = MoorPlugin(
            self.ipam,
            MasqueradeRules(cfg.masq_chain),
            own_netns_inode=os.stat("/proc/self/ns/net").st_ino,
            fault_hook=fault_hook if cfg.enable_fault_injection else None,
        )
        self.leak_gc = LeakCollector(
            self.ipam,
            host_link_names,
            grace=cfg.leak_gc_grace,
        )
        replay_spool(cfg.spool_dir, lambda req: self.handle(req, None))
        self.endpoint = CniEndpoint(cfg.cni_socket, self.handle, workers=cfg.workers)
        self.endpoint.start()
        self.grpc = GrpcServer(cfg.grpc_socket, IpamServicer(self.ipam, cfg.cooldown))
        self.grpc.start()
        self.grpc.set_serving(self.ipam.not_ready_reason() is None)
        self._spawn("timers", self._timers)
        log.info("moor-ipamd ready: CNI on %s, gRPC on %s", cfg.cni_socket, cfg.grpc_socket)

    def handle(self, request: WireRequest, netns_fd: int | None) -> Reply:
        started = time.perf_counter()
        reply = skel.run(request.env, request.stdin, self.plugin, netns_fd, request.netns_errno)
        log.debug(
            "%s %s/%s -> %d in %.1f ms",
            request.env.get("CNI_COMMAND"),
            request.env.get("CNI_CONTAINERID", ""),
            request.env.get("CNI_IFNAME", ""),
            reply.code,
            (time.perf_counter() - started) * 1000,
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
        next_gc = time.monotonic() + self.cfg.leak_gc_interval
        while not self._stop.wait(min(TIMER_TICK, self.cfg.leak_gc_interval)):
            try:
                self.grpc.set_serving(self.ipam.not_ready_reason() is None)
                self.plugin.maintain()
                if time.monotonic() >= next_gc:
                    next_gc = time.monotonic() + self.cfg.leak_gc_interval
                    self.leak_gc.sweep()
            except Exception:
                log.exception("timer round failed")

    def stop(self) -> None:
        self._stop.set()
        for part in ("endpoint", "grpc"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        if getattr(self, "leases", None) is not None:
            self.leases.stop()
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
