"""One attachment, one verb at a time (cni_plugin/attachments.py), through the real shim and a
real daemon, with the daemon's test delay hook holding a verb at the worst moment.

- a DEL that arrives while an ADD of the same attachment sits between its allocation and its
  veth must wait for the ADD, then undo all of it; run concurrently it would release the IP the
  ADD then configures, leaving a pod with an address the store no longer records;
- DEL answers before its host veth is gone (the kernel's ~16 ms go to the background), so an ADD
  of the same attachment right after it must wait for that deletion, not meet the old link.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from cni_plugin.datapath.veth import host_veth_name
from tests.conftest import start_daemon
from tests.helpers import oracle
from tests.helpers.moor import Daemon, ExecRuntime, Outcome, plugin_config

pytestmark = pytest.mark.netns
NetnsFactory = Callable[[], tuple[str, str]]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("mse"), "mse", "10.224.0.0/16", "msebr0")
    yield d
    d.cleanup_host()


def conf(d: Daemon) -> dict:
    return plugin_config("msenet", "1.1.0", d.plugin())


def held_by(d: Daemon, cid: str) -> list[str]:
    return [a["ip"] for a in d.status()["allocations"] if a["containerID"] == cid]


def test_del_waits_for_the_add_of_the_same_attachment(node: Daemon, netns: NetnsFactory) -> None:
    rt = ExecRuntime()
    name, path = netns()
    cid = "delay-after-ipam-1500-mse1"  # the ADD sleeps 1.5 s between its IP and its veth
    added: list[Outcome] = []
    adding = threading.Thread(target=lambda: added.append(rt.add(conf(node), path, cid)))
    adding.start()
    deadline = time.monotonic() + 5
    while not held_by(node, cid):  # the ADD holds its IP now and sleeps
        assert time.monotonic() < deadline, "the ADD never allocated"
        time.sleep(0.02)
    deleted = rt.call("DEL", conf(node), container_id=cid, netns=path)
    adding.join(10)
    assert added[0].rc == 0, added[0].out
    assert deleted.rc == 0, deleted.out
    deadline = time.monotonic() + 5
    while oracle.link(host_veth_name(cid, "eth0")) is not None:  # the DEL's background part
        assert time.monotonic() < deadline, "the host veth outlived the DEL"
        time.sleep(0.02)
    assert held_by(node, cid) == []
    assert oracle.gone("eth0", netns=name)  # the DEL undid the whole ADD


def test_add_right_after_del_of_the_same_attachment_waits_for_its_veth(
    node: Daemon, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    cid = "delay-reap-300-mse"  # the background deletion waits 300 ms before it deletes
    for _ in range(3):
        name, path = netns()
        out = rt.add(conf(node), path, cid)
        assert out.rc == 0, out.out
        assert rt.delete(conf(node), path, cid).rc == 0
        _, fresh = netns()  # the runtime's next sandbox for the same attachment
        again = rt.add(conf(node), fresh, cid)
        assert again.rc == 0, again.out
        assert rt.delete(conf(node), fresh, cid).rc == 0
    deadline = time.monotonic() + 5
    while oracle.link(host_veth_name(cid, "eth0")) is not None:
        assert time.monotonic() < deadline, "the host veth outlived the DEL"
        time.sleep(0.02)
    assert held_by(node, cid) == []


def test_add_into_a_netns_whose_last_pod_end_is_still_being_deleted(
    node: Daemon, netns: NetnsFactory
) -> None:
    """A runtime that reuses a netns for another container ID right after a DEL (tests and
    benchmarks do) meets the old pod end while the background deletion runs: ADD waits for it."""
    rt = ExecRuntime()
    _, path = netns()
    first = "delay-reap-300-mse-first"  # its background deletion waits 300 ms
    assert rt.add(conf(node), path, first).rc == 0
    assert rt.delete(conf(node), path, first).rc == 0
    second = rt.add(conf(node), path, "mse-second")
    assert second.rc == 0, second.out
    assert rt.delete(conf(node), path, "mse-second").rc == 0
