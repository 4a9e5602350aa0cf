"""The records moor keeps in its store, and their JSON encoding.

Every IP record names its owner: the CNI attachment (network, container ID, ifname) and, when the
runtime told us, the pod (namespace/name, UID). Nothing frees an IP without comparing that owner;
the fixed-IP work builds its generation guard on this.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.ipam import AttachmentOwner
from cni_plugin.iptypes import IPAddress, IPInterface, IPNetwork

# Who holds an IP: the CNI layer's port declares the type, the records use it as it is.
Owner = AttachmentOwner


@dataclass(frozen=True)
class Allocation:
    ip: IPAddress
    subnet: IPNetwork
    owner: Owner
    node: str
    since: float
    netns: str = ""
    netns_inode: int = 0
    host_veth: str = ""  # empty in IPAM-plugin mode: the delegating plugin owns the link

    @property
    def gateway(self) -> IPAddress:
        return self.subnet.network_address + 1

    @property
    def interface(self) -> IPInterface:
        return ipaddress.ip_interface(f"{self.ip}/{self.subnet.prefixlen}")

    def to_json(self) -> bytes:
        o = self.owner
        return json.dumps(
            {
                "subnet": str(self.subnet),
                "network": o.network,
                "containerID": o.container_id,
                "ifname": o.ifname,
                "pod": {"namespace": o.pod_namespace, "name": o.pod_name, "uid": o.pod_uid},
                "node": self.node,
                "since": self.since,
                "netns": self.netns,
                "netnsInode": self.netns_inode,
                "hostVeth": self.host_veth,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, ip: IPAddress, data: bytes) -> Allocation:
        d: dict[str, Any] = json.loads(data)
        pod = d.get("pod") or {}
        return cls(
            ip=ip,
            subnet=ipaddress.ip_network(d["subnet"]),
            owner=Owner(
                network=d["network"],
                container_id=d["containerID"],
                ifname=d["ifname"],
                pod_namespace=pod.get("namespace", ""),
                pod_name=pod.get("name", ""),
                pod_uid=pod.get("uid", ""),
            ),
            node=d["node"],
            since=float(d["since"]),
            netns=d.get("netns", ""),
            netns_inode=int(d.get("netnsInode", 0)),
            host_veth=d.get("hostVeth", ""),
        )


@dataclass(frozen=True)
class SubnetLease:
    subnet: IPNetwork
    node: str
    since: float
    public_ip: str = ""
    backend: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "node": self.node,
                "since": self.since,
                "publicIP": self.public_ip,
                "backend": self.backend,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, subnet: IPNetwork, data: bytes) -> SubnetLease:
        d = json.loads(data)
        return cls(
            subnet, d["node"], float(d["since"]), d.get("publicIP", ""), d.get("backend") or {}
        )
