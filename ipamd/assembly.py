"""The node's IPAM put together from the store: lease manager, allocator, store guard, journal and
the store follower, in the order that keeps a restarted or recovering node from handing out an IP
a running pod holds; and what stands in for it while the store has no network config.

Nothing here starts a thread: the daemon starts the lease renewal and the follower once the
whole node is assembled, so a start that fails (and is retried) leaves nothing running.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from cni_plugin import fixed_pod, kernel_record
from cni_plugin.attachments import AttachmentLocks
from cni_plugin.datapath.inventory import host_link_aliases, host_link_names
from cni_plugin.kernel_record import AttachmentRecord
from ipamd.allocator import NodeAllocator
from ipamd.config import DaemonConfig
from ipamd.errors import NoLease
from ipamd.fixed.allocation import FixedAllocator
from ipamd.fixed.bindings import FixedBindings
from ipamd.fixed.sticky import StickyRules
from ipamd.guard import StoreGuard
from ipamd.journal import ReleaseJournal
from ipamd.leases import SubnetLeaseManager
from ipamd.metrics import Metrics
from ipamd.model import Allocation
from ipamd.network_config import NetworkConfig
from ipamd.node import GarbageReport, NodeIpam
from ipamd.node_state import NodeStateFile
from ipamd.ops import NO_NETWORK
from ipamd.pool import PoolStatus
from ipamd.routing import lease_watch as routing_watchers
from ipamd.routing.lease_watch import FixedWatcher, LeaseWatcher
from ipamd.store.base import Store
from ipamd.store.keys import Keys
from ipamd.sync import StoreFollower

log = logging.getLogger(__name__)


def state_file(state_dir: str, node: str) -> str:
    return os.path.join(state_dir, f"lease-{node}.json")


def remembered_network(state_dir: str, node: str) -> NetworkConfig | None:
    """With `--network ""` and no config in the store: the one this node last served, if it
    remembers one (the store lost it; the node writes it back)."""
    config = NodeStateFile(state_file(state_dir, node)).load().config
    if config is not None:
        log.error("no network config in the store; node %s remembers %s and restores it",
                  node, config.to_json().decode())  # fmt: skip
    return config


def kernel_records(node: str) -> Callable[[], dict[str, AttachmentRecord]]:
    """What this node's host veths record of their attachments (the alias ADD wrote): veth ->
    record. Only its own: simulated nodes may share a host's links."""
    tag = kernel_record.node_tag(node)

    def read() -> dict[str, AttachmentRecord]:
        return {
            name: record
            for name, alias in host_link_aliases().items()
            if (record := kernel_record.decode(alias)) is not None and record.node_tag == tag
        }

    return read


@dataclass
class NodeParts:
    ipam: NodeIpam
    leases: SubnetLeaseManager
    allocator: NodeAllocator
    guard: StoreGuard
    follower: StoreFollower
    revision: int  # the allocator was loaded at it: the follower watches from the next one
    fixed: FixedAllocator
    lease_watcher: LeaseWatcher  # every node's leases (loaded: it watches after its revision)
    fixed_watcher: FixedWatcher  # every fixed-IP binding (likewise)


