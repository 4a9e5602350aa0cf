"""The simulated cluster's etcd, read and written with moor's own store client.

etcd listens inside the cluster's infra netns, and grpc's threads must run in the netns that
reaches it, so every access is a whole process: `ip netns exec <infra> python -m
tests.helpers.fixed_store URL PREFIX COMMAND ...` (this module's `main`). Commands:
  * `sticky NAMESPACE [POD_REGEX]`: add a sticky rule through `ipamd.fixed.sticky.StickyRules`
    (what `moorctl sticky add` does, for a tree that has no such command yet);
  * `dump`: every key under the prefix, as JSON {key: value}, read at one revision.
`StoreView` parses a dump into the records the fixed-IP invariants are about.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ipamd.fixed.model import FixedBinding, Identity
from ipamd.model import Allocation, IPAddress
from ipamd.store.keys import Keys
from tests.helpers.moor import REPO

if TYPE_CHECKING:
    from tests.helpers.cluster import Cluster


def in_infra(c: Cluster, *args: str) -> str:
    """Run this module's `main` with `args` inside the cluster's infra netns; its stdout."""
    proc = subprocess.run(
        ["ip", "netns", "exec", c.underlay.infra, sys.executable, "-m", __name__,
         c.etcd.url, c.key_prefix, *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"fixed_store {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def add_sticky_rule(c: Cluster, namespace: str, pod_regex: str = "") -> None:
    in_infra(c, "sticky", namespace, pod_regex)


@dataclass
class StoreView:
    """One revision of the cluster's records that matter to fixed IPs."""

    ips: dict[IPAddress, Allocation] = field(default_factory=dict)
    handles: dict[tuple[str, str, str], IPAddress] = field(default_factory=dict)
    bindings: dict[IPAddress, FixedBinding] = field(default_factory=dict)
    index: dict[Identity, IPAddress] = field(default_factory=dict)  # fixed-ids/<ns>/<name>

    @classmethod
    def read(cls, c: Cluster) -> StoreView:
        raw: dict[str, str] = json.loads(in_infra(c, "dump"))
        keys, view = Keys(c.key_prefix), cls()
        ids_prefix = f"{c.key_prefix}/fixed-ids/"
        for key, value in raw.items():
            data = value.encode()
            if (ip := keys.parse_ip(key)) is not None:
                view.ips[ip] = Allocation.from_json(ip, data)
            elif (handle := keys.parse_handle(key)) is not None:
                view.handles[handle] = ipaddress.ip_address(value)
            elif (ip := keys.parse_fixed(key)) is not None:
                view.bindings[ip] = FixedBinding.from_json(ip, data)
            elif key.startswith(ids_prefix):
                namespace, _, name = key[len(ids_prefix) :].partition("/")
                identity = Identity("" if namespace == "-" else namespace, name)
                view.index[identity] = ipaddress.ip_address(value)
        return view


def main(argv: list[str]) -> None:
    from ipamd.fixed.sticky import StickyRule, StickyRules
    from ipamd.store.open import open_store

    url, prefix, command, *rest = argv
    store = open_store(url, timeout=10.0)
    try:
        keys = Keys(prefix)
        if command == "sticky":
            namespace, regex = rest[0], rest[1] if len(rest) > 1 else ""
            StickyRules(store, keys).add(StickyRule(namespace, regex, created_by="churn test"))
        elif command == "dump":
            items, _ = store.list_prefix(prefix + "/")
            print(json.dumps({kv.key: kv.value.decode() for kv in items}))
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
