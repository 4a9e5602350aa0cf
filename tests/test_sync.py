"""Changes made through one daemon reach another daemon's memory (ipamd/sync.py), on real etcd.

Each daemon keeps its subnets' free set in memory; `moorctl release` or `moorctl node remove` run
on another node must not leave it believing an IP is still used, or a removed subnet still held.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from tests.conftest import start_daemon
from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import Daemon

pytestmark = pytest.mark.netns


@pytest.fixture
def pair(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[tuple[Daemon, Daemon]]:
    prefix = f"/msy-{secrets.token_hex(4)}"
    started: list[Daemon] = []
    try:
        for i in (1, 2):
            started.append(
                start_daemon(
                    tmp_path / f"n{i}",
                    f"msy{i}",
                    "10.234.0.0/16",
                    f"msybr{i}",
                    store_url=etcd_server.url,
                    key_prefix=prefix,
                )
            )
        yield started[0], started[1]
    finally:
        for d in started:
            d.cleanup_host()


def stub(d: Daemon) -> ipam_pb2_grpc.IpamStub:
    return ipam_pb2_grpc.IpamStub(grpc.insecure_channel(f"unix:{d.grpc_socket}"))


def allocate(d: Daemon, cid: str) -> str:
    owner = ipam_pb2.Owner(network="msy", container_id=cid, ifname="eth0")
    r = stub(d).Allocate(ipam_pb2.AllocateRequest(owner=owner), timeout=10)
    return r.allocation.ip.split("/")[0]


def eventually(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_release_through_another_node_frees_the_ip_in_the_holders_memory(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    ip = allocate(b, "held-by-b")
    kept = allocate(b, "kept-by-b")
    assert [x["ip"].split("/")[0] for x in b.status()["allocations"]] == [ip, kept]

    r = a.moorctl("release", "--ip", ip)
    assert r.returncode == 0, r.stderr

    eventually(
        "node b to forget the released IP",
        lambda: [x["ip"].split("/")[0] for x in b.status()["allocations"]] == [kept],
    )
    subnet = b.status()["subnets"][0]
    assert (subnet["used"], subnet["cooling"]) == (1, 1)  # freed, and cooling down first
    assert allocate(b, "next") not in (ip, kept)
    # The same handle may allocate again: the node no longer thinks it holds an IP.
    assert allocate(b, "held-by-b") not in (ip, kept)


def test_node_remove_of_a_live_node_makes_it_not_ready(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    allocate(b, "on-b")
    r = a.moorctl("node", "remove", "msy2")
    assert r.returncode == 0, r.stderr
    eventually("node b to notice its subnet is gone", lambda: not b.status()["ready"])
    assert "no subnet lease" in b.status()["reason"]
    with pytest.raises(grpc.RpcError) as err:
        allocate(b, "after-remove")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
