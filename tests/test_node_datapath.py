"""NodeDatapath's masquerade cache under concurrency, against real iptables in a netns of ours.

Found by tests/test_upgrade.py: two pods added at once on a fresh node left two POSTROUTING
jumps to the node's chain (each ADD read "no jump" before the other wrote one). Here a deliberate
delay between the read and the write makes that interleaving certain.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import ip_network

import pytest

from cni_plugin.datapath.masq import MasqueradeRules, _Family
from cni_plugin.iptypes import IPNetwork
from cni_plugin.node_datapath import NodeDatapath
from tests.helpers import oracle

pytestmark = [pytest.mark.root, pytest.mark.netns]
NETWORK = ip_network("10.252.0.0/16")
READ_TO_WRITE = 0.3  # seconds between reading the rules and rewriting them


class SlowRulesInNetns(MasqueradeRules):
    """The real rules, run in `netns`, slow between reading the state and acting on it."""

    def __init__(self, chain: str, netns: str) -> None:
        super().__init__(chain)
        self.netns = netns

    def _run(
        self, fam: _Family, args: Sequence[str], stdin: str | None = None, restore: bool = False
    ) -> subprocess.CompletedProcess[str]:
        binary = fam.restore if restore else fam.iptables
        argv = ["ip", "netns", "exec", self.netns, binary, "--wait=10", *args]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)

    def _state(self, fam: _Family, networks: Sequence[IPNetwork]) -> tuple[bool, list[str]]:
        state = super()._state(fam, networks)
        time.sleep(READ_TO_WRITE)
        return state


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mnd-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def jumps(netns: str, chain: str) -> list[str]:
    return [r for r in oracle.nat_rules(netns) if r.startswith("-A POSTROUTING") and chain in r]


def test_concurrent_first_adds_install_the_masquerade_jump_once(netns: str) -> None:
    chain = "MND-MASQ"
    datapath = NodeDatapath(SlowRulesInNetns(chain, netns))
    callers = [threading.Thread(target=datapath.ensure_masquerade, args=(NETWORK,)) for _ in "ab"]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(jumps(netns, chain)) == 1, oracle.nat_rules(netns)
    assert len([r for r in oracle.nat_rules(netns) if r.startswith(f"-A {chain} ")]) == 3
