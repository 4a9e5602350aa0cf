"""`python -m bench.cluster_store` run under `ip netns exec <a netns that reaches etcd>`: preload a
synthetic cluster for the reconcile figures, with moor's own store client and record types.

It writes the network config and `count` subnet leases of peers `peer-0000`, `peer-0001`, ...: the
N-th /`subnetLen` of the network, public IP `--first-ip` + N, the backend data moor itself
publishes (`NetworkConfig.backend_data`: the VTEP MAC derived from the cluster ID and the node).
Leases go in txns of at most 128 puts (etcd's default --max-txn-ops) from 8 writers. It prints one
JSON line: {"seconds": ..., "keys": ...}.

A separate process because the store client is grpc, whose threads open sockets in the netns of
the process; the bench process stays in the host's.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ipamd.model import SubnetLease
from ipamd.network_config import NetworkConfig
from ipamd.store.base import Put, Store
from ipamd.store.keys import Keys
from ipamd.store.open import open_store

TXN_OPS = 128
WRITERS = 8


def peer_name(index: int) -> str:
    return f"peer-{index:04d}"


def peer_lease(config: NetworkConfig, index: int, first_ip: str, now: float) -> SubnetLease:
    """Peer `index`'s lease, as that peer's moor-ipamd would have written it: the index-th
    subnet of the network, public IP `first_ip` + index."""
    size = 1 << (32 - config.subnet_len)
    base = int(config.network.network_address) + index * size
    subnet = ipaddress.ip_network(f"{ipaddress.ip_address(base)}/{config.subnet_len}")
    node = peer_name(index)
    ip = str(ipaddress.ip_address(first_ip) + index)
    return SubnetLease(subnet, node, now, ip, config.backend_data(node))


def write_all(store: Store, ops: list[Put]) -> None:
    """`ops` in txns of at most TXN_OPS puts, from WRITERS threads (also bench/fixed_store.py)."""
    batches = [ops[k : k + TXN_OPS] for k in range(0, len(ops), TXN_OPS)]
    with ThreadPoolExecutor(WRITERS) as pool:
        for result in pool.map(lambda batch: store.txn([], batch), batches):
            if not result.succeeded:
                raise RuntimeError("a preload txn did not apply")


def peer_lease_ops(keys: Keys, config: NetworkConfig, count: int, first_ip: str) -> list[Put]:
    now = time.time()
    leases = (peer_lease(config, i, first_ip, now) for i in range(count))
    return [Put(keys.subnet(lease.subnet), lease.to_json()) for lease in leases]


def preload(store_url: str, prefix: str, config: NetworkConfig, count: int, first_ip: str) -> int:
    keys = Keys(prefix)
    store = open_store(store_url, timeout=60.0)
    try:
        store.put(keys.config(), config.to_json())
        ops = peer_lease_ops(keys, config, count, first_ip)
        write_all(store, ops)
        return 1 + len(ops)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_store")
    parser.add_argument("--store", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--config", required=True, help="the network config JSON")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first-ip", required=True)
    args = parser.parse_args(argv)
    config = NetworkConfig.from_json(args.config.encode())
    started = time.perf_counter()
    written = preload(args.store, args.prefix, config, args.count, args.first_ip)
    print(json.dumps({"seconds": time.perf_counter() - started, "keys": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