def assemble_node(
    cfg: DaemonConfig,
    store: Store,
    keys: Keys,
    netcfg: NetworkConfig,
    *,
    metrics: Metrics,
    locks: AttachmentLocks,
    public_ip: str,
    stop: threading.Event,
) -> NodeParts:
    """Write or check the network config, lease this node's subnets, load its allocations (and
    put back those of running pods the store lost), replay its journal."""
    leases = SubnetLeaseManager(
        store,
        keys,
        cfg.node_name,
        netcfg,
        ttl=cfg.lease_ttl,
        state_file=state_file(cfg.state_dir, cfg.node_name),
        public_ip=public_ip,
    )
    leases.ensure_network_config()
    subnets = leases.acquire()
    log.info("node %s serves pod IPs from %s", cfg.node_name, ", ".join(map(str, subnets)))
    allocator = NodeAllocator(store, keys, cfg.node_name, leases, cooldown=cfg.cooldown)
    bindings = FixedBindings(store, keys, lambda: leases.config.fixed_ranges, cooldown=cfg.cooldown)
    fixed = FixedAllocator(
        bindings,
        StickyRules(store, keys),
        cfg.node_name,
        detach=fixed_pod.detach_host,
        on_move=metrics.count_fixed_move,
        on_moved_away=metrics.observe_fixed_move,
    )
    guard = StoreGuard(
        store,
        keys,
        leases,
        allocator,
        locks=locks,
        host_links=host_link_names,
        kernel_records=kernel_records(cfg.node_name),
        on_recovery=metrics.count_recovery,
        on_conflict=metrics.count_conflict,
        fixed=fixed,
    )
    leases.on_conflict = guard.conflict
    guard.probe()  # the store's identity and revision, as this daemon first sees them
    revision = store.revision()  # changes after it reach the allocator by the follower
    allocator.load()
    fixed.load()
    if guard.restore_from_kernel():  # running pods whose records the store lost meanwhile
        revision = store.revision()
        allocator.load()
        fixed.load()
    ipam = NodeIpam(
        store,
        cfg.node_name,
        leases,
        allocator,
        metrics,
        fixed=fixed,
        journal=ReleaseJournal(os.path.join(cfg.state_dir, f"releases-{cfg.node_name}.jsonl")),
        store_grace=cfg.store_grace,
        locks=locks,
        guard=guard,
    )
    ipam.replay_journal()
    follower = StoreFollower(
        store,
        keys,
        leases,
        allocator,
        guard,
        stop,
        on_event=metrics.count_watch_event,
        on_restart=metrics.count_watch_restart,
    )
    leases.on_subnets_changed = follower.subnets_changed  # its watch follows the node's subnets

    def saw_lease_event(revision: int) -> None:
        guard.saw_revision(revision)
        metrics.count_watch_event("subnet")

    lease_watcher = routing_watchers.lease_watcher(
        store,
        keys,
        cfg.node_name,
        on_own_deleted=leases.observe_deleted,
        on_revision=saw_lease_event,
        on_relist=lambda: metrics.count_watch_restart("error"),
    )
    lease_watcher.load()
    fixed_watcher = routing_watchers.fixed_watcher(
        store, keys, on_relist=lambda: metrics.count_watch_restart("error")
    )

    fixed_watcher.on_change = fixed.follow  # a fixed IP a newer pod took elsewhere leaves
    fixed_watcher.load()
    return NodeParts(
        ipam, leases, allocator, guard, follower, revision, fixed, lease_watcher, fixed_watcher
    )


class AwaitingNetwork:
    """Stands in for NodeIpam while the store holds no network config (`--network ""`).

    ADD answers 11 and STATUS 50, both saying what to do. Nothing can be allocated without a
    network, so a DEL has nothing to release.
    """

    network = ""

    def __init__(self, node: str) -> None:
        self.node = node

    def not_ready_reason(self) -> str:
        return NO_NETWORK

    def allocate(self, *args: object, **kw: object) -> NoReturn:
        raise NoLease(NO_NETWORK)

    def release(self, *args: object) -> None:
        return None

    def release_if_unchanged(self, alloc: object) -> bool:
        return False

    def lookup(self, *args: object) -> None:
        return None

    def allocations(self, network: str | None = None) -> list[Allocation]:
        return []

    def pools(self) -> list[PoolStatus]:
        return []

    def collect_garbage(self, *args: object) -> GarbageReport:
        return GarbageReport()

    def replay_journal(self) -> int:
        return 0


class IpamSwitch:
    """What the CNI plugin and the gRPC services hold when the daemon started awaiting its
    network config: AwaitingNetwork first, then the node's NodeIpam (one attribute swap)."""

    def __init__(self, target: AwaitingNetwork | NodeIpam) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)
