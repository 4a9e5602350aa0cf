"""What a node remembers locally, in `<state-dir>/lease-<node>.json`: its subnets, and the cluster
it belongs to (the network config, with its cluster ID).

The store is the truth, but a store can lose data or be replaced: an etcd restored from a backup,
a wiped data dir, another cluster behind the same address. The file lets the daemon tell, also
across a restart: the store's config missing, or naming another cluster, means the store lost
what this node knows; the remembered config and subnets are what it puts back first. Written
atomically (temp file + rename) whenever one of them changes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ipamd.model import IPNetwork
from ipamd.network_config import NetworkConfig

log = logging.getLogger(__name__)


@dataclass
class NodeState:
    node: str = ""
    subnets: list[IPNetwork] = field(default_factory=list)
    config: NetworkConfig | None = None

    @property
    def cluster_id(self) -> str:
        return self.config.cluster_id if self.config is not None else ""


class NodeStateFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> NodeState:
        """The remembered state; an empty one when the file is missing or unreadable (logged)."""
        if not self.path:
            return NodeState()
        try:
            with open(self.path) as f:
                data: dict[str, Any] = json.load(f)
            return NodeState(
                str(data.get("node", "")),
                [ipaddress.ip_network(s) for s in data.get("subnets") or []],
                NetworkConfig.from_json(json.dumps(data["config"]).encode())
                if data.get("config")
                else None,
            )
        except FileNotFoundError:
            return NodeState()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("node state %s is unreadable, ignoring it: %s", self.path, exc)
            return NodeState()

    def save(self, state: NodeState) -> None:
        if not self.path:
            return
        data: dict[str, Any] = {"node": state.node, "subnets": [str(s) for s in state.subnets]}
        if state.config is not None:
            data["config"] = json.loads(state.config.to_json())
        tmp = f"{self.path}.tmp"
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
