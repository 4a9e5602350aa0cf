"""moor-ipamd's configuration: one dataclass with every default, loadable from YAML and flags.

Precedence: command-line flag > `--config` YAML file > default. Every flag has a YAML key of the
same name with dashes as underscores.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass
class DaemonConfig:
    node_name: str = dataclasses.field(default_factory=socket.gethostname)
    store: str = "sqlite:///var/lib/moor/store.db"
    key_prefix: str = "/moor"
    network: str = "10.244.0.0/16"
    subnet_len: int = 24
    cni_socket: str = "/run/moor/cni.sock"
    grpc_socket: str = "/run/moor/ipamd.sock"
    spool_dir: str = "/var/lib/moor/spool"
    state_dir: str = "/var/lib/moor"
    cooldown: float = 60.0
    lease_ttl: float = 24 * 3600.0
    leak_gc_interval: float = 60.0
    leak_gc_grace: float = 600.0
    masq_chain: str = "MOOR-MASQ"
    workers: int = 16
    log_level: str = "info"
    enable_fault_injection: bool = False

    def validate(self) -> None:
        try:
            net = ipaddress.ip_network(self.network)
        except ValueError as exc:
            raise ValueError(f"--network {self.network!r} is not a CIDR network: {exc}") from exc
        if net.version != 4:
            raise ValueError(f"--network {self.network}: IPv6 pod networks are not supported yet")
        if not net.prefixlen < self.subnet_len <= 30:
            raise ValueError(
                f"--subnet-len {self.subnet_len} must be longer than the network's /{net.prefixlen} "
                "and at most /30"
            )
        if self.cooldown < 0 or self.leak_gc_grace < 0 or self.lease_ttl <= 0:
            raise ValueError("cooldown and leak-gc-grace must be >= 0, lease-ttl > 0")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")


HELP = {
    "node_name": "node name the subnet leases are keyed by (default: hostname)",
    "store": "sqlite:///PATH (embedded, default) or etcd://HOST:PORT[,HOST:PORT] (next release)",
    "key_prefix": "prefix of every store key",
    "network": "cluster pod network, split into per-node subnets",
    "subnet_len": "prefix length of each node subnet",
    "cni_socket": "unix socket bin/moor forwards CNI calls to (netconf daemonSocket)",
    "grpc_socket": "unix socket of the gRPC IPAM API (moorctl --socket)",
    "spool_dir": "where bin/moor spools DELs while the daemon is down (netconf spoolDir)",
    "state_dir": "local state (the subnet this node held last)",
    "cooldown": "seconds a released IP waits before reuse",
    "lease_ttl": "TTL of the node's subnet leases, in seconds",
    "leak_gc_interval": "seconds between leak GC rounds",
    "leak_gc_grace": "seconds an allocation must look leaked before it is released",
    "masq_chain": "iptables nat chain for the node's masquerade rules",
    "workers": "threads serving CNI requests",
    "log_level": "debug, info, warning or error",
    "enable_fault_injection": argparse.SUPPRESS,  # tests only: container IDs 'fault-<point>-...'
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moor-ipamd", description="moor node IPAM daemon")
    parser.add_argument("--config", help="YAML file; flags override it")
    for f in dataclasses.fields(DaemonConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=HELP[f.name])
    return parser


def load_config(argv: list[str] | None = None) -> DaemonConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping")
        known = {f.name for f in dataclasses.fields(DaemonConfig)}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"{args.config}: unknown key {key!r}")
            values[name] = value
    for f in dataclasses.fields(DaemonConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = value
    cfg = DaemonConfig(**values)
    cfg.validate()
    return cfg
