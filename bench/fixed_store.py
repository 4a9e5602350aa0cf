"""`python -m bench.fixed_store` run under `ip netns exec <a netns that reaches etcd>`: preload a
synthetic cluster for the fixed-IP reconcile figure, with moor's own store client and records.

It writes the network config (with its fixed range), `--peers` subnet leases as those peers'
daemons would (bench/cluster_store.py's), and `--count` held sticky fixed IPs spread round-robin
over the peers: for each, what a claim by that peer writes (ipamd/fixed/bindings.py): the binding
`fixed/<ip>` (ipamd/fixed/model.py `FixedBinding`), the IP record `ips/<ip>` (`Allocation`), the
holder's handle and the identity index. No binding names the measured node, so its every /32 is
the remote form (a local one needs the pod's host veth on the node). It prints one JSON line:
{"seconds": ..., "keys": ...}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from collections.abc import Iterator

from bench.cluster_store import peer_lease_ops, peer_name, write_all
from ipamd.fixed.model import STICKY, FixedBinding, Generation, Identity
from ipamd.model import Allocation, IPAddress, Owner
from ipamd.network_config import NetworkConfig
from ipamd.store.base import Put
from ipamd.store.keys import Keys
from ipamd.store.open import open_store

CNI_NETWORK = "mbfnet"
NAMESPACE = "mbf"
RETAIN = 86400.0  # the sticky default: 24 h


def fixed_ips(config: NetworkConfig, count: int) -> Iterator[IPAddress]:
    """The first `count` host addresses of the config's fixed ranges, in order."""
    made = 0
    for network in config.fixed_ranges:
        for ip in network.hosts():
            if made == count:
                return
            made += 1
            yield ip
    if made < count:
        raise ValueError(f"the fixed ranges hold only {made} addresses, not {count}")


def binding_ops(keys: Keys, ip: IPAddress, index: int, node: str, now: float) -> list[Put]:
    """What `FixedBindings.claim` writes for pod `mbf/sts-<index>` holding `ip` on `node`."""
    container_id = f"{index:064x}"
    owner = Owner(CNI_NETWORK, container_id, "eth0", NAMESPACE, f"sts-{index:05d}",
                  f"uid-{index:05d}")  # fmt: skip
    host_veth = f"veth{index:08x}"
    binding = FixedBinding(ip, Identity.of(owner), STICKY, retain=RETAIN).held_by(
        Generation.of(owner), owner.handle, node, host_veth, now
    )
    alloc = Allocation(ip, ipaddress.ip_network(f"{ip}/32"), owner, node, now,
                       f"/run/netns/sts-{index}", 4026530000 + index, host_veth)  # fmt: skip
    return [
        Put(keys.fixed(ip), binding.to_json()),
        Put(keys.ip(ip), alloc.to_json()),
        Put(keys.handle(*owner.handle), str(ip).encode()),
        Put(keys.fixed_identity(owner.pod_namespace, owner.pod_name), str(ip).encode()),
    ]


def preload(
    store_url: str, prefix: str, config: NetworkConfig, peers: int, count: int, first_ip: str
) -> int:
    keys = Keys(prefix)
    store = open_store(store_url, timeout=60.0)
    now = time.time()
    try:
        store.put(keys.config(), config.to_json())
        ops = peer_lease_ops(keys, config, peers, first_ip)
        for i, ip in enumerate(fixed_ips(config, count)):
            ops += binding_ops(keys, ip, i, peer_name(i % peers), now)
        write_all(store, ops)
        return 1 + len(ops)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_store")
    parser.add_argument("--store", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--config", required=True, help="the network config JSON")
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--count", type=int, required=True, help="fixed IPs")
    parser.add_argument("--first-ip", required=True, help="peer 0's public IP")
    args = parser.parse_args(argv)
    config = NetworkConfig.from_json(args.config.encode())
    started = time.perf_counter()
    written = preload(args.store, args.prefix, config, args.peers, args.count, args.first_ip)
    print(json.dumps({"seconds": time.perf_counter() - started, "keys": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
