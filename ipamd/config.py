"""moor-ipamd's configuration: one dataclass with every default, loadable from YAML and flags.

Precedence: command-line flag > `--config` YAML file > default. Every flag has a YAML key of the
same name with dashes as underscores.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

import yaml

from cni_plugin.naming import valid_node_name
from ipamd.network_config import NetworkConfig

# bin/moor gives up on a reply after REPLY_TIMEOUT (30 s); the daemon answers within the deadline
# plus the watchdog's margin, so the deadline must leave room for both.
MAX_REQUEST_DEADLINE = 25.0


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
    metrics_addr: str = "127.0.0.1:9617"
    public_ip: str = ""
    iface: str = ""
    etcd_cafile: str = ""
    etcd_certfile: str = ""
    etcd_keyfile: str = ""
    request_deadline: float = 5.0
    store_grace: float = 30.0
    reconcile_interval: float = 10.0
    log_format: str = "text"
    cni_conflist: str = ""
    cni_conflist_source: str = ""
    remove_conflist_on_exit: bool = False
    enable_fault_injection: bool = False

    def validate(self) -> None:
        if not valid_node_name(self.node_name):
            raise ValueError(
                f"--node-name {self.node_name!r}: letters, digits, '.', '_' and '-' only"
            )
        self.network_config()
        if self.public_ip:
            try:
                ipaddress.IPv4Address(self.public_ip)
            except ValueError as exc:
                raise ValueError(f"--public-ip {self.public_ip!r}: {exc}") from exc
        if self.cooldown < 0 or self.leak_gc_grace < 0 or self.lease_ttl <= 0:
            raise ValueError("cooldown and leak-gc-grace must be >= 0, lease-ttl > 0")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if not 0 < self.request_deadline <= MAX_REQUEST_DEADLINE or self.store_grace < 0:
            raise ValueError(
                f"--request-deadline must be > 0 and at most {MAX_REQUEST_DEADLINE:g} (bin/moor"
                " waits 30 s for a reply), --store-grace >= 0"
            )
        if self.log_format not in ("text", "json"):
            raise ValueError(f"--log-format {self.log_format!r} must be text or json")
        if bool(self.cni_conflist) != bool(self.cni_conflist_source):
            raise ValueError("--cni-conflist and --cni-conflist-source go together")
        if self.cni_conflist_source and not os.access(self.cni_conflist_source, os.R_OK):
            raise ValueError(f"--cni-conflist-source {self.cni_conflist_source}: not readable")
        if self.cni_conflist and not os.path.isdir(os.path.dirname(self.cni_conflist) or "."):
            raise ValueError(f"--cni-conflist {self.cni_conflist}: its directory does not exist")
        if not 0 < self.reconcile_interval <= 3600:
            raise ValueError("--reconcile-interval must be > 0 and at most 3600 seconds")
        if bool(self.etcd_certfile) != bool(self.etcd_keyfile):
            raise ValueError("--etcd-certfile and --etcd-keyfile go together (mTLS)")
        for name in ("etcd_cafile", "etcd_certfile", "etcd_keyfile"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"--{name.replace('_', '-')} {path}: not a readable file")
        if not isinstance(self.metrics_addr, str):
            raise ValueError(f"--metrics-addr {self.metrics_addr!r} must be a HOST:PORT string")
        if self.metrics_addr:
            split_host_port(self.metrics_addr, "--metrics-addr")

    def store_options(self) -> dict[str, Any]:
        """Backend options: one store request may take a third of the request deadline (etcd's
        RPC timeout, SQLite's busy wait for a lock another process holds), so a CNI call that
        meets an unreachable or locked store still answers "try again later" in time, and a DEL
        has time left to journal its release. Inside a request the remaining time caps it too."""
        if not self.store.lower().startswith("etcd://"):
            return {"busy_timeout": self.request_deadline / 3}
        return {
            "timeout": self.request_deadline / 3,
            "ca_file": self.etcd_cafile or None,
            "cert_file": self.etcd_certfile or None,
            "key_file": self.etcd_keyfile or None,
        }

    def network_config(self) -> NetworkConfig | None:
        """The network from `--network`/`--subnet-len`; None when `--network ""` (use the store's)."""
        if not self.network:
            return None
        return NetworkConfig.parse(self.network, self.subnet_len)


def split_host_port(addr: str, what: str = "address") -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` as (host, port); ValueError naming `what` otherwise."""
    problem = f"{what} {addr!r} must be HOST:PORT, e.g. 127.0.0.1:9617 or [::1]:9617"
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{problem}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise ValueError(f"{problem}: an IPv6 host needs [brackets]")
    if not sep or not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(problem)
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{problem}: the port must be 1-65535")
    return host, int(port)


HELP = {
    "node_name": "node name the subnet leases are keyed by (default: hostname)",
    "store": "sqlite:///PATH (embedded, default) or etcd://HOST:PORT[,HOST:PORT]",
    "key_prefix": "prefix of every store key",
    "network": 'cluster pod network, split into per-node subnets; "" takes it from the store',
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
    "metrics_addr": "HOST:PORT of the Prometheus /metrics endpoint; empty disables it",
    "public_ip": "this node's IPv4 address other nodes route pod traffic to (in its subnet lease)",
    "iface": "take --public-ip from this interface's first IPv4 address",
    "etcd_cafile": "CA bundle that signed etcd's server certificate (turns TLS on)",
    "etcd_certfile": "client certificate for etcd mTLS",
    "etcd_keyfile": "client key for etcd mTLS",
    "request_deadline": "seconds from accepting a CNI request to its reply; past it, code 11",
    "store_grace": "seconds the store may be unreachable before STATUS/health say not ready",
    "reconcile_interval": "seconds between full reconciles of the routes to other nodes",
    "log_format": "text (one line per event) or json (one JSON object per line)",
    "cni_conflist": "install the CNI conflist here (e.g. /etc/cni/net.d/10-moor.conflist) once "
    "the node can serve ADD, and keep it there",
    "cni_conflist_source": "the conflist to install at --cni-conflist",
    "remove_conflist_on_exit": "remove --cni-conflist when the daemon exits (moor leaves the node)",
    "enable_fault_injection": argparse.SUPPRESS,  # tests only: see ipamd.faults
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
