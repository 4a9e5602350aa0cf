"""etcd goes away mid-run and comes back: a real moor-ipamd on a real etcd that the test stops.

While etcd is unreachable: ADD answers 11 within the request deadline; DEL succeeds and its
release waits in the local journal (which survives a daemon restart); STATUS stays 0 for the
grace period and only then answers 50. When etcd returns the daemon recovers by itself.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.datapath.veth import host_veth_name
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from tests.conftest import start_daemon
from tests.helpers import etcd, oracle
from tests.helpers.moor import Daemon, ExecRuntime, plugin_config

pytestmark = pytest.mark.netns
NetnsFactory = Callable[[], tuple[str, str]]

DEADLINE = 3.0
GRACE = 4.0
PREFIX = "/mot"


@pytest.fixture
def node(tmp_path: Path, etcd_alone: etcd.EtcdServer) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path / "node",
        "mot",
        "10.235.0.0/16",
        "motbr0",
        store_url=etcd_alone.url,
        key_prefix=PREFIX,
        extra_args=["--request-deadline", str(DEADLINE), "--store-grace", str(GRACE)],
    )
    yield d
    d.cleanup_host()


def conf(d: Daemon) -> dict:
    return plugin_config("motnet", "1.1.0", d.plugin())


def ip_of(rt: ExecRuntime, cid: str) -> str:
    return rt.cache[("motnet", cid, "eth0")]["ips"][0]["address"].split("/")[0]


def stored_ips(server: etcd.EtcdServer) -> set[str]:
    keys = Keys(PREFIX)
    with open_store(server.url) as store:
        return {str(keys.parse_ip(kv.key)) for kv in store.list_prefix(keys.ips_prefix())[0]}


def journal(d: Daemon) -> list[dict]:
    path = d.workdir / "state" / "releases-mot.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_etcd_outage_add_11_del_journaled_status_after_grace_then_recovery(
    node: Daemon, etcd_alone: etcd.EtcdServer, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    c = conf(node)
    ns1, path1 = netns()
    assert rt.add(c, path1, "out1").rc == 0
    ip1 = ip_of(rt, "out1")
    assert ip1 in stored_ips(etcd_alone)

    etcd_alone.stop()
    down_at = time.monotonic()

    started = time.monotonic()
    add = rt.add(c, netns()[1], "out2")
    assert time.monotonic() - started < DEADLINE + 1.0
    assert add.failed_with(11, "unreachable"), add
    assert oracle.gone(host_veth_name("out2", "eth0"))  # nothing half-made

    status = rt.call("STATUS", c)  # within the grace period: still ready
    assert status.rc == 0, status
    assert time.monotonic() - down_at < GRACE

    dele = rt.delete(c, path1, "out1")
    assert dele.rc == 0, dele
    assert oracle.gone(host_veth_name("out1", "eth0"))
    assert [(e["containerID"], e["ip"], e["done"]) for e in journal(node)] == [("out1", ip1, False)]

    wait_for("the grace period to pass", lambda: time.monotonic() - down_at > GRACE + 0.5)
    status = rt.call("STATUS", c)
    assert status.failed_with(50, "unreachable"), status

    etcd_alone.start()
    wait_for("the journaled release to reach etcd", lambda: ip1 not in stored_ips(etcd_alone))
    wait_for("the journal to empty", lambda: journal(node) == [])
    assert rt.call("STATUS", c).rc == 0
    ns3, path3 = netns()
    add3 = rt.add(c, path3, "out3")
    assert add3.rc == 0, add3
    assert ip_of(rt, "out3") != ip1  # the released IP is cooling down, so it is reused last
    assert node.proc is not None and node.proc.poll() is None  # no restart was needed


def test_journal_survives_a_daemon_restart(
    node: Daemon, etcd_alone: etcd.EtcdServer, netns: NetnsFactory
) -> None:
    rt = ExecRuntime()
    c = conf(node)
    _, path = netns()
    assert rt.add(c, path, "jr1").rc == 0
    ip = ip_of(rt, "jr1")
    etcd_alone.stop()
    assert rt.delete(c, path, "jr1").rc == 0
    node.stop()  # the release is only in the journal now
    assert [e["containerID"] for e in journal(node)] == ["jr1"]

    etcd_alone.start()
    assert ip in stored_ips(etcd_alone)
    node.start()  # replays the journal before it serves
    assert ip not in stored_ips(etcd_alone)
    assert journal(node) == []
    keys = Keys(PREFIX)
    with open_store(etcd_alone.url) as store:
        assert store.get(keys.released(ipaddress.ip_address(ip))) is not None  # cooling down


def test_add_after_a_journaled_del_applies_the_del_first(
    node: Daemon, etcd_alone: etcd.EtcdServer, netns: NetnsFactory
) -> None:
    """A runtime re-adding the same attachment: its journaled DEL is applied first, never lost."""
    rt = ExecRuntime()
    c = conf(node)
    _, path = netns()
    assert rt.add(c, path, "ja1").rc == 0
    ip = ip_of(rt, "ja1")
    etcd_alone.stop()
    assert rt.delete(c, path, "ja1").rc == 0
    assert len(journal(node)) == 1
    assert rt.add(c, path, "ja1").failed_with(11, "unreachable")  # ADD needs the store
    assert len(journal(node)) == 1
    etcd_alone.start()
    wait_for("etcd to answer the daemon again", lambda: rt.call("STATUS", c).rc == 0)
    add = rt.add(c, path, "ja1")
    assert add.rc == 0, add
    assert journal(node) == []
    assert ip_of(rt, "ja1") != ip  # the old IP was released first and is cooling down
    assert stored_ips(etcd_alone) == {ip_of(rt, "ja1")}
