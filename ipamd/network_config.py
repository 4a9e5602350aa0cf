"""The cluster network config (`<prefix>/config`): the pod network, how it splits into node
subnets, and how nodes route to each other (the backend and its settings).

The backend settings are cluster-wide on purpose: a vxlan peer whose VNI or UDP port differs from
ours cannot talk to us, so they are chosen once, by `moorctl network init`, and every node reads
them from the store. What one node publishes about itself (public IP, VTEP MAC) is in its leases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.iptypes import IPNetwork

BACKENDS = ("host-gw", "vxlan")
_CLUSTER_ID_RE = re.compile(r"[a-zA-Z0-9-]{0,64}")
SCHEMA_VERSION = 2  # of the store's layout; ipamd/schema.py refuses newer, moves older forward
VXLAN_VNI = 1  # flannel's default too
VXLAN_PORT = 8472  # the Linux default; sent explicitly (NSX users move it)
MAX_VNI = (1 << 24) - 1


@dataclass(frozen=True)
class NetworkConfig:
    """The cluster network (`<prefix>/config`): how it splits into node subnets, and which of them
    nodes may lease.

    `subnet_min`/`subnet_max` bound the leaseable subnets (flannel's SubnetMin/SubnetMax);
    `fixed_ranges` are never leased to nodes, they are kept for fixed pod IPs. Construction
    validates (`validate`), so the daemon's flags, the Admin RPC and the JSON in the store all
    go through the same checks.
    """

    network: IPNetwork
    subnet_len: int
    subnet_min: IPNetwork | None = None
    subnet_max: IPNetwork | None = None
    fixed_ranges: tuple[IPNetwork, ...] = ()
    backend: str = "host-gw"
    vni: int = VXLAN_VNI
    vxlan_port: int = VXLAN_PORT
    # Who this network is: set when the config is first written, remembered by every node (see
    # ipamd/node_state.py). Not part of equality: the same network written again is the same.
    cluster_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def parse(
        cls,
        network: str,
        subnet_len: int,
        *,
        subnet_min: str = "",
        subnet_max: str = "",
        fixed_ranges: Iterable[str] = (),
        backend: str = "host-gw",
        vni: int = VXLAN_VNI,
        vxlan_port: int = VXLAN_PORT,
        cluster_id: str = "",
    ) -> NetworkConfig:
        """Build from text (flags, RPC fields); ValueError with one clear sentence otherwise."""
        return cls(
            _cidr(network, "--network"),
            subnet_len,
            _cidr(subnet_min, "--subnet-min") if subnet_min else None,
            _cidr(subnet_max, "--subnet-max") if subnet_max else None,
            tuple(_cidr(r, "--fixed-range") for r in fixed_ranges),
            backend or "host-gw",
            vni or VXLAN_VNI,
            vxlan_port or VXLAN_PORT,
            cluster_id,
        )

    def with_new_cluster_id(self) -> NetworkConfig:
        """This config as written for the first time: with a fresh random cluster ID."""
        return dataclasses.replace(self, cluster_id=uuid.uuid4().hex)

    def validate(self) -> None:
        net = self.network
        if net.version != 4:
            raise ValueError(f"--network {net}: IPv6 pod networks are not supported yet")
        if not isinstance(self.subnet_len, int) or not net.prefixlen < self.subnet_len <= 30:
            raise ValueError(
                f"--subnet-len {self.subnet_len} must be longer than the network's "
                f"/{net.prefixlen} and at most /30"
            )
        for name, bound in (("--subnet-min", self.subnet_min), ("--subnet-max", self.subnet_max)):
            if bound is None:
                continue
            if bound.version != 4 or bound.prefixlen != self.subnet_len or not bound.subnet_of(net):  # type: ignore[arg-type]
                raise ValueError(f"{name} {bound} is not a /{self.subnet_len} subnet of {net}")
        if self.subnet_min is not None and self.subnet_max is not None:
            if self.subnet_min.network_address > self.subnet_max.network_address:
                raise ValueError(
                    f"--subnet-min {self.subnet_min} is above --subnet-max {self.subnet_max}"
                )
        for r in self.fixed_ranges:
            if r.version != 4 or not r.subnet_of(net):  # type: ignore[arg-type]
                raise ValueError(f"--fixed-range {r} is not inside the network {net}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        for name, value, top in (
            ("--vni", self.vni, MAX_VNI),
            ("--vxlan-port", self.vxlan_port, 65535),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise ValueError(f"{name} {value!r} must be an integer from 1 to {top}")
        if not isinstance(self.cluster_id, str) or not _CLUSTER_ID_RE.fullmatch(self.cluster_id):
            raise ValueError(f"cluster ID {self.cluster_id!r} is not 0-64 letters, digits or -")

    # ---- which subnets nodes may lease ---------------------------------------------------------
    def _index_range(self) -> tuple[int, int]:
        """First and last leaseable subnet as indices (network address >> host bits)."""
        shift = 32 - self.subnet_len
        low = self.subnet_min or self.network
        high_addr = (
            self.subnet_max.network_address
            if self.subnet_max is not None
            else self.network.broadcast_address
        )
        return int(low.network_address) >> shift, int(high_addr) >> shift

    def _fixed_indices(self) -> list[tuple[int, int]]:
        """Subnet index intervals touched by a fixed range, merged and sorted."""
        shift = 32 - self.subnet_len
        spans = sorted(
            (int(r.network_address) >> shift, int(r.broadcast_address) >> shift)
            for r in self.fixed_ranges
        )
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def leaseable(self, subnet: IPNetwork) -> bool:
        """May a node lease `subnet`: a subnet of the network, in [min, max], off fixed ranges."""
        if subnet.version != 4 or subnet.prefixlen != self.subnet_len:
            return False
        if not subnet.subnet_of(self.network):  # type: ignore[arg-type]
            return False
        first, last = self._index_range()
        index = int(subnet.network_address) >> (32 - self.subnet_len)
        return first <= index <= last and not any(subnet.overlaps(r) for r in self.fixed_ranges)

    def leaseable_subnets(self) -> Iterator[IPNetwork]:
        """Every leaseable subnet in ascending order, without walking the skipped ones."""
        first, last = self._index_range()
        shift = 32 - self.subnet_len
        index = first
        for lo, hi in [*self._fixed_indices(), (last + 1, last + 1)]:
            while index <= min(lo - 1, last):
                yield ipaddress.IPv4Network((index << shift, self.subnet_len))
                index += 1
            index = max(index, hi + 1)
            if index > last:
                return

    def leaseable_count(self) -> int:
        """How many subnets nodes may lease in all (arithmetic: a /8 of /30s has 4M)."""
        first, last = self._index_range()
        count = last - first + 1
        for lo, hi in self._fixed_indices():
            lo, hi = max(lo, first), min(hi, last)
            if lo <= hi:
                count -= hi - lo + 1
        return max(0, count)

    def backend_data(self, node: str) -> dict[str, Any]:
        """What `node` publishes in its lease for the backend: peers check the VNI and port
        against theirs, and program the VTEP MAC into their neighbour and FDB tables."""
        if self.backend == "vxlan":
            return {
                "type": "vxlan",
                "vni": self.vni,
                "port": self.vxlan_port,
                "vtepMAC": self.vtep_mac(node),
            }
        return {"type": self.backend}

    def vtep_mac(self, node: str) -> str:
        """`node`'s VTEP MAC, derived from the cluster and the node name: the same after every
        reboot or device re-creation, so peers never hold a stale one (flannel #533, #1036,
        #1795). Locally administered unicast (02:...)."""
        digest = hashlib.sha256(f"moor-vtep/{self.cluster_id}/{node}".encode()).digest()
        return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "schemaVersion": SCHEMA_VERSION,
            "network": str(self.network),
            "subnetLen": self.subnet_len,
        }
        if self.subnet_min is not None:
            d["subnetMin"] = str(self.subnet_min)
        if self.subnet_max is not None:
            d["subnetMax"] = str(self.subnet_max)
        if self.fixed_ranges:
            d["fixedRanges"] = [str(r) for r in self.fixed_ranges]
        d["backend"] = self.backend
        if self.backend == "vxlan":
            d["vni"], d["vxlanPort"] = self.vni, self.vxlan_port
        if self.cluster_id:
            d["clusterID"] = self.cluster_id
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NetworkConfig:
        """Old configs (network and subnetLen only) parse with the defaults."""
        d = json.loads(data)
        return cls.parse(
            d["network"],
            int(d["subnetLen"]),
            subnet_min=d.get("subnetMin") or "",
            subnet_max=d.get("subnetMax") or "",
            fixed_ranges=d.get("fixedRanges") or (),
            backend=d.get("backend") or "host-gw",
            vni=d.get("vni") or VXLAN_VNI,
            vxlan_port=d.get("vxlanPort") or VXLAN_PORT,
            cluster_id=d.get("clusterID") or "",
        )


def _cidr(text: str, what: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} {text!r} is not a CIDR network: {exc}") from exc
